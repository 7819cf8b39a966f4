"""Benchmark: every scripted baseline and every learned agent on the same env, budgets, evaluator and seeds.

    python -m baselines.experiments.benchmark --env ChannelPrune-ResNet18-v0 --budgets 0.3 0.5 0.7 \\
        --baselines all
        --agents ppo ddpg --episodes 30 --finetune-steps 800 --seeds 0 1 2 --out results/ [--device auto|cuda]

For each budget, seed and method: the method plans its keep ratios in the env (baselines: ``prepare`` + ``plan``;
agents: trained here with ``agents.train``, or loaded from ``--agent-runs``); one env episode applies the plan.

Split discipline. Choices use the *reward split* only (2,000 images carved from the training set): an agent's
best training episode, random search's best plan, any method's tuning. Every reported accuracy is on the *test
split*, which nothing chooses with: before fine-tuning (BN recalibrated on the calibration split) and after the
common fine-tune (``envs.finetune``: the same SGD recipe and ``--finetune-steps`` for every method; its data order
follows the seed). The reward-split accuracy is kept as its own column, the selection split. Each agent gives two
rows: ``<algo>``, its final policy played deterministically, and ``<algo>_best``, its best training episode
(``best.json``); a run with ``select_every`` a third, ``<algo>_selected``, its policy snapshot that played best on
the reward split (``selected.zip``). ``random_search`` (EagleEye) evaluates as many budget-fitted random plans as
the agents ran episodes (``--episodes``): the control every learned row is compared with.

Seeds. ``--seeds 0 1 2`` runs every stochastic part once per seed; ``results.md`` gives, per method and budget,
the mean and a 95% t interval over seeds, and marks a learned row better than the best scripted method or than
random search only where the intervals do not overlap (``stats.py``).

Latency. The exported (physically pruned, static) network's latency at batch 64 is measured against the unpruned
net, the two alternately (``envs.cost.compare_latency``), on the benchmark's device (``--latency device``, the
default), on the CPU (``cpu``), both (``both``; on a GPU run the CPU timings share the machine's cores with the GPU
work) or not at all (``none``). Timings taken beside other work are noisy: a grid run in parallel processes can run
with ``--latency none`` and be timed afterwards, serially, on an otherwise idle machine with ``--merge DIR...
--retime cpu`` (``retime``: a static plan's exported net depends only on its keep ratios). ``--device`` ("auto":
CUDA when available, else the CPU; "cpu"; "cuda"; "cuda:N") is where the env evaluates, the baselines compute, the
agents' envs run and the fine-tune trains. Every row names its machines: ``machine`` (the device's) and
``cpu_machine`` (the CPU and threads that time CPU latency).

Outputs in ``--out``: ``results.csv`` (one row per method, budget and seed, appended as they finish; a rerun
skips finished rows), ``results.md``, ``pareto.png`` (test accuracy with intervals vs FLOPs),
``keep_ratios.png`` (per-group keep ratios per method, first seed), ``reward_curves.png`` (agents). A crash in one
method is recorded in its row and does not stop the others.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np
import yaml

import envs  # noqa: F401 - registers the ids
from agents.relative_actions import wrap_actions
from envs.cli import parse_key_values
from envs.cost import compare_latency, measure_latency
from envs.episodes import run_episode
from envs.machine import backend, cpu_machine, resolve_device

from .grid import FIELDS, Cell, Job, append_row, error_row, read_rows  # noqa: F401 - FIELDS: results.csv
from .stats import CONFIDENCE, compare, estimate

LATENCY_BATCH = 64
LATENCY = ("device", "cpu", "both", "none")


def machines(device) -> dict:
    """The ``device`` / ``machine`` / ``cpu_machine`` fields of a row (``envs.machine``; naming the CPU probes
    nothing)."""
    be = backend(device)
    return {"device": str(be.device), "machine": be.machine, "cpu_machine": cpu_machine()}


def _latency_devices(env, latency: str) -> tuple[bool, bool]:
    """(time on the CPU, time on the GPU) for ``latency`` ("device": where the benchmark runs; "cpu"; "both";
    "none")."""
    if latency not in LATENCY:
        raise ValueError(f"latency={latency!r} is not allowed; allowed: {', '.join(LATENCY)}")
    gpu = env.device.type == "cuda"
    return latency in ("cpu", "both") or (latency == "device" and not gpu), gpu and latency in ("device", "both")


def plan_latency(env, static, latency: str = "device", rounds: int = 3) -> dict:
    """Batch-64 latency of the exported net ``static`` vs the unpruned net, the two alternately, the best of
    ``rounds`` rounds each, where ``latency`` says: on the benchmark's device ("device"), on the CPU ("cpu") or
    both ("both")."""
    shape = tuple(env.problem.example_input.shape[1:])
    on_cpu, on_gpu = _latency_devices(env, latency)
    out = {}
    if on_cpu:
        lat, base_lat = compare_latency(static, env.base_model, shape, batch_size=LATENCY_BATCH, rounds=rounds,
                                         device="cpu")
        out.update(latency_b64_ms=1000 * lat, speedup_b64=base_lat / lat)
    if on_gpu:
        lat, base_lat = compare_latency(static, env.base_model, shape, batch_size=LATENCY_BATCH, rounds=rounds,
                                         device=env.device)
        out.update(latency_b64_ms_device=1000 * lat, speedup_b64_device=base_lat / lat)
    return out


def evaluate_plan(env, info: dict, finetune_steps: int, progress: bool, seed: int = 0, latency: str = "device",
                  latency_rounds: int = 3) -> dict:
    """Test accuracy of the pruned net of ``info`` before and after the common fine-tune (on ``env.device``, data
    order from ``seed``); exported latency (``plan_latency``). Nothing here chooses anything."""
    from envs.finetune import finetune

    kept = info["kept_counts"]
    rt = [max(1, round(r * k)) for r, k in zip(info["runtime_ratios"], kept)]
    net = env.build_pruned(kept, rt)
    env.recalibrate_bn(net)
    test_before, _ = env.evaluate(net, "test")
    t0 = time.perf_counter()
    if finetune_steps > 0:
        net = finetune(net, env.data, steps=finetune_steps, seed=seed, progress=progress, device=env.device)
    ft_s = time.perf_counter() - t0  # finetune hands the net back on the CPU: its GPU work is finished
    test_acc = env.evaluate(net, "test")[0] if finetune_steps > 0 else test_before  # unchanged net: not again
    static = env.graph.prune_copy(env.kept_channels(kept))  # exported net: static pruning only
    return {"test_acc_before_ft": test_before, "test_acc": test_acc, "finetune_seconds": ft_s,
            **plan_latency(env, static, latency, latency_rounds)}


def own_network_row(method: str, budget: float, env, net, measure, finetune_steps: int, progress: bool,
                    seed: int) -> dict:
    """A row for a method evaluated as its own network: its accuracy on the selection split, on the test split
    before and after the common fine-tune, and its own effective FLOPs count (after the fine-tune, on the test
    split). Static FLOPs and parameters are the unpruned net's; no latency (the gated net runs densely, masked)."""
    from envs.finetune import finetune

    selection, before = measure(net, "reward"), measure(net, "test")
    t0 = time.perf_counter()
    if finetune_steps > 0:
        net = finetune(net, env.data, steps=finetune_steps, seed=seed, progress=progress, device=env.device)
    ft_s = time.perf_counter() - t0
    after = measure(net, "test") if finetune_steps > 0 else before
    return {"method": method, "kind": "baseline", "budget": budget, "reward_acc_before_ft": selection["accuracy"],
            "test_acc_before_ft": before["accuracy"], "test_acc": after["accuracy"], "flops_ratio": 1.0,
            "params_ratio": 1.0, "effective_flops_ratio": after["effective_flops_ratio"], "clamp_total": 0.0,
            "evaluations": 0, "finetune_seconds": ft_s, "keep_ratios": json.dumps([1.0] * env.n_groups)}


def _row_from_info(method: str, kind: str, budget: float, info: dict) -> dict:
    return {
        "method": method, "kind": kind, "budget": budget, "reward_acc_before_ft": info["accuracy"],
        "flops_ratio": info["flops_ratio"], "params_ratio": info["params_ratio"],
        "effective_flops_ratio": info["effective_flops_ratio"], "clamp_total": info["clamp_total"],
        "keep_ratios": json.dumps([round(r, 4) for r in info["keep_ratios"]]),
    }


def write_search_curve(history: list[dict], run_dir: Path) -> None:
    """A search's evaluations in the agents' ``episodes.csv`` form (episode, reward = reward-split accuracy,
    first-rung when raced; cost ratio), so ``reward_curves.png`` draws random search beside the agents."""
    from agents.common import EPISODES_FILE

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / EPISODES_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["episode", "reward", "accuracy", "cost_ratio"])
        for i, h in enumerate(history, 1):
            w.writerow([i, h["reward_accuracy"], h["reward_accuracy"], h["cost_ratio"]])


def run_cell(job: Job, cell: Cell, env, **options) -> list[dict]:
    """The rows of one cell on ``env`` (the run's env at the cell's budget): the method plans (baselines:
    ``setup``, with ``options``; agents: trained or loaded), one episode applies each plan, ``evaluate_plan``
    measures it. A crash becomes an error row, so one method cannot lose the others' rows."""
    from baselines import is_search, make_baseline

    where, rows = {**machines(env.device), "test_images": len(env.data.test)}, []
    print(f"[benchmark] {cell.name} @ budget {cell.budget}, seed {cell.seed} ...", file=sys.stderr)
    t0, method = time.perf_counter(), cell.name
    try:
        if cell.kind == "baseline":
            if is_search(cell.name):  # a search at equal evaluations: as many as the agents ran
                options["samples"] = job.search_samples or job.episodes
            policy = make_baseline(cell.name, env, seed=cell.seed, **options)
            own = policy.own_network()
            if own is not None:  # the method's own network (Channel Gating), not an env plan
                search_s = time.perf_counter() - t0
                row = own_network_row(cell.name, cell.budget, env, *own, job.finetune_steps, job.progress,
                                      cell.seed)
                return [{**row, "status": "ok", "seed": cell.seed, "search_seconds": search_s, **where}]
            policy.setup()
            plays = [(cell.name, policy.eval_env, policy, getattr(policy, "evaluations", 1), "absolute")]
            if getattr(policy, "history", None):  # a search: its evaluations are curves next to the agents'
                write_search_curve(policy.history, Path(job.out) / "agents" / f"{cell.name}-b{cell.budget:g}"
                                   f"-s{cell.seed}")
        else:
            plays = agent_plays(cell.name, job.env_id, env, job.env_kwargs, cell.budget, job.episodes, cell.seed,
                                Path(job.out), job.agent_runs.get(cell.name), job.progress)
        search_s = time.perf_counter() - t0
        for method, run_env, policy, evaluations, actions in plays:
            if method not in cell.methods:
                continue
            if run_env.screen is not None:  # a row's reward accuracy is always the whole split's, never raced
                run_env = run_env.derive(screen_size=None)
            info = run_episode(wrap_actions(run_env, actions), policy, seed=0)[1]
            row = _row_from_info(method, cell.kind, cell.budget, info)
            row.update(evaluate_plan(run_env, info, job.finetune_steps, job.progress, cell.seed, job.latency,
                                     job.latency_rounds))
            row.update(status="ok", seed=cell.seed, search_seconds=search_s, evaluations=evaluations)
            rows.append({**row, **where})
    except Exception as exc:  # noqa: BLE001 - one method's crash must not lose the others' rows
        traceback.print_exc()
        rows.append(error_row(cell, method, f"{type(exc).__name__}: {str(exc)[:300]}", time.perf_counter() - t0,
                              where))
    return rows


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
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    device: str | None = None,
    latency: str = "device",
    ray_address: str | None = None,
    latency_rounds: int = 3,
) -> list[dict]:
    """Run the benchmark (see the module docstring); returns the rows of ``out/results.csv``.

    ``seeds``: every stochastic part runs once per seed (agent training, random search and the other seeded
    baselines, the common fine-tune's data order); ``results.md`` reports means and intervals over them.
    ``device``: "auto", "cpu", "cuda" or "cuda:N" for the env, the baselines, the agents' envs and the common
    fine-tune; None takes ``env_kwargs["device"]``, else "auto". Giving both, differently, is a ValueError.
    ``latency``: where the exported nets are timed: "device" (where the benchmark runs), "cpu", "both" or "none"
    (time them later with ``retime``); ``latency_rounds``: each exported net and the unpruned one are timed
    alternately this many times, the best of each kept (fewer: quicker, noisier).
    ``ray_address``: run the cells as Ray tasks ("local": a Ray started here; else a cluster's address), see
    ``ray_grid``; the rows are those of the serial run, appended as they finish.
    """
    env_kwargs = dict(env_kwargs or {})
    if device is not None:
        if "device" in env_kwargs and str(env_kwargs["device"]) != str(device):
            raise ValueError(f"device={device!r} differs from env_kwargs device={env_kwargs['device']!r}; "
                             "give one of them")
        env_kwargs["device"] = device
    env_kwargs.setdefault("device", "auto")
    resolve_device(env_kwargs["device"])  # a clear ValueError before anything is built or written
    if latency not in LATENCY:
        raise ValueError(f"latency={latency!r} is not allowed; allowed: {', '.join(LATENCY)}")
    if not (isinstance(latency_rounds, int) and latency_rounds >= 1):
        raise ValueError(f"latency_rounds={latency_rounds!r} must be an integer >= 1")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r} must be distinct integers, at least one")
    if agent_runs and (len(seeds) > 1 or len(budgets) > 1):
        raise ValueError("agent_runs gives one trained run per agent, for one budget and one seed; with several "
                         "seeds or budgets let the benchmark train one run for each")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    done = {_key(r) for r in read_rows(csv_path) if r["status"] == "ok"}
    agent_runs = agent_runs or {}
    first = gym.make(env_id, budget=budgets[0], **env_kwargs).unwrapped
    cells = []  # the grid's cells with rows still to run
    for budget in budgets:
        for seed in seeds:
            jobs = [("baseline", n, [n]) for n in baselines] + [
                ("agent", a, agent_methods(a, env_id, episodes, agent_runs.get(a))) for a in agents]
            for kind, name, methods in jobs:
                todo = [m for m in methods if (m, budget, seed) not in done]
                if todo:
                    cells.append(Cell(budget, seed, kind, name, tuple(todo)))
                else:
                    print(f"[benchmark] {name} @ {budget} seed {seed}: done before, skipped", file=sys.stderr)
    if ("unpruned", 1.0, 0) not in done:
        append_row(csv_path, {**unpruned_row(first, latency), **machines(first.device),
                               "test_images": len(first.data.test)})
    # searches at equal evaluations: the agents' episodes plus their policy checks
    checks = max((agent_checks(a, env_id, episodes, agent_runs.get(a)) for a in agents), default=0)
    job = Job(env_id, env_kwargs, episodes, finetune_steps, str(out), agent_runs, progress, latency,
              latency_rounds, search_samples=episodes + checks)
    if ray_address is not None:
        from .ray_grid import run_cells_on_ray

        run_cells_on_ray(job, cells, run_cell, csv_path, ray_address, gpu=first.device.type == "cuda")
    else:
        envs_by_budget = {budgets[0]: first}
        for cell in cells:
            if cell.budget not in envs_by_budget:
                envs_by_budget[cell.budget] = first.derive(budget=cell.budget)  # one problem, shared
            for row in run_cell(job, cell, envs_by_budget[cell.budget]):
                append_row(csv_path, row)
    return write_outputs(out, env_id, finetune_steps)


def write_outputs(out: Path, env_id: str, finetune_steps: int) -> list[dict]:
    """``results.md`` and the plots from ``out/results.csv`` (and ``out/agents``); returns the rows."""
    rows = read_rows(out / "results.csv")
    write_markdown(rows, out / "results.md", env_id, finetune_steps)
    plot_pareto(rows, out / "pareto.png", env_id)
    plot_keep_ratios(rows, out / "keep_ratios.png")
    plot_reward_curves(out / "agents", out / "reward_curves.png")
    return rows


def merge(sources: Sequence[Path], out: Path, env_id: str, finetune_steps: int) -> list[dict]:
    """One report from benchmark runs that ran apart (e.g. one process per budget and seed on one GPU, or one
    machine each): their ``results.csv`` rows (a (method, budget, seed) cell found twice keeps its first ``ok``
    row) and their agents' run directories are gathered into ``out``, then ``write_outputs``."""
    rows, seen = [], set()
    for src in sources:
        found = read_rows(Path(src) / "results.csv")
        if not found:
            raise ValueError(f"merge source {str(src)!r} has no results.csv rows")
        for r in sorted(found, key=lambda r: r["status"] != "ok"):
            if _key(r) not in seen:
                seen.add(_key(r))
                rows.append(r)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "results.csv").exists():
        (out / "results.csv").unlink()
    for r in rows:
        append_row(out / "results.csv", r)
    for src in sources:
        for run in sorted((Path(src) / "agents").glob("*")) if (Path(src) / "agents").exists() else []:
            if run.is_dir() and not (out / "agents" / run.name).exists():
                shutil.copytree(run, out / "agents" / run.name)
    return write_outputs(out, env_id, finetune_steps)


def retime(out: Path, env_id: str, finetune_steps: int, latency: str = "cpu", env_kwargs: dict | None = None
           ) -> list[dict]:
    """Time every ``ok`` row of ``out/results.csv`` again, serially, here (``latency``: "cpu", "device" or
    "both", see ``plan_latency``), replacing its latency columns and ``cpu_machine``; then ``write_outputs``.

    A static plan's exported net depends only on its keep ratios, so a grid run in parallel (``--latency none``,
    or timed beside other work) gets its speed-ups measured afterwards on an otherwise idle machine. Equal plans
    (a deterministic method over seeds) are timed once. A row that keeps every channel (a method evaluated as its
    own network, e.g. Channel Gating's gated net) has no exported net to time and keeps no latency."""
    if latency not in LATENCY or latency == "none":
        raise ValueError(f"latency={latency!r} is not allowed to retime; allowed: device, cpu, both")
    rows = read_rows(out / "results.csv")
    if not rows:
        raise ValueError(f"retime: {str(out)!r} has no results.csv rows")
    # which channels a plan keeps does not change its exported net's shape: the L1 scorer needs no predictors
    env = gym.make(env_id, **{"device": "cpu" if latency == "cpu" else "auto", "scorer": "l1",
                              **(env_kwargs or {})}).unwrapped
    channels = [g.num_channels for g in env.groups]
    cleared = dict.fromkeys(("latency_b64_ms", "speedup_b64", "latency_b64_ms_device", "speedup_b64_device"), "")
    timed: dict[tuple, dict] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        ratios = json.loads(row["keep_ratios"]) if row.get("keep_ratios") else []
        if len(ratios) != len(channels):
            raise ValueError(f"retime: row {row['method']!r} has {len(ratios)} keep ratios; {env_id} has "
                             f"{len(channels)} groups (give the run's --env and --env-kwargs)")
        kept = tuple(max(1, round(r * c)) for r, c in zip(ratios, channels))
        if row["method"] == "unpruned":
            new = unpruned_latency(env, latency)  # its accuracies stay as measured
        elif kept == tuple(channels):
            new = {}
        else:
            if kept not in timed:
                print(f"[retime] {row['method']} @ {row['budget']}, seed {row['seed']} ...", file=sys.stderr)
                timed[kept] = plan_latency(env, env.graph.prune_copy(env.kept_channels(list(kept))), latency)
            new = timed[kept]
        row.update({**cleared, **new, "cpu_machine": cpu_machine()})
    (out / "results.csv").unlink()
    for row in rows:
        append_row(out / "results.csv", row)
    return write_outputs(out, env_id, finetune_steps)


def fidelity(env, plans: int, finetune_steps: int, out: Path, seed: int = 0, progress: bool = True,
             ray_address: str | None = None) -> dict:
    """Does the reward predict what users care about? ``plans`` random budget-fitted plans (random search's draws)
    are each scored as the env scores them (reward-split accuracy after BN recalibration) and then fine-tuned with
    the common recipe and measured on the test split; returns the Spearman rank correlation between the two
    (EagleEye reports 0.83-0.94 for its adaptive-BN score, MobileNetV1 on CIFAR-10) and writes
    ``fidelity.csv`` (one line per plan) into ``out``. With ``ray_address`` the plans are scored, fine-tuned and
    tested by Ray tasks (``ray_grid.PlanPool``; the same numbers, written when all are done)."""
    from scipy.stats import spearmanr

    from baselines.random_search import RandomSearch
    from envs.finetune import finetune

    if plans < 3:
        raise ValueError(f"fidelity plans={plans!r} must be at least 3 (a rank correlation of fewer means "
                         "nothing)")
    pool = None
    if ray_address is not None:
        from .ray_grid import PlanPool

        pool = PlanPool(env, ray_address, gpu=env.device.type == "cuda")
    search = RandomSearch(env, seed=seed, samples=plans, **({"evaluate": pool.reward_accuracies} if pool else {}))
    search.setup()
    counts = [env.cost.plan_counts(h["plan"]) for h in search.history]
    tested = None if pool is None else pool.map("finetuned_test_accuracy",
                                                [(k, r, finetune_steps, seed) for k, r in counts])
    lines = []
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fidelity.csv", "w", newline="") as f:  # a line per plan as it ends: a killed run keeps them
        w = csv.DictWriter(f, fieldnames=["plan", "cost_ratio", "reward_acc_before_ft", "test_acc"])
        w.writeheader()
        for i, (h, (kept, rt)) in enumerate(zip(search.history, counts)):
            if tested is not None:
                test_acc = tested[i]
            else:
                net = env.build_pruned(kept, rt)
                env.recalibrate_bn(net)
                if finetune_steps > 0:
                    net = finetune(net, env.data, steps=finetune_steps, seed=seed, progress=progress,
                                   device=env.device)
                test_acc = env.evaluate(net, "test")[0]
            lines.append({"plan": i, "cost_ratio": h["cost_ratio"], "reward_acc_before_ft": h["reward_accuracy"],
                          "test_acc": test_acc})
            w.writerow(lines[-1])
            f.flush()
    rho = spearmanr([x["reward_acc_before_ft"] for x in lines], [x["test_acc"] for x in lines])
    return {"plans": len(lines), "budget": env.budget, "finetune_steps": finetune_steps,
            "spearman": float(rho.statistic), "p_value": float(rho.pvalue)}


def _key(row: dict) -> tuple[str, float, int]:
    return row["method"], float(row["budget"]), int(row.get("seed") or 0)  # no seed: a row of an older version


def unpruned_latency(env, latency: str = "device") -> dict:
    """The unpruned net's batch-64 latency columns, timed as ``latency`` says (see ``plan_latency``)."""
    shape = tuple(env.problem.example_input.shape[1:])
    on_cpu, on_gpu = _latency_devices(env, latency)
    lat = {}
    if on_cpu:
        base_lat = measure_latency(env.base_model, shape, batch_size=LATENCY_BATCH, repeats=15, device="cpu")
        lat.update(latency_b64_ms=1000 * base_lat, speedup_b64=1.0)
    if on_gpu:
        dev_lat = measure_latency(env.base_model, shape, batch_size=LATENCY_BATCH, repeats=15, device=env.device)
        lat.update(latency_b64_ms_device=1000 * dev_lat, speedup_b64_device=1.0)
    return lat


def unpruned_row(env, latency: str = "device") -> dict:
    """The reference row: the unpruned network's accuracies and latency (no fine-tune; ``unpruned_latency``)."""
    lat = unpruned_latency(env, latency)
    acc, _ = env.evaluate(env.base_model, "reward")
    test, _ = env.evaluate(env.base_model, "test")
    return {"method": "unpruned", "kind": "reference", "budget": 1.0, "seed": 0, "status": "ok",
            "reward_acc_before_ft": acc, "test_acc_before_ft": test, "test_acc": test, "flops_ratio": 1.0,
            "params_ratio": 1.0, "effective_flops_ratio": 1.0, "clamp_total": 0.0, **lat, "evaluations": 0,
            "search_seconds": 0.0, "finetune_seconds": 0.0, "keep_ratios": json.dumps([1.0] * env.n_groups)}


def agent_checks(algo: str, env_id: str, episodes: int, run_dir: str | None) -> int:
    """The reward-split checks of its policy an agent's run makes besides its episodes (``select_every``): those
    in its ``selection.csv``, or, trained here, those the preset asks for."""
    from agents.common import SELECTION_FILE
    from agents.presets import get_preset

    if run_dir is not None:
        path = Path(run_dir) / SELECTION_FILE
        return _csv_rows(path) if path.exists() else 0
    every = get_preset(algo, env_id).get("select_every")
    return episodes // every if every else 0


def agent_methods(algo: str, env_id: str, episodes: int, run_dir: str | None) -> list[str]:
    """The rows an agent gives: ``algo`` and ``algo_best``, plus ``algo_selected`` when its run checks its policy
    on the reward split (``agent_checks``)."""
    return [algo, f"{algo}_best"] + ([f"{algo}_selected"] if agent_checks(algo, env_id, episodes, run_dir) else [])


def agent_plays(algo: str, env_id: str, env, env_kwargs: dict, budget: float, episodes: int, seed: int, out: Path,
                run_dir: str | None, progress: bool) -> list[tuple]:
    """An agent's rows: ``algo``, its final policy played deterministically (through its actions wrapper when it
    was trained with one), ``algo_best``, the best of its training episodes by reward-split accuracy
    (``best.json``), and with ``select_every`` ``algo_selected``, the policy snapshot that played best on the
    reward split (``selected.zip``). Each row's evaluations are the run's: its episodes plus its policy checks.
    Trained here unless ``run_dir`` has one."""
    from agents.algos import ALGOS
    from agents.common import (BEST_FILE, CONFIG_FILE, EPISODES_FILE, MODEL_FILE, SELECTED_MODEL_FILE,
                               SELECTION_FILE)
    from agents.policy import BestPolicy
    from agents.relative_actions import actions_of_config
    from agents.train import train as train_agent

    if run_dir is None or not (Path(run_dir) / BEST_FILE).exists():
        run_dir = train_agent(algo, env_id, env_kwargs={**env_kwargs, "budget": budget}, episodes=episodes,
                              seed=seed, out=out / "agents" / f"{algo}-b{budget:g}-s{seed}", progress=progress)
    run_dir = Path(run_dir)
    final = ALGOS[algo].load(run_dir / MODEL_FILE, device="cpu")
    best = BestPolicy.load(run_dir / BEST_FILE)
    evaluations = _csv_rows(run_dir / EPISODES_FILE)  # episodes the agent ran: its reward-split evaluations
    selected = run_dir / SELECTED_MODEL_FILE
    if selected.exists():
        evaluations += _csv_rows(run_dir / SELECTION_FILE)  # and its policy checks
    actions = actions_of_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))  # how the final policy acts
    plays = [(algo, env, final, evaluations, actions), (f"{algo}_best", env, best, evaluations, "absolute")]
    if selected.exists():
        plays.append((f"{algo}_selected", env, ALGOS[algo].load(selected, device="cpu"), evaluations, actions))
    return plays


def _csv_rows(path: Path) -> int:
    with open(path, newline="") as f:
        return len(list(csv.DictReader(f)))


def _f(v, fmt="{:.4f}") -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v) if v not in (None, "") else "-"
    return "-" if math.isnan(x) else fmt.format(x)


def _distinct(rows: list[dict], key: str) -> str:
    seen = sorted({r.get(key) or "" for r in rows} - {""})
    return "; ".join(seen) if seen else "not recorded"


SCRIPTED_CONTROL = "random_search"  # the control of equal evaluations, kept apart from the scripted methods


def summarize(rows: list[dict]) -> list[dict]:
    """Per (budget, method): estimates over seeds of the test accuracy after and before fine-tuning and of the
    selection-split accuracy, plus each learned method's comparison with the best scripted method (by mean test
    accuracy after fine-tuning) and with each search at equal evaluations (random search and its variants)."""
    from baselines import is_search

    ok = [r for r in rows if r["status"] == "ok"]
    out = []
    for budget in sorted({float(r["budget"]) for r in ok}):
        at = [r for r in ok if float(r["budget"]) == budget]
        by_method: dict[str, list[dict]] = {}
        for r in at:
            by_method.setdefault(r["method"], []).append(r)
        summary = {}
        for m, rs in by_method.items():
            summary[m] = {"budget": budget, "method": m, "kind": rs[0]["kind"], "seeds": len(rs),
                          **{k: estimate([_num(r.get(k)) for r in rs]) for k in (
                              "test_acc", "test_acc_before_ft", "reward_acc_before_ft", "flops_ratio",
                              "effective_flops_ratio", "speedup_b64", "speedup_b64_device", "evaluations")}}
        learned = [s for s in summary.values() if s["kind"] == "agent"]
        scripted = [s for m, s in summary.items() if s["kind"] == "baseline" and not is_search(m)
                    and _comparable(s, learned, budget)]
        best_scripted = max(scripted, key=lambda s: s["test_acc"].mean, default=None)
        for s in summary.values():
            if s["kind"] == "agent":
                if best_scripted is not None:
                    verdict = compare(s["test_acc"], best_scripted["test_acc"])
                    s["vs_scripted"] = f"{verdict} {best_scripted['method']}"
                # against every search at equal evaluations present (e.g. random_search_anchored, the control
                # of anchored actions), random_search's verdict unnamed
                vs = [compare(s["test_acc"], summary[m]["test_acc"]) + ("" if m == SCRIPTED_CONTROL else f" {m}")
                      for m in sorted(summary, key=lambda m: m != SCRIPTED_CONTROL) if is_search(m)]
                if vs:
                    s["vs_random_search"] = "; ".join(vs)
            out.append(s)
    return out


def _comparable(row: dict, learned: list[dict], budget: float) -> bool:
    """A scripted method competes with the learned ones only if it meets every budget they meet: static FLOPs
    and/or effective FLOPs within ``budget`` (Channel Gating's own net and its top-k transfer keep every channel
    statically, so in a static benchmark they are not ranked against the agents)."""
    within = lambda s, k: s[k].mean <= budget + 1e-6  # noqa: E731
    return all(within(row, k) for k in ("flops_ratio", "effective_flops_ratio")
               if learned and all(within(s, k) for s in learned))


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def write_markdown(rows: list[dict], path: Path, env_id: str, finetune_steps: int) -> None:
    on_device = any(r.get("latency_b64_ms_device") not in (None, "") for r in rows)
    summary = summarize(rows)
    seeds = sorted({int(r.get("seed") or 0) for r in rows if r["kind"] != "reference"})
    lines = [f"Benchmark on {env_id}: seeds {', '.join(map(str, seeds)) or '-'}; fine-tune: {finetune_steps} "
             "steps, "
             "the same recipe for every method.",
             "Every reported accuracy is on the **test split**, which nothing chooses with. 'selection acc' is "
             "the "
             "reward split (carved from the training set) that agents' best episodes and random search choose "
             "with; it is shown apart and is optimistic for the methods that chose on it.",
             f"Mean [{int(CONFIDENCE * 100)}% t interval] over seeds; 'vs scripted' / 'vs random search': > or < "
             "only where the intervals do not overlap, else tie (n/a with one seed).",
             f"Test split: {_distinct(rows, 'test_images')} images. "
             f"Search, fine-tune{' and device latency' if on_device else ''} on: {_distinct(rows, 'machine')}. "
             f"CPU latency on: {_distinct(rows, 'cpu_machine')}.", "",
             "| method | budget | seeds | test acc after FT | test acc before FT | selection acc (reward split) | "
             "eff. FLOPs | speed-up CPU b64 | " + ("speed-up device b64 | " if on_device else "") +
             "evaluations | vs scripted | vs random search |",
             "|" + "|".join(["---"] * (12 if on_device else 11)) + "|"]
    for s in sorted(summary, key=lambda s: (s["budget"], s["kind"] != "reference", s["method"])):
        lines.append(f"| {s['method']} | {s['budget']:.2f} | {s['seeds']} | {s['test_acc'].text()} | "
                     f"{s['test_acc_before_ft'].text()} | {s['reward_acc_before_ft'].text()} | "
                     f"{s['effective_flops_ratio'].text('{:.3f}')} | {s['speedup_b64'].text('{:.2f}')} | "
                     + (f"{s['speedup_b64_device'].text('{:.2f}')} | " if on_device else "") +
                     f"{s['evaluations'].text('{:.0f}')} | {s.get('vs_scripted', '')} | "
                     f"{s.get('vs_random_search', '')} |")
    head = ("| method | budget | seed | selection acc | test acc before FT | test acc after FT | FLOPs | params | "
            "eff. FLOPs | clamp | latency b64 CPU (ms) | speed-up CPU | " +
            ("latency b64 device (ms) | speed-up device | " if on_device else "") + "search (s) | status |")
    lines += ["", "Every run:", "", head, "|" + "|".join(["---"] * (16 if on_device else 14)) + "|"]
    for r in sorted(rows, key=lambda r: (float(r["budget"]), r["kind"] != "reference", r["method"],
                                         int(r.get("seed") or 0))):
        dev = (f"{_f(r.get('latency_b64_ms_device'), '{:.2f}')} | {_f(r.get('speedup_b64_device'), '{:.2f}')} | "
               if on_device else "")
        lines.append(
            f"| {r['method']} | {_f(r['budget'], '{:.2f}')} | {r.get('seed') or 0} | "
            f"{_f(r['reward_acc_before_ft'])} | {_f(r.get('test_acc_before_ft'))} | {_f(r['test_acc'])} | "
            f"{_f(r['flops_ratio'], '{:.3f}')} | {_f(r['params_ratio'], '{:.3f}')} | "
            f"{_f(r['effective_flops_ratio'], '{:.3f}')} | {_f(r['clamp_total'], '{:.3f}')} | "
            f"{_f(r['latency_b64_ms'], '{:.1f}')} | {_f(r['speedup_b64'], '{:.2f}')} | {dev}"
            f"{_f(r['search_seconds'], '{:.0f}')} | "
            f"{r['status'] if r['status'] == 'ok' else 'error: ' + r.get('error', '')} |")
    path.write_text("\n".join(lines) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(rows: list[dict], path: Path, env_id: str) -> None:
    """Against effective FLOPs, per method (mean and interval over seeds): test accuracy after fine-tuning, and
    the exported net's measured batch-64 speed-up (CPU where timed there, else the device)."""
    plt = _plt()
    fig, (ax, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    markers = "osD^v<>pPX*hH"
    summary = [s for s in summarize(rows) if s["kind"] != "reference"]
    speed = "speedup_b64" if any(s["speedup_b64"].n for s in summary) else "speedup_b64_device"

    def bars(e):
        return [e.mean - e.low if e.n > 1 else 0.0, e.high - e.mean if e.n > 1 else 0.0]

    for i, m in enumerate(sorted({s["method"] for s in summary})):
        pts = [s for s in summary if s["method"] == m]
        x = [s["effective_flops_ratio"].mean for s in pts]
        for axis, key in ((ax, "test_acc"), (ax_speed, speed)):
            est = [s[key] for s in pts]
            axis.errorbar(x, [e.mean for e in est], yerr=np.array([bars(e) for e in est]).T,
                          fmt=markers[i % len(markers)], label=m, ms=6, capsize=3, lw=1)
    ref = [float(r["test_acc"]) for r in rows if r["method"] == "unpruned" and r["status"] == "ok"]
    if ref:
        ax.axhline(ref[0], color="k", ls="--", lw=1, label="unpruned")
    for axis in (ax, ax_speed):
        axis.set_xlabel("FLOPs ratio (MACs per input; = static FLOPs except for runtime methods)")
    ax.set_ylabel(f"test accuracy after fine-tune (mean, {int(CONFIDENCE * 100)}% interval)")
    ax_speed.set_ylabel(f"measured speed-up, batch 64, {'CPU' if speed == 'speedup_b64' else 'device'}")
    ax_speed.axhline(1.0, color="k", ls="--", lw=1)
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
    first_seed = min(int(r.get("seed") or 0) for r in ok)
    sel = [r for r in ok if float(r["budget"]) == b and int(r.get("seed") or 0) == first_seed]
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


def _run_group(name: str) -> tuple[str, str]:
    """(algorithm, budget) of an agent run directory named ``<algo>-b<budget>[-s<seed>]``; else (name, "")."""
    parts = name.split("-")
    if len(parts) >= 2 and parts[1].startswith("b"):
        return parts[0], parts[1][1:]
    return name, ""


def plot_reward_curves(agents_dir: Path, path: Path) -> None:
    """Per budget (one panel each) and algorithm: the episode reward, mean over seeds with a min-max band, and
    the best-so-far mean."""
    logs = sorted(agents_dir.glob("*/episodes.csv")) if agents_dir.exists() else []
    curves: dict[tuple[str, str], list[np.ndarray]] = {}
    for log in logs:
        with open(log, newline="") as f:
            rewards = [float(x["reward"]) for x in csv.DictReader(f)]
        if rewards:
            curves.setdefault(_run_group(log.parent.name), []).append(np.array(rewards))
    if not curves:
        return
    plt = _plt()
    budgets = sorted({b for _, b in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), dpi=110, squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for (algo, b), runs in sorted(curves.items()):
            if b != budget:
                continue
            n = min(len(r) for r in runs)
            r = np.stack([run[:n] for run in runs])
            x = np.arange(1, n + 1)
            line, = ax.plot(x, r.mean(0), lw=1.0, label=f"{algo} reward ({len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(x, r.min(0), r.max(0), color=line.get_color(), alpha=0.2, lw=0)
            ax.plot(x, np.maximum.accumulate(r, axis=1).mean(0), lw=1.8, ls="--", color=line.get_color(),
                    label=f"{algo} best so far")
        ax.set_title(f"budget {budget}" if budget else "agents")
        ax.set_xlabel("episode")
        ax.set_ylabel("reward (mean over seeds, band: min-max)")
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
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run every (method, budget, seed) cell as a Ray task (and --fidelity's plans on Ray "
                        "actors): on a local Ray, or on the cluster at ADDRESS (ray_grid.py: the cache and --out "
                        "must be on a path every node sees)")
    p.add_argument("--latency", choices=LATENCY, default="device",
                   help="time the exported nets on the benchmark's device (default), on the CPU, or both")
    p.add_argument("--latency-rounds", type=int, default=3, metavar="N",
                   help="time each exported net and the unpruned one alternately N times, keep the best of each")
    p.add_argument("--fidelity", type=int, default=0, metavar="K",
                   help="also score K random plans on the reward split and fine-tune them: Spearman correlation "
                        "with their test accuracy after the fine-tune (fidelity.json, fidelity.csv; first budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="run every stochastic part once per seed; results.md gives means and intervals")
    p.add_argument("--out", default="results")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="run nothing: gather the results.csv rows and agents of these benchmark outputs into "
                        "--out and write its results.md and plots (runs split across processes or machines; "
                        "give their --env and --finetune-steps)")
    p.add_argument("--retime", choices=[x for x in LATENCY if x != "none"], default=None,
                   help="run nothing: time the exported nets of --out's rows (after --merge, if given) again, "
                        "serially, here: on the CPU, the device or both (for a grid run with --latency none or "
                        "beside other work)")
    args = p.parse_args(argv)
    if args.merge or args.retime:
        try:
            if args.merge:
                merge([Path(d) for d in args.merge], Path(args.out), args.env, args.finetune_steps)
            if args.retime:
                retime(Path(args.out), envs.resolve_env_id(args.env), args.finetune_steps, args.retime,
                       parse_key_values(args.env_kwargs, "--env-kwargs"))
        except ValueError as exc:
            p.error(str(exc))
        print((Path(args.out) / "results.md").read_text())
        return 0
    if args.latency_rounds < 1:
        p.error(f"--latency-rounds {args.latency_rounds} must be >= 1")
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
                     Path(args.out), env_kwargs, runs, args.seeds, device=args.device, latency=args.latency,
                     ray_address=args.ray, latency_rounds=args.latency_rounds)
    if args.fidelity:
        env = gym.make(args.env, budget=args.budgets[0], **{**env_kwargs, "device": args.device or
                                                            env_kwargs.get("device", "auto")}).unwrapped
        result = fidelity(env, args.fidelity, args.finetune_steps, Path(args.out), seed=args.seeds[0],
                          ray_address=args.ray)
        (Path(args.out) / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"fidelity: Spearman {result['spearman']:.3f} (p = {result['p_value']:.3g}) between reward-split "
              f"accuracy and test accuracy after {args.finetune_steps} fine-tune steps, {result['plans']} random "
              f"plans at budget {result['budget']}")
    print((Path(args.out) / "results.md").read_text())
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
