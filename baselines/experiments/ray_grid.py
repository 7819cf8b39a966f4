"""The benchmark grid on Ray: every (method, budget, seed) cell is a Ray task anywhere on the cluster.

``python -m baselines.experiments.benchmark ... --ray [ADDRESS]`` (no address: Ray starts locally). The driver
builds the env once (so the checkpoint, data and predictor caches exist and the unpruned row is measured), then
submits one task per cell still to run. A task builds its env with ``gym.make`` from the **shared cache path**
(``$CHANNELPRUNE_CACHE``, passed to the workers: one machine, or a filesystem every node mounts; nothing is
trained in a task, ``train_if_missing=False``) and the env kwargs (shipped through Ray's object store, so a
``data=`` object travels too), runs ``benchmark.run_cell`` and returns its rows. The driver appends them to
``results.csv`` as they finish, so resume, error rows and the outputs are those of the serial run (rows in
finish order). Agents' run directories are written under ``--out``, which must be on a shared path too.

Failures: a method that raises gives an error row, as in the serial run. A task whose worker process or node dies
is retried by Ray (``MAX_RETRIES``); if it still fails, the cell gets an error row and a rerun of the same command
runs it again. Which node ran each cell is written to ``ray_cells.csv`` next to ``results.csv``.

Spread the same way: ``random_search``'s N plan evaluations and ``--fidelity``'s K plans (fine-tune and test
accuracy each) go to Ray tasks too (``PlanPool``: one chunk of plans per cluster CPU, each task holding a copy of
the env, rebuilt from the shared cache when it is unpickled there); the results are those of the serial loop, in
the same order.

Resources: one CPU per task (Ray sets one torch thread), plus ``GPU_PER_CELL`` of a GPU when the benchmark runs
on CUDA (several cells share one GPU; on small inputs a ResNet-18 cell keeps a GPU busy for a fraction of the
time).
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from agents.distributed import connect

from .grid import Cell, Job, append_row, error_row

MAX_RETRIES = 3
GPU_PER_CELL = 0.25
CELLS_FILE = "ray_cells.csv"


class _PlanScorer:
    """Scores plans of one env (unpickled from the driver's copy: rebuilt from the shared cache)."""

    def __init__(self, env):
        self.env = env

    def reward_accuracy(self, kept, rt) -> float:
        return self.env.problem.evaluate_plan(kept, rt, split="reward")["accuracy"]

    def finetuned_test_accuracy(self, kept, rt, steps: int, seed: int) -> float:
        from envs.finetune import finetune

        net = self.env.build_pruned(kept, rt)
        self.env.recalibrate_bn(net)
        if steps > 0:
            net = finetune(net, self.env.data, steps=steps, seed=seed, progress=False, device=self.env.device)
        return self.env.evaluate(net, "test")[0]


def _score_chunk(env, method: str, chunk: list[tuple]) -> list:
    scorer = _PlanScorer(env)
    return [getattr(scorer, method)(*args) for args in chunk]


class PlanPool:
    """Scores plans of ``env`` in parallel: the plans are cut into one chunk per cluster CPU (at most), each chunk
    a Ray task that rebuilds the env once and scores its plans in order. Tasks, not actors, so a cell task that
    waits for them frees its CPU for them (Ray releases a task blocked in ``ray.get``) and nothing deadlocks;
    a task whose worker dies is retried. ``map`` keeps the order of its inputs; ``reward_accuracies`` has
    ``random_search.reward_accuracies``' signature."""

    def __init__(self, env, address: str | None, gpu: bool = False):
        self._ray = ray = connect(address)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.env_ref = ray.put(env)
        self.task = ray.remote(num_cpus=1, num_gpus=GPU_PER_CELL if gpu else 0, max_retries=MAX_RETRIES)(
            _score_chunk)

    def map(self, method: str, args: list[tuple]) -> list:
        k = min(len(args), self.cpus)
        chunks = [args[i::k] for i in range(k)]  # round robin: similar work per chunk
        done = self._ray.get([self.task.remote(self.env_ref, method, c) for c in chunks])
        out = [None] * len(args)
        for i, results in enumerate(done):
            out[i::k] = results
        return out

    def reward_accuracies(self, env, counts: list[tuple[list[int], list[int]]]) -> list[float]:
        return self.map("reward_accuracy", counts)


def _cell_task(job: Job, cell: Cell, run_cell: Callable) -> tuple[list[dict], str]:
    """Runs on a Ray worker: the cell's env from the shared cache, then ``run_cell(job, cell, env, **options)``."""
    import gymnasium as gym
    import ray

    import envs  # noqa: F401 - registers the ids
    from baselines import is_search

    kwargs = {**job.env_kwargs, "progress": False, "train_if_missing": False}
    env = gym.make(job.env_id, budget=cell.budget, **kwargs).unwrapped
    options = {}
    if is_search(cell.name):  # its evaluations spread over the cluster too
        options["evaluate"] = PlanPool(env, None, gpu=env.device.type == "cuda").reward_accuracies
    return run_cell(job, cell, env, **options), ray.get_runtime_context().get_node_id()


def run_cells_on_ray(job: Job, cells: list[Cell], run_cell: Callable, csv_path: Path, address: str | None,
                     gpu: bool = False) -> None:
    """Submit every cell as a task that runs ``run_cell`` (``benchmark.run_cell``) there; append each cell's rows
    to ``csv_path`` as it finishes."""
    ray = connect(address)
    _probe_one_thread()
    task = ray.remote(num_cpus=1, num_gpus=GPU_PER_CELL if gpu else 0, max_retries=MAX_RETRIES)(_cell_task)
    job_ref = ray.put(job)  # the env kwargs (a data= object too) go to the object store once
    pending = {task.remote(job_ref, cell, run_cell): cell for cell in cells}
    t0 = time.perf_counter()
    print(f"[benchmark] {len(cells)} cells as Ray tasks on {len(ray.nodes())} node(s)", file=sys.stderr)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready[0])
        try:
            rows, node = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - the task failed MAX_RETRIES times (a dying worker or node)
            rows, node = [error_row(cell, m, f"ray: {type(exc).__name__}: {str(exc)[:300]}")
                          for m in cell.methods], ""
        for row in rows:
            append_row(csv_path, row)
        _record(csv_path.parent / CELLS_FILE, cell, node, time.perf_counter() - t0,
                all(r["status"] == "ok" for r in rows))


def _probe_one_thread() -> None:
    """Ray gives each task one torch thread, and the machine probe is per thread count: probe this CPU for one
    thread here, once, into the shared cache, instead of once in every worker that starts at the same time (a
    node with another CPU still probes itself)."""
    import torch

    from envs.machine import backend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend("cpu")
    finally:
        torch.set_num_threads(threads)


def _record(path: Path, cell: Cell, node: str, seconds: float, ok: bool) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["budget", "seed", "name", "methods", "node", "finished_s", "ok"])
        if new:
            w.writeheader()
        w.writerow({**{k: v for k, v in asdict(cell).items() if k != "kind"}, "methods": " ".join(cell.methods),
                    "node": node, "finished_s": round(seconds, 1), "ok": ok})
