"""How the Ray grid scales: many small tasks through the benchmark driver's loop, timed against the ideal.

    python -m baselines.experiments.ray_scaling --address 127.0.0.1:6379 --tasks 200 --task-seconds 0.2

Each task burns ``--task-seconds`` of CPU and returns a row the size of a benchmark row (a cell); the driver waits
for them one at a time and appends each to a CSV, as ``ray_grid.run_cells_on_ray`` does. Printed: wall time, the
ideal ``tasks * task_seconds / CPUs``, and the overhead per task (driver + scheduling), from which the speed-up
on N machines follows: a grid of ``c`` cells of ``t`` seconds each on ``p`` CPUs takes about
``ceil(c / p) * t + c * overhead`` (cells do not split, so the longest cell bounds it).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from agents.distributed import connect


def _burn(seconds: float, i: int) -> dict:
    end, x = time.process_time() + seconds, 0
    while time.process_time() < end:
        x += 1
    return {"method": f"task{i}", "budget": 0.5, "seed": 0, "status": "ok", "keep_ratios": json.dumps([0.5] * 12),
            "error": "", "spins": x}


def simulate(address: str | None, tasks: int, task_seconds: float) -> dict:
    ray = connect(address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    burn = ray.remote(num_cpus=1)(_burn)
    ray.get([burn.remote(0.01, -1) for _ in range(cpus)])  # workers started before the clock
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        pending = [burn.remote(task_seconds, i) for i in range(tasks)]
        with open(Path(d) / "rows.csv", "w", newline="") as f:
            w = None
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                row = ray.get(ready[0])
                w = w or csv.DictWriter(f, fieldnames=list(row))
                w.writerow(row)
                f.flush()
        wall = time.perf_counter() - t0
    ideal = tasks * task_seconds / cpus
    return {"nodes": len(ray.nodes()), "cpus": cpus, "tasks": tasks, "task_seconds": task_seconds,
            "wall_s": round(wall, 2), "ideal_s": round(ideal, 2), "efficiency": round(ideal / wall, 3),
            "overhead_per_task_ms": round(1000 * (wall - ideal) * cpus / tasks, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baselines.experiments.ray_scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="local", help="a cluster's address, or local (default)")
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--task-seconds", type=float, nargs="+", default=[0.2])
    args = p.parse_args(argv)
    for t in args.task_seconds:
        print(json.dumps(simulate(args.address, args.tasks, t)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
