"""Does per-input (runtime) gating keep more accuracy than static pruning at the same effective FLOPs?

    python -m baselines.experiments.runtime_gating --env ChannelPrune-ResNet18-v0 --budgets 0.3 0.5 \\
        --seeds 0 1 2 [--gate-steps 100] [--finetune-steps 200] [--device auto] --out results/runtime-gating

Two plans at each effective-FLOPs budget F, both ranked by the env's static scorer:

* ``static``: every group keeps the same share ``u`` of its channels, ``u`` the largest with FLOPs <= F;
* ``runtime``: the residual-stream (ungated) groups keep the same share ``u`` statically; the gated
  block-internal groups keep all their channels in storage and each input computes the share ``q`` of them
  its gates rank highest, ``q`` the largest with effective FLOPs <= F (the gates' own MACs included).

So the internal groups compute about as many channels per input in both plans; what differs is whether they are
the same channels for every input. The runtime plan is run with two kinds of gates (``envs.gates``): ``ridge``
(regressed onto activations, deterministic) and ``trained`` (trained end to end through the frozen network for
``--gate-steps`` steps; one training per seed; ``--arms`` picks which are fine-tuned). Each plan's BatchNorm
statistics are re-estimated on the calibration split and its accuracy measured on the test split; then the
common fine-tune (``envs.finetune``, ``--finetune-steps`` steps, the seed) trains the network with the gates
fixed, and the test accuracy is measured again (``after``). Last (``after_regated``), the runtime plan's gates
are trained again for ``--gate-steps`` steps, now through the fine-tuned network at the plan's runtime share, and
both plans' BN statistics are re-estimated before a third measurement. The ``joint`` arm is the runtime plan
with the seed's trained gates fine-tuned *together* with the network, as FBS trains its gates
(``envs.gates.finetune_with_gates``: the same recipe and steps for the network, the relaxed top-k masks at the
plan's runtime share in place, the gates trained by Adam alongside); it has an ``after`` row only. Seeds vary
the gate trainings and the fine-tune; the static plan before fine-tuning is deterministic.

The goal (issue 12): runtime mode at least 1 point above static at equal effective FLOPs at budget 0.3, with its
whole interval over seeds, judged per runtime arm and phase. ``runtime-gating.md`` states whether it is met;
``runtime-gating.csv`` has one line per (budget, arm, seed, phase), written as each finishes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

import gymnasium as gym

from envs.finetune import finetune
from envs.gates import finetune_with_gates, train_gates_end_to_end
from envs.machine import backend
from envs.problem import PruningProblem
from envs.runtime import install_gates

from .cli import add_env_arguments, env_from_arguments
from .stats import CONFIDENCE, estimate

ARMS = ("static", "ridge", "trained", "joint")
GOAL_ARMS = ("trained", "joint")
GOAL_POINTS = 0.01
GOAL_BUDGET = 0.3
FIELDS = ("budget", "arm", "seed", "phase", "test_acc", "effective_flops", "params_ratio", "keep_static",
          "runtime_ratio", "seconds")


RUNTIME_PLANS = ("shared", "whole")


def _check_runtime_plan(runtime_plan: str) -> None:
    if runtime_plan not in RUNTIME_PLANS:
        raise ValueError(f"runtime_plan={runtime_plan!r} is not allowed; allowed: {', '.join(RUNTIME_PLANS)}")


def equal_flops_plans(problem: PruningProblem, runtime_plan: str = "shared"
                      ) -> dict[str, tuple[list[int], list[int], float, float]]:
    """The static and the runtime plan at ``problem``'s budget (module docstring): per arm the channel counts
    (kept, computed per input), the static share of the ungated groups and the runtime share.
    ``runtime_plan="whole"`` keeps the ungated (residual-stream) groups whole in the runtime plan instead of
    cutting them to ``u``: all of the network is stored, and the gated groups compute less per input to pay."""
    _check_runtime_plan(runtime_plan)
    cost, n = problem.cost, problem.n_groups
    u = cost.fit_parameter(lambda v: ([v] * n, None), cost.min_keep, 1.0)
    static = cost.plan_counts([u] * n)
    ungated = u if runtime_plan == "shared" else 1.0
    storage = [1.0 if problem.gated[i] else ungated for i in range(n)]
    q = cost.fit_parameter(lambda v: (storage, [v] * n), cost.min_keep, 1.0)
    runtime = cost.plan_counts(storage, [q] * n)
    return {"static": (*static, u, 1.0), "runtime": (*runtime, ungated, q)}


def _before(problem: PruningProblem, kept, rt) -> float:
    net = problem.build_pruned(kept, rt)
    problem.recalibrate_bn(net)
    return problem.evaluate(net, "test")[0]


def _gated_and_recalibrated(problem: PruningProblem, kept, rt, specs: dict):
    """The plan's pruned network with ``specs``' gates installed (hook handles) and its BN re-estimated."""
    net = problem.build_pruned(kept, rt, gates=False)
    handles = install_gates(net, list(specs.values()))
    problem.recalibrate_bn(net)
    return net, handles


def _sliced(specs: dict) -> dict:
    return {f"gate{i}.{k}": getattr(spec, k) for i, spec in specs.items() for k in ("weight", "bias")}


def _with_gates(specs: dict, gates: dict) -> list:
    return [dataclasses.replace(spec, weight=gates[f"gate{i}.weight"], bias=gates[f"gate{i}.bias"])
            for i, spec in specs.items()]


def _after(problem: PruningProblem, kept, rt, runtime_share: float | None, finetune_steps: int, gate_steps: int,
           seed: int, progress: bool) -> tuple[float, float]:
    """Test accuracy after the common fine-tune (gates fixed), then after the gates are retrained through the
    fine-tuned network at the plan's runtime share (runtime plans; ``runtime_share`` None: static) and the BN
    statistics re-estimated (both plans)."""
    specs = problem.gate_specs(kept, rt) if runtime_share is not None else {}
    net, handles = _gated_and_recalibrated(problem, kept, rt, specs)
    finetune(net, problem.data, finetune_steps, seed=seed, progress=progress, device=problem.device)
    after = problem.evaluate(net, "test")[0]
    if specs:
        for h in handles:
            h.remove()
        gates, _ = train_gates_end_to_end(net, problem.graph, _sliced(specs), problem.data.train, steps=gate_steps,
                                          ratio_range=(runtime_share, runtime_share), seed=seed,
                                          device=problem.device, progress=progress)
        install_gates(net, _with_gates(specs, gates))
    problem.recalibrate_bn(net)
    return after, problem.evaluate(net, "test")[0]


def _after_joint(problem: PruningProblem, kept, rt, runtime_share: float, finetune_steps: int, seed: int,
                 progress: bool) -> float:
    """Test accuracy after the gates and the network are fine-tuned together (the ``joint`` arm); the BN
    statistics are those of the fine-tune, as in the ``after`` phase of the other arms."""
    specs = problem.gate_specs(kept, rt)
    net, handles = _gated_and_recalibrated(problem, kept, rt, specs)
    for h in handles:
        h.remove()
    net, gates = finetune_with_gates(net, problem.graph, _sliced(specs), problem.data, finetune_steps,
                                     runtime_share, seed=seed, device=problem.device, progress=progress)
    install_gates(net, _with_gates(specs, gates))
    return problem.evaluate(net, "test")[0]


def compare(env_id: str, budgets: Sequence[float], seeds: Sequence[int], out: Path, arms: Sequence[str] = ARMS,
            gate_steps: int = 100, finetune_steps: int = 200, env_kwargs: dict | None = None,
            progress: bool = True, runtime_plan: str = "shared") -> dict:
    """Run the comparison (module docstring); writes ``runtime-gating.csv`` and ``runtime-gating.md`` into
    ``out`` and returns the summary."""
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ValueError(f"arms={list(arms)!r}: allowed {', '.join(ARMS)}")
    _check_runtime_plan(runtime_plan)  # before the env is built
    if not budgets or any(not 0.0 < b < 1.0 for b in budgets):
        raise ValueError(f"budgets={list(budgets)!r} must be effective-FLOPs budgets in (0, 1)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)!r} must be distinct integers, at least one")
    if not (isinstance(finetune_steps, int) and finetune_steps >= 0):
        raise ValueError(f"finetune_steps={finetune_steps!r} must be an integer >= 0")
    # the ridge gates are the "ridge" arm and where each seed's trained gates start
    kwargs = {**(env_kwargs or {}), "mode": "runtime", "runtime_gates": "ridge", "budget": budgets[0],
              "progress": progress}
    base = gym.make(env_id, **kwargs).unwrapped.problem
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runtime-gating.csv"
    lines: list[dict] = []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()

        def record(budget, arm, seed, phase, acc, plan, problem, t0):
            kept, rt, u, q = plan
            r = problem.cost.ratios(kept, rt)
            line = {"budget": budget, "arm": arm, "seed": seed, "phase": phase, "test_acc": acc,
                    "effective_flops": r["effective"], "params_ratio": r["params"], "keep_static": u,
                    "runtime_ratio": q, "seconds": time.perf_counter() - t0}
            lines.append(line)
            writer.writerow(line)
            f.flush()
            print(f"[runtime-gating] budget {budget} {arm} seed {seed} {phase}: {acc:.4f}", file=sys.stderr)

        for budget in budgets:
            problem = base.with_budget(budget)
            plans = equal_flops_plans(problem, runtime_plan)
            for arm in ("static", "ridge"):  # deterministic before the fine-tune (and cheap): once each
                plan = plans["static" if arm == "static" else "runtime"]
                t0 = time.perf_counter()
                record(budget, arm, None, "before", _before(problem, *plan[:2]), plan, problem, t0)
            for seed in seeds:
                gated = {"static": problem, "ridge": problem}
                if "trained" in arms or "joint" in arms:
                    t0 = time.perf_counter()
                    gates, _ = train_gates_end_to_end(problem.base_model, problem.graph, problem.predictors.gates,
                                                      problem.data.train, steps=gate_steps, seed=seed,
                                                      device=problem.device, progress=progress)
                    gated["trained"] = gated["joint"] = problem.with_gates(gates)
                    record(budget, "trained", seed, "before", _before(gated["trained"], *plans["runtime"][:2]),
                           plans["runtime"], problem, t0)
                if not finetune_steps:
                    continue
                for arm in arms:
                    plan = plans["static" if arm == "static" else "runtime"]
                    t0 = time.perf_counter()
                    share = None if arm == "static" else plan[3]
                    if arm == "joint":
                        after = _after_joint(gated[arm], *plan[:2], share, finetune_steps, seed, progress)
                        record(budget, arm, seed, "after", after, plan, problem, t0)
                        continue
                    after, regated = _after(gated[arm], *plan[:2], share, finetune_steps, gate_steps, seed,
                                            progress)
                    record(budget, arm, seed, "after", after, plan, problem, t0)
                    record(budget, arm, seed, "after_regated", regated, plan, problem, t0)
    summary = summarize(lines)
    write_markdown(summary, lines, out / "runtime-gating.md", env_id, len(base.data.test),
                   backend(base.device).machine, gate_steps, finetune_steps)
    return summary


def summarize(lines: list[dict]) -> dict:
    """Per (budget, arm, phase) the mean test accuracy and interval; per budget and phase each runtime arm's
    difference to static (paired by seed after the fine-tune); whether the goal is met."""
    est = {}
    for key in {(line["budget"], line["arm"], line["phase"]) for line in lines}:
        est[key] = estimate([line["test_acc"] for line in lines if (line["budget"], line["arm"], line["phase"])
                             == key])
    diffs = {}
    for (budget, arm, phase) in est:
        if arm == "static":
            continue
        static = {line["seed"]: line["test_acc"] for line in lines
                  if (line["budget"], line["arm"], line["phase"]) == (budget, "static", phase)}
        mine = [line for line in lines if (line["budget"], line["arm"], line["phase"]) == (budget, arm, phase)]
        paired = [line["test_acc"] - static.get(line["seed"], static.get(None, float("nan"))) for line in mine]
        diffs[budget, arm, phase] = estimate(paired)
    goal = {(arm, phase): d.n >= 2 and d.low >= GOAL_POINTS for (b, arm, phase), d in diffs.items()
            if b == GOAL_BUDGET and arm in GOAL_ARMS}
    return {"estimates": est, "differences": diffs, "goal_met": goal}


PHASES = {"before": "before the fine-tune", "after": "after the fine-tune (gates fixed; joint: trained with it)",
          "after_regated": "after the fine-tune, gates retrained, BN recalibrated"}


def write_markdown(summary: dict, lines: list[dict], path: Path, env_id: str, test_images: int | str, machine: str,
                   gate_steps: int, finetune_steps: int) -> None:
    est, diffs = summary["estimates"], summary["differences"]
    info = {(line["budget"], line["arm"]): line for line in lines}
    phases = [ph for ph in PHASES if any(key[2] == ph for key in est)]
    md = [f"Runtime gating against static pruning at equal effective FLOPs on {env_id} "
          f"({test_images} test images; {machine}). Gates trained for "
          f"{gate_steps} steps; the common fine-tune for {finetune_steps} steps. Test accuracy, mean "
          f"[{int(CONFIDENCE * 100)}% t interval] over seeds (a single value is deterministic), and its "
          "difference to static (paired by seed after the fine-tune).", "",
          "| budget | arm | keep (static) | runtime share | eff. FLOPs | params | "
          + " | ".join(f"{PHASES[ph]} | vs static" for ph in phases) + " |",
          "|" + "---|" * (6 + 2 * len(phases))]
    for budget in sorted({b for b, _, _ in est}):
        for arm in ARMS:
            if (budget, arm) not in info:
                continue
            line = info[budget, arm]
            cells = []
            for phase in phases:
                e, d = est.get((budget, arm, phase)), diffs.get((budget, arm, phase))
                cells += [e.text() if e else "-", d.text("{:+.4f}") if d else ""]
            md.append(f"| {budget} | {arm} | {line['keep_static']:.3f} | {line['runtime_ratio']:.3f} | "
                      f"{line['effective_flops']:.3f} | {line['params_ratio']:.3f} | " + " | ".join(cells) + " |")
    for (arm, phase), met in sorted(summary["goal_met"].items()):
        md.append(f"\nGoal at budget {GOAL_BUDGET}, {PHASES[phase]}: {arm} gates at least "
                  f"{100 * GOAL_POINTS:.0f} point above static with the whole interval: "
                  f"**{'met' if met else 'not met'}**.")
    path.write_text("\n".join(md) + "\n")


def merge(dirs: Sequence[Path], out: Path, env_id: str, test_images: int | str, machine: str, gate_steps: int,
          finetune_steps: int) -> dict:
    """Summarise the ``runtime-gating.csv`` of runs that split the seeds (deterministic rows counted once)."""
    lines, seen = [], set()
    for d in dirs:
        with open(Path(d) / "runtime-gating.csv", newline="") as f:
            for row in csv.DictReader(f):
                line = {k: (float(v) if k not in ("arm", "seed", "phase") else v) for k, v in row.items()}
                line["seed"] = int(row["seed"]) if row["seed"] else None
                key = (line["budget"], line["arm"], line["seed"], line["phase"])
                if key not in seen:
                    seen.add(key)
                    lines.append(line)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runtime-gating.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(lines)
    summary = summarize(lines)
    write_markdown(summary, lines, out / "runtime-gating.md", env_id, test_images, machine, gate_steps,
                   finetune_steps)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baselines.experiments.runtime_gating", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_env_arguments(p)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--runtime-plan", default="shared", choices=RUNTIME_PLANS,
                   help="the runtime plan's ungated groups: cut like the static plan's (shared) or kept whole")
    p.add_argument("--gate-steps", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--out", default="results/runtime-gating")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="only summarise the CSVs of these runs (split seeds) into --out; nothing is run")
    p.add_argument("--merge-machine", default="", help="with --merge: the machine the runs were timed on")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        env_id, kwargs = env_from_arguments(args)
        if args.merge:
            merge([Path(d) for d in args.merge], Path(args.out), env_id, args.test_size or "all",
                  args.merge_machine, args.gate_steps, args.finetune_steps)
        else:
            compare(env_id, args.budgets, args.seeds, Path(args.out), args.arms, args.gate_steps,
                    args.finetune_steps, kwargs, progress=not args.no_progress, runtime_plan=args.runtime_plan)
    except ValueError as exc:
        p.error(str(exc))
    print((Path(args.out) / "runtime-gating.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
