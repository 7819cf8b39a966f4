"""Scale-out on Ray, on a real two-node cluster on this machine: a head node and a second node, each started with
``ray start`` on loopback (separate raylets, one CPU each), torn down at the end."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (make setup installs it)")

from agents.train import train  # noqa: E402
from baselines.experiments import benchmark as bm  # noqa: E402
from baselines.experiments.ray_grid import CELLS_FILE  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
DETERMINISTIC = ("status", "test_acc", "test_acc_before_ft", "reward_acc_before_ft", "flops_ratio",
                 "params_ratio", "keep_ratios", "evaluations", "clamp_total")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common], check=True, env=env,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _rows(path: Path) -> dict:
    with open(path, newline="") as f:
        return {(r["method"], r["budget"], r["seed"]): r for r in csv.DictReader(f)}


def _kill_one_cell_worker_mid_grid(out: Path, killed: list, stop: threading.Event) -> None:
    """Once one cell has finished, SIGKILL a worker process that is running another cell."""
    while not stop.is_set():
        if (out / CELLS_FILE).exists():
            pgrep = subprocess.run(["pgrep", "-f", "ray::_cell_task"], capture_output=True, text=True)
            pids = pgrep.stdout.split()
            if pids:
                os.kill(int(pids[0]), signal.SIGKILL)
                killed.append(int(pids[0]))
                return
        time.sleep(0.2)


def test_grid_on_two_nodes_equals_the_serial_run_and_survives_a_killed_worker(cluster, tiny_gym_kwargs, tmp_path):
    kwargs = {**tiny_gym_kwargs, "importance_samples": 8, "device": "cpu"}
    grid = dict(env_id="ChannelPrune-ResNet20-v0", budgets=[0.5, 0.6],
                baselines=["uniform", "l1", "random", "random_search"], agents=[], episodes=3, finetune_steps=2,
                env_kwargs=kwargs, seeds=(0,), progress=False, latency="cpu")
    bm.benchmark(out=tmp_path / "serial", **grid)
    serial = _rows(tmp_path / "serial" / "results.csv")

    out, killed, stop = tmp_path / "ray", [], threading.Event()
    killer = threading.Thread(target=_kill_one_cell_worker_mid_grid, args=(out, killed, stop), daemon=True)
    killer.start()
    try:
        bm.benchmark(out=out, ray_address=cluster, **grid)
    finally:
        stop.set()
        ray.shutdown()
    assert killed, "no worker was running a cell once the first cell had finished"
    rows = _rows(out / "results.csv")
    assert len(rows) == 9 and set(rows) == set(serial)  # 8 cells + the unpruned row, none lost to the kill
    for key, r in rows.items():  # the serial run's numbers (timings aside)
        assert {k: r[k] for k in DETERMINISTIC} == {k: serial[key][k] for k in DETERMINISTIC}, key
    with open(out / CELLS_FILE, newline="") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 8 and len({c["node"] for c in cells}) == 2  # both nodes ran cells
    # a rerun finds every cell done and runs nothing
    bm.benchmark(out=out, ray_address=cluster, **grid)
    ray.shutdown()
    assert _rows(out / "results.csv") == rows


def test_agents_envs_as_ray_actors_give_the_local_episodes(cluster, tiny_gym_kwargs, tmp_path):
    def episodes(**where):
        run = train("ppo", "ChannelPrune-ResNet20-v0", {**tiny_gym_kwargs, "device": "cpu"}, episodes=6,
                    n_envs=2, seed=3, out=tmp_path / str(len(where)), progress=False, tensorboard=False,
                    n_steps=8, batch_size=8, **where)
        with open(run / "episodes.csv", newline="") as f:
            return [(r["env"], r["reward"], r["flops_ratio"]) for r in csv.DictReader(f)]

    local = episodes()
    try:
        on_ray = episodes(ray_address=cluster)
    finally:
        ray.shutdown()
    assert len(on_ray) >= 6 and on_ray == local


def test_fidelity_plans_as_ray_tasks_give_the_serial_numbers(cluster, tiny_gym_kwargs, tmp_path):
    import gymnasium as gym

    env = gym.make("ChannelPrune-ResNet20-v0", budget=0.5, **tiny_gym_kwargs, device="cpu").unwrapped
    serial = bm.fidelity(env, 4, 2, tmp_path / "serial", seed=1, progress=False)
    try:
        spread = bm.fidelity(env, 4, 2, tmp_path / "ray", seed=1, progress=False, ray_address=cluster)
    finally:
        ray.shutdown()
    assert spread == serial
    assert (tmp_path / "ray" / "fidelity.csv").read_text() == (tmp_path / "serial" / "fidelity.csv").read_text()
