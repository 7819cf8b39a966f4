"""How well the first images of the reward split rank plans, and what racing them saves (``screen_size``).

    python -m baselines.experiments.screening --env ChannelPrune-ResNet18-v0 --budgets 0.3 0.5 --plans 60 \\
        --races 250 500 1000 500,1000 --out results/screening

For each budget, ``--plans`` random budget-fitted plans (random search's candidates, ``budget_plans``) are pruned,
BN-recalibrated once and scored on the reward split in parts cut at every rung of every race (one pass over the
split, each part timed). A race is a ``screen_size``: one first-rung size (``500``) or rungs (``500,1000``). The
report (``screening.json``, ``screening.md``) gives per budget and race:

* the Spearman rank correlation between the first-rung accuracy and the whole split's;
* racing (``envs.screening.Screen``) replayed over ``--orders`` random orders of the plans, the orders in which a
  search could meet them: the fraction of plans scored in full, the images scored per plan, how often the race's
  best is the whole split's best, and the accuracy lost when it is not;
* seconds per plan scored on the whole split and raced (BN recalibration included), and their ratio.

Every number comes from the reward split (the selection split); the test split is not touched.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from scipy import stats

import envs  # noqa: F401 - registers the ids
from baselines.random_search import budget_plans
from envs.cli import parse_key_values
from envs.machine import backend
from envs.screening import Screen, check_rungs, combine


def score_in_parts(problem, kept, rt, cuts: list[int]) -> dict:
    """One plan pruned, BN-recalibrated once and scored on the first images of the reward split part by part, up
    to each of ``cuts`` (increasing; the last is where it stops): the recalibration seconds and, per cut, the
    accuracy on the images so far and the cumulative seconds."""
    reward = problem.data.reward
    t0 = time.perf_counter()
    pruned = problem.build_pruned(kept, rt)
    problem.recalibrate_bn(pruned)
    row = {"recal_seconds": time.perf_counter() - t0, "rungs": {}}
    acc, seconds, start = (0.0, 0.0), 0.0, 0
    for stop in cuts:
        t = time.perf_counter()
        part = problem.evaluate_on(pruned, reward.part(start, stop))
        seconds += time.perf_counter() - t
        acc = combine(acc, start, part, stop - start) if start else part
        row["rungs"][stop] = {"accuracy": acc[0], "seconds": seconds}
        start = stop
    return row


def score_plans(env, plans: int, rungs: list[int], seed: int = 0) -> list[dict]:
    """``plans`` random plans at ``env``'s budget, each scored by ``score_in_parts`` at ``rungs`` and on the whole
    split (``accuracy``), with its cost ratio."""
    reward = env.problem.data.reward
    cuts = sorted(set(rungs))
    if not (cuts and cuts[0] >= 1 and cuts[-1] < len(reward)):
        raise ValueError(f"rungs={rungs!r}: every value must be in [1, {len(reward) - 1}] (the reward split has "
                         f"{len(reward)} images)")
    rows = []
    for plan, ratio in budget_plans(env, np.random.default_rng(seed), plans)[0]:
        row = score_in_parts(env.problem, *env.cost.plan_counts(plan), cuts + [len(reward)])
        rows.append({"cost_ratio": ratio, **row, "accuracy": row["rungs"][len(reward)]["accuracy"]})
    return rows


def race(rung_acc: dict[int, np.ndarray], full_acc: np.ndarray, total: int, orders: int, z: float = 2.0,
         seed: int = 0) -> dict:
    """Racing replayed over ``orders`` random orders of the plans: what a search with ``screen_size`` set to the
    rungs of ``rung_acc`` (rung size -> every plan's accuracy on that many first images) would have scored and
    chosen."""
    rungs = tuple(sorted(rung_acc))
    rng = np.random.default_rng(seed)
    stops = dict.fromkeys(rungs + (total,), 0)
    full_frac, found_best, regret = [], [], []
    for _ in range(orders):
        screen, scored = Screen(rungs, z), []
        for i in rng.permutation(len(full_acc)):
            stop = next((n for n in rungs if not screen.can_win(float(rung_acc[n][i]), n, total)), total)
            stops[stop] += 1
            if stop == total:
                screen.record(float(full_acc[i]))
                scored.append(i)
        best = float(full_acc[scored].max())
        full_frac.append(len(scored) / len(full_acc))
        found_best.append(best == float(full_acc.max()))
        regret.append(float(full_acc.max()) - best)
    share = {n: c / (orders * len(full_acc)) for n, c in stops.items()}
    images = sum(n * f for n, f in share.items())
    return {"orders": orders, "z": z, "rungs": list(rungs), "stopped_at": {str(n): f for n, f in share.items()},
            "scored_in_full": float(np.mean(full_frac)), "images_per_plan": images,
            "image_speedup": total / images,
            "found_best": float(np.mean(found_best)), "mean_regret": float(np.mean(regret)),
            "max_regret": float(np.max(regret))}


def parse_race(text: str) -> tuple[int, ...]:
    """``"500"`` or ``"500,1000"``: the rungs of one race."""
    try:
        return check_rungs(tuple(int(n) for n in text.split(",")))
    except ValueError as e:
        raise ValueError(f"race {text!r}: {e}; allowed: rung sizes separated by commas, e.g. 500,1000") from None


def report(env_id: str, budgets: list[float], plans: int, races: list[tuple[int, ...]], orders: int,
           env_kwargs: dict, seed: int = 0) -> dict:
    out = {"env": env_id, "env_kwargs": env_kwargs, "plans": plans, "races": [list(r) for r in races],
           "seed": seed, "budgets": {}}
    base = gym.make(env_id, budget=budgets[0], **env_kwargs).unwrapped
    out["machine"] = backend(base.device).machine
    for budget in budgets:
        env = base.derive(budget=budget)
        rows = score_plans(env, plans, sorted({n for r in races for n in r}), seed)
        total = len(env.problem.data.reward)
        full_acc = np.array([r["accuracy"] for r in rows])
        recal = float(np.mean([r["recal_seconds"] for r in rows]))
        seconds = {n: float(np.mean([r["rungs"][n]["seconds"] for r in rows])) for n in rows[0]["rungs"]}
        per_race = {}
        for rungs in races:
            rung_acc = {n: np.array([r["rungs"][n]["accuracy"] for r in rows]) for n in rungs}
            rho, p = stats.spearmanr(rung_acc[rungs[0]], full_acc)
            rc = race(rung_acc, full_acc, total, orders, seed=seed)
            raced_s = recal + sum(f * seconds[int(n)] for n, f in rc["stopped_at"].items())
            per_race[",".join(map(str, rungs))] = {"spearman": float(rho), "p_value": float(p), "race": rc,
                                                   "raced_seconds_per_plan": raced_s,
                                                   "plan_speedup": (recal + seconds[total]) / raced_s}
        out["budgets"][str(budget)] = {"reward_images": total, "accuracy_range": [float(full_acc.min()),
                                                                                  float(full_acc.max())],
                                       "recal_seconds": recal, "full_seconds_per_plan": recal + seconds[total],
                                       "races": per_race, "plans": rows}
    return out


def markdown(result: dict) -> str:
    lines = ["# Racing the reward split: the first images, the rest only when a plan can still win", "",
             f"`{result['env']}` {result['env_kwargs']}, {result['plans']} random budget-fitted plans per budget "
             f"(seed {result['seed']}), racing replayed over {result_orders(result)} random orders; machine: "
             f"{result['machine']}. Seconds per plan include the BN recalibration.", "",
             "| budget | rungs | Spearman (first rung vs whole split) | reward accuracy range | "
             "scored in full | "
             "images per plan | race finds the best | mean / max accuracy lost | seconds per plan: whole, raced | "
             "speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b, r in result["budgets"].items():
        for rungs, f in r["races"].items():
            rc = f["race"]
            lines.append(f"| {b} | {rungs} | {f['spearman']:.3f} | {r['accuracy_range'][0]:.3f}-"
                         f"{r['accuracy_range'][1]:.3f} | {rc['scored_in_full']:.0%} | "
                         f"{rc['images_per_plan']:.0f} of "
                         f"{r['reward_images']} | {rc['found_best']:.0%} | {rc['mean_regret']:.4f} / "
                         f"{rc['max_regret']:.4f} | {r['full_seconds_per_plan']:.2f}, "
                         f"{f['raced_seconds_per_plan']:.2f} | {f['plan_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def result_orders(result: dict) -> int:
    races = next(iter(result["budgets"].values()))["races"]
    return next(iter(races.values()))["race"]["orders"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="ChannelPrune-ResNet18-v0")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--plans", type=int, default=60)
    p.add_argument("--races", nargs="+", default=["250", "500", "1000", "500,1000"],
                   help="races compared, each a screen_size: images scored first, or rungs separated by commas")
    p.add_argument("--orders", type=int, default=1000, help="random orders the race is replayed over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/screening")
    args = p.parse_args(argv)
    if args.plans < 3:
        p.error(f"--plans {args.plans} must be at least 3 (a rank correlation of fewer means nothing)")
    try:
        races = [parse_race(r) for r in args.races]
    except ValueError as e:
        p.error(f"--races: {e}")
    result = report(args.env, args.budgets, args.plans, races, args.orders, parse_key_values(args.env_kwargs),
                    args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "screening.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "screening.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
