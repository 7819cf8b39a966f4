"""Benchmark: every scripted baseline and every learned agent on the same env, budgets, reward split and evaluator.

    python -m baselines.experiments.benchmark --env ChannelPrune-ResNet18-v0 --budgets 0.3 0.5 0.7 --baselines all \\
        --agents ppo ddpg --episodes 30 --finetune-steps 100 --out results/ [--device auto|cpu|cuda|cuda:N]

For each budget and method: the method plans its keep ratios in the env (baselines: ``prepare`` + ``plan``;
agents: trained here with ``agents.train``, or loaded from ``--agent-runs``, and replayed from ``best.json``);
one env episode gives the accuracy before fine-tuning on the reward split, the FLOPs / params / effective-FLOPs
ratios and how much the action wall clamped the plan; then the physically pruned network gets the same fixed
fine-tune (``envs.finetune``: SGD, cosine schedule, ``--finetune-steps``) for every method, and is evaluated once
on the real test split. The exported (physically pruned, static) network's CPU latency at batch 64 is measured
against the unpruned net, the two alternately (``envs.cost.compare_latency``), so the speed-up is not skewed by
whatever else the CPU was doing when the unpruned net was timed.

``--device`` ("auto": CUDA when available, else the CPU; "cpu"; "cuda"; "cuda:N") is where the env evaluates,
the baselines compute, the agents' envs run and the common fine-tune trains. Latency is always measured on the
CPU (``latency_b64_ms``, ``speedup_b64``: what the README reports) and, when the device is a GPU, on it too
(``latency_b64_ms_device``, ``speedup_b64_device``). Every row names its machines: ``machine`` (the device's:
search, fine-tune and device latency ran there) and ``cpu_machine`` (the CPU and threads that timed the CPU
latency), both from ``envs.machine.backend``.

Outputs in ``--out``: ``results.csv`` (appended row by row as methods finish; a rerun skips finished rows),
``results.md``, ``pareto.png`` (test accuracy vs FLOPs), ``keep_ratios.png`` (per-group keep ratios per method),
``reward_curves.png`` (agents). A crash in one method is recorded in its row and does not stop the others.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import traceback
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs  # noqa: F401 - registers the ids
from envs.cli import parse_key_values
from envs.cost import compare_latency, measure_latency
from envs.episodes import run_episode
from envs.machine import backend, resolve_device

FIELDS = [
    "method", "kind", "budget", "status", "reward_acc_before_ft", "reward_acc_after_ft", "test_acc",
    "flops_ratio", "params_ratio", "effective_flops_ratio", "clamp_total", "latency_b64_ms", "speedup_b64",
    "latency_b64_ms_device", "speedup_b64_device", "search_seconds", "finetune_seconds", "keep_ratios", "error",
    "device", "machine", "cpu_machine",
]
LATENCY_BATCH = 64


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:  # a results.csv from an older version: rewrite it with today's columns
            old = _read_rows(path)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in FIELDS} for r in old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})


def run_policy(env, policy) -> dict:
    """One deterministic episode of ``policy`` (SB3 predict) in ``env``; returns the final info."""
    return run_episode(env, policy, seed=0)[1]


def machines(device) -> dict:
    """The ``device`` / ``machine`` / ``cpu_machine`` fields of a row (``envs.machine.backend``)."""
    be = backend(device)
    return {"device": str(be.device), "machine": be.machine,
            "cpu_machine": be.machine if be.device.type == "cpu" else backend("cpu").machine}


def plan_latency(env, static) -> dict:
    """Batch-64 latency of the exported net ``static`` vs the unpruned net, alternately: on the CPU, and on the
    env's device too when that is a GPU."""
    shape = tuple(env.problem.example_input.shape[1:])
    lat, base_lat = compare_latency(static, env.base_model, shape, batch_size=LATENCY_BATCH, device="cpu")
    out = {"latency_b64_ms": 1000 * lat, "speedup_b64": base_lat / lat}
    if env.device.type == "cuda":
        lat, base_lat = compare_latency(static, env.base_model, shape, batch_size=LATENCY_BATCH, device=env.device)
        out.update(latency_b64_ms_device=1000 * lat, speedup_b64_device=base_lat / lat)
    return out


def evaluate_plan(env, info: dict, finetune_steps: int, progress: bool) -> dict:
    """Fine-tune the pruned net of ``info`` with the common recipe (on ``env.device``); test accuracy; exported
    latency (``plan_latency``)."""
    from envs.finetune import finetune

    kept = info["kept_counts"]
    rt = [max(1, round(r * k)) for r, k in zip(info["runtime_ratios"], kept)]
    net = env.build_pruned(kept, rt)
    env.recalibrate_bn(net)
    t0 = time.perf_counter()
    if finetune_steps > 0:
        net = finetune(net, env.data, steps=finetune_steps, progress=progress, device=env.device)
    ft_s = time.perf_counter() - t0  # finetune hands the net back on the CPU: its GPU work is finished
    acc_after, _ = env.evaluate(net, "reward")
    test_acc, _ = env.evaluate(net, "test")
    static = env.graph.prune_copy(env.kept_channels(kept))  # exported net: static pruning only
    return {"reward_acc_after_ft": acc_after, "test_acc": test_acc, "finetune_seconds": ft_s,
            **plan_latency(env, static)}


def _row_from_info(method: str, kind: str, budget: float, info: dict) -> dict:
    return {
        "method": method, "kind": kind, "budget": budget, "reward_acc_before_ft": info["accuracy"],
        "flops_ratio": info["flops_ratio"], "params_ratio": info["params_ratio"],
        "effective_flops_ratio": info["effective_flops_ratio"], "clamp_total": info["clamp_total"],
        "keep_ratios": json.dumps([round(r, 4) for r in info["keep_ratios"]]),
    }


def benchmark(
    env_id: str,
    budgets: list[float],
    baselines: list[str],
    agents: list[str],
    episodes: int,
    finetune_steps: int,
    out: Path,
    env_kwargs: dict | None = None,
    agent_runs: dict[str, str] | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> list[dict]:
    """Run the benchmark (see the module docstring); returns the rows of ``out/results.csv``.

    ``device``: "auto", "cpu", "cuda" or "cuda:N" for the env, the baselines, the agents' envs and the common
    fine-tune; None takes ``env_kwargs["device"]``, else "auto". Giving both, differently, is a ValueError.
    """
    from baselines import make_baseline

    env_kwargs = dict(env_kwargs or {})
    if device is not None:
        if "device" in env_kwargs and str(env_kwargs["device"]) != str(device):
            raise ValueError(f"device={device!r} differs from env_kwargs device={env_kwargs['device']!r}; "
                             "give one of them")
        env_kwargs["device"] = device
    env_kwargs.setdefault("device", "auto")
    resolve_device(env_kwargs["device"])  # a clear ValueError before anything is built or written
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    done = {(r["method"], float(r["budget"])) for r in _read_rows(csv_path) if r["status"] == "ok"}
    agent_runs = agent_runs or {}
    for budget in budgets:
        env = gym.make(env_id, budget=budget, **env_kwargs).unwrapped
        where = machines(env.device)
        if ("unpruned", 1.0) not in done:
            shape = tuple(env.problem.example_input.shape[1:])
            base_lat = measure_latency(env.base_model, shape, batch_size=LATENCY_BATCH, repeats=15, device="cpu")
            lat = {"latency_b64_ms": 1000 * base_lat, "speedup_b64": 1.0}
            if env.device.type == "cuda":
                dev_lat = measure_latency(env.base_model, shape, batch_size=LATENCY_BATCH, repeats=15,
                                          device=env.device)
                lat.update(latency_b64_ms_device=1000 * dev_lat, speedup_b64_device=1.0)
            acc, _ = env.evaluate(env.base_model, "reward")
            test, _ = env.evaluate(env.base_model, "test")
            _append_row(csv_path, {"method": "unpruned", "kind": "reference", "budget": 1.0, "status": "ok",
                                   "reward_acc_before_ft": acc, "reward_acc_after_ft": acc, "test_acc": test,
                                   "flops_ratio": 1.0, "params_ratio": 1.0, "effective_flops_ratio": 1.0,
                                   "clamp_total": 0.0, **lat, "search_seconds": 0.0, "finetune_seconds": 0.0,
                                   "keep_ratios": json.dumps([1.0] * env.n_groups), **where})
            done.add(("unpruned", 1.0))
        jobs = [("baseline", n) for n in baselines] + [("agent", a) for a in agents]
        for kind, name in jobs:
            if (name, budget) in done:
                print(f"[benchmark] {name} @ {budget}: done before, skipped", file=sys.stderr)
                continue
            print(f"[benchmark] {name} @ budget {budget} ...", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                if kind == "baseline":
                    policy = make_baseline(name, env, seed=seed).setup()
                    run_env = policy.eval_env
                else:
                    from agents.policy import BestPolicy
                    from agents.train import train as train_agent

                    run_dir = agent_runs.get(name)
                    if run_dir is None or not (Path(run_dir) / "best.json").exists():
                        run_dir = train_agent(name, env_id, env_kwargs={**env_kwargs, "budget": budget},
                                              episodes=episodes, seed=seed,
                                              out=out / "agents" / f"{name}-b{budget:g}", progress=progress)
                    policy = BestPolicy.load(Path(run_dir) / "best.json")
                    run_env = env
                info = run_policy(run_env, policy)
                search_s = time.perf_counter() - t0
                row = _row_from_info(name, kind, budget, info)
                row.update(evaluate_plan(run_env, info, finetune_steps, progress))
                row.update(status="ok", search_seconds=search_s)
            except Exception as exc:  # noqa: BLE001 - one method's crash must not lose the others' rows
                traceback.print_exc()
                row = {"method": name, "kind": kind, "budget": budget, "status": "error",
                       "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                       "search_seconds": time.perf_counter() - t0}
            _append_row(csv_path, {**row, **where})
    rows = _read_rows(csv_path)
    write_markdown(rows, out / "results.md", env_id, finetune_steps)
    plot_pareto(rows, out / "pareto.png", env_id)
    plot_keep_ratios(rows, out / "keep_ratios.png")
    plot_reward_curves(out / "agents", out / "reward_curves.png")
    return rows


def _f(v, fmt="{:.4f}") -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v) if v not in (None, "") else "-"
    return "-" if math.isnan(x) else fmt.format(x)


def _distinct(rows: list[dict], key: str) -> str:
    seen = sorted({r.get(key) or "" for r in rows} - {""})
    return "; ".join(seen) if seen else "not recorded"


def write_markdown(rows: list[dict], path: Path, env_id: str, finetune_steps: int) -> None:
    on_device = any(r.get("latency_b64_ms_device") not in (None, "") for r in rows)
    head = ("| method | budget | acc before FT | acc after FT | test acc | FLOPs | params | eff. FLOPs | clamp | "
            "latency b64 CPU (ms) | speed-up CPU | " + ("latency b64 device (ms) | speed-up device | " if on_device
                                                        else "") + "search (s) | status |")
    lines = [f"Benchmark on {env_id}; accuracies on the reward split except 'test acc'; fine-tune: "
             f"{finetune_steps} steps, the same recipe for every method.",
             f"Search, fine-tune{' and device latency' if on_device else ''} on: {_distinct(rows, 'machine')}. "
             f"CPU latency on: {_distinct(rows, 'cpu_machine')}.", "", head,
             "|" + "|".join(["---"] * (15 if on_device else 13)) + "|"]
    for r in sorted(rows, key=lambda r: (float(r["budget"]), r["kind"] != "reference", r["method"])):
        dev = (f"{_f(r.get('latency_b64_ms_device'), '{:.2f}')} | {_f(r.get('speedup_b64_device'), '{:.2f}')} | "
               if on_device else "")
        lines.append(
            f"| {r['method']} | {_f(r['budget'], '{:.2f}')} | {_f(r['reward_acc_before_ft'])} | "
            f"{_f(r['reward_acc_after_ft'])} | {_f(r['test_acc'])} | {_f(r['flops_ratio'], '{:.3f}')} | "
            f"{_f(r['params_ratio'], '{:.3f}')} | {_f(r['effective_flops_ratio'], '{:.3f}')} | "
            f"{_f(r['clamp_total'], '{:.3f}')} | {_f(r['latency_b64_ms'], '{:.1f}')} | "
            f"{_f(r['speedup_b64'], '{:.2f}')} | {dev}{_f(r['search_seconds'], '{:.0f}')} | "
            f"{r['status'] if r['status'] == 'ok' else 'error: ' + r.get('error', '')} |")
    path.write_text("\n".join(lines) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows: list[dict], path: Path, env_id: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    markers = "osD^v<>pPX*hH"
    methods = sorted({r["method"] for r in rows if r["status"] == "ok" and r["kind"] != "reference"})
    for i, m in enumerate(methods):
        pts = [(float(r["effective_flops_ratio"]), float(r["test_acc"])) for r in rows
               if r["method"] == m and r["status"] == "ok"]
        ax.scatter(*zip(*pts), marker=markers[i % len(markers)], label=m, s=40)
    ref = [float(r["test_acc"]) for r in rows if r["method"] == "unpruned" and r["status"] == "ok"]
    if ref:
        ax.axhline(ref[0], color="k", ls="--", lw=1, label="unpruned")
    ax.set_xlabel("FLOPs ratio (MACs computed per input; = static FLOPs except for runtime methods)")
    ax.set_ylabel("test accuracy after fine-tune")
    ax.set_title(env_id)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_keep_ratios(rows: list[dict], path: Path) -> None:
    plt = _plt()
    ok = [r for r in rows if r["status"] == "ok" and r["kind"] != "reference" and r["keep_ratios"]]
    if not ok:
        return
    budgets = sorted({float(r["budget"]) for r in ok})
    b = 0.5 if 0.5 in budgets else budgets[len(budgets) // 2]
    sel = [r for r in ok if float(r["budget"]) == b]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for i, r in enumerate(sel):
        ratios = json.loads(r["keep_ratios"])
        ax.plot(range(len(ratios)), ratios, marker="os^Dv<>pPX*"[i % 11], label=r["method"], lw=1)
    ax.set_xlabel("group (forward order)")
    ax.set_ylabel("keep ratio")
    ax.set_title(f"per-group keep ratios at budget {b:g}")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reward_curves(agents_dir: Path, path: Path) -> None:
    logs = sorted(agents_dir.glob("*/episodes.csv")) if agents_dir.exists() else []
    if not logs:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for log in logs:
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        r = np.array([float(x["reward"]) for x in rows])
        best = np.maximum.accumulate(r)
        line, = ax.plot(np.arange(1, len(r) + 1), r, lw=0.8, alpha=0.6, label=f"{log.parent.name} reward")
        ax.plot(np.arange(1, len(r) + 1), best, lw=1.6, color=line.get_color(), label=f"{log.parent.name} best")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from baselines import available

    p = argparse.ArgumentParser(prog="python -m baselines.experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="ChannelPrune-ResNet18-v0")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    p.add_argument("--baselines", nargs="*", default=["all"], help="names, or 'all'")
    p.add_argument("--agents", nargs="*", default=["ppo"])
    p.add_argument("--agent-runs", nargs="*", default=[], metavar="ALGO=RUN_DIR",
                   help="use these trained runs instead of training")
    p.add_argument("--episodes", type=int, default=30, help="training episodes per agent")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V")
    p.add_argument("--device", default=None,
                   help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N: where the env "
                        "evaluates, the baselines compute and the fine-tune trains (latency: CPU, plus the GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    names = available() if args.baselines == ["all"] else args.baselines
    unknown = [n for n in names if n not in available()]
    if unknown:
        p.error(f"unknown baselines {unknown}; available: {', '.join(available())}")
    try:
        args.env = envs.resolve_env_id(args.env)
    except ValueError as exc:
        p.error(str(exc))
    try:
        runs = parse_key_values(args.agent_runs, "--agent-runs", raw=True)  # values are run directories
        env_kwargs = parse_key_values(args.env_kwargs, "--env-kwargs")
    except ValueError as exc:
        p.error(str(exc))
    if args.device is not None and "device" in env_kwargs and str(env_kwargs["device"]) != args.device:
        p.error(f"--device {args.device} differs from --env-kwargs device={env_kwargs['device']}; give one")
    try:
        resolve_device(args.device or env_kwargs.get("device", "auto"))
    except ValueError as exc:
        p.error(str(exc))
    rows = benchmark(args.env, args.budgets, names, args.agents, args.episodes, args.finetune_steps,
                     Path(args.out), env_kwargs, runs, args.seed, device=args.device)
    print((Path(args.out) / "results.md").read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
