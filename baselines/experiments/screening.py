"""How well the first images of the reward split rank plans, and what racing them saves (``screen_size``).

    python -m baselines.experiments.screening --env ChannelPrune-ResNet18-v0 --budgets 0.3 0.5 --plans 60 \\
        --first 250 500 1000 --out results/screening

For each budget, ``--plans`` random budget-fitted plans (random search's candidates, ``budget_plans``) are pruned,
BN-recalibrated once and scored on the reward split in parts cut at every ``--first`` size (one pass over the
split, each part timed). The report (``screening.json``, ``screening.md``) gives per budget and first-rung size:

* the Spearman rank correlation between the first-rung accuracy and the whole split's;
* racing (``envs.screening.Screen``) replayed over ``--orders`` random orders of the plans, the orders in which a
  search could meet them: the fraction of plans scored in full, the images scored per plan, the speed-up of the
  evaluation, how often the race's best is the whole split's best, and the accuracy lost when it is not;
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
from envs.screening import Screen, combine


def score_plans(env, plans: int, firsts: list[int], seed: int = 0) -> list[dict]:
    """``plans`` random plans at ``env``'s budget, each recalibrated once and scored on the reward split in parts
    cut at ``firsts``: the accuracy and the seconds of every first rung, and of the whole split."""
    problem = env.problem
    reward = problem.data.reward
    cuts = sorted(set(firsts))
    if not (cuts and cuts[0] >= 1 and cuts[-1] < len(reward)):
        raise ValueError(f"first={firsts!r}: every value must be in [1, {len(reward) - 1}] (the reward split has "
                         f"{len(reward)} images)")
    rows = []
    for plan, ratio in budget_plans(env, np.random.default_rng(seed), plans)[0]:
        kept, rt = env.cost.plan_counts(plan)
        t0 = time.perf_counter()
        pruned = problem.build_pruned(kept, rt)
        problem.recalibrate_bn(pruned)
        row = {"cost_ratio": ratio, "recal_seconds": time.perf_counter() - t0, "rungs": {}}
        acc, seconds, start = (0.0, 0.0), 0.0, 0
        for stop in cuts + [len(reward)]:
            t = time.perf_counter()
            part = problem.evaluate_on(pruned, reward.part(start, stop))
            seconds += time.perf_counter() - t
            acc = combine(acc, start, part, stop - start) if start else part
            row["rungs"][stop] = {"accuracy": acc[0], "seconds": seconds}
            start = stop
        row["accuracy"] = acc[0]
        rows.append(row)
    return rows


def race(first_acc: np.ndarray, full_acc: np.ndarray, first: int, total: int, orders: int, z: float = 2.0,
         seed: int = 0) -> dict:
    """Racing replayed over ``orders`` random orders of the plans: what a search with ``screen_size=first`` would
    have scored and chosen."""
    rng = np.random.default_rng(seed)
    full_frac, found_best, regret = [], [], []
    for _ in range(orders):
        screen, scored = Screen(first, z), []
        for i in rng.permutation(len(first_acc)):
            if screen.can_win(float(first_acc[i])):
                screen.record(float(full_acc[i]))
                scored.append(i)
        best = float(full_acc[scored].max())
        full_frac.append(len(scored) / len(first_acc))
        found_best.append(best == float(full_acc.max()))
        regret.append(float(full_acc.max()) - best)
    frac = float(np.mean(full_frac))
    images = first + frac * (total - first)
    return {"orders": orders, "z": z, "scored_in_full": frac, "images_per_plan": images,
            "image_speedup": total / images, "found_best": float(np.mean(found_best)),
            "mean_regret": float(np.mean(regret)), "max_regret": float(np.max(regret))}


def report(env_id: str, budgets: list[float], plans: int, firsts: list[int], orders: int, env_kwargs: dict,
           seed: int = 0) -> dict:
    out = {"env": env_id, "env_kwargs": env_kwargs, "plans": plans, "firsts": firsts, "seed": seed, "budgets": {}}
    base = gym.make(env_id, budget=budgets[0], **env_kwargs).unwrapped
    out["machine"] = backend(base.device).machine
    for budget in budgets:
        env = base.derive(budget=budget)
        rows = score_plans(env, plans, firsts, seed)
        total = len(env.problem.data.reward)
        full_acc = np.array([r["accuracy"] for r in rows])
        recal = float(np.mean([r["recal_seconds"] for r in rows]))
        full_s = recal + float(np.mean([r["rungs"][total]["seconds"] for r in rows]))
        per_first = {}
        for first in firsts:
            first_acc = np.array([r["rungs"][first]["accuracy"] for r in rows])
            first_s = float(np.mean([r["rungs"][first]["seconds"] for r in rows]))
            rho, p = stats.spearmanr(first_acc, full_acc)
            rc = race(first_acc, full_acc, first, total, orders, seed=seed)
            raced_s = recal + first_s + rc["scored_in_full"] * (full_s - recal - first_s)
            per_first[str(first)] = {"spearman": float(rho), "p_value": float(p), "race": rc,
                                     "first_seconds": first_s, "raced_seconds_per_plan": raced_s,
                                     "plan_speedup": full_s / raced_s}
        out["budgets"][str(budget)] = {"reward_images": total, "accuracy_range": [float(full_acc.min()),
                                                                                  float(full_acc.max())],
                                       "recal_seconds": recal, "full_seconds_per_plan": full_s,
                                       "first": per_first, "plans": rows}
    return out


def markdown(result: dict) -> str:
    lines = ["# Racing the reward split: the first images, the rest only when a plan can still win", "",
             f"`{result['env']}` {result['env_kwargs']}, {result['plans']} random budget-fitted plans per budget "
             f"(seed {result['seed']}), racing replayed over {result_orders(result)} random orders; machine: "
             f"{result['machine']}. Seconds per plan include the BN recalibration.", "",
             "| budget | first images | Spearman (first vs whole split) | reward accuracy range | "
             "scored in full | "
             "images per plan | race finds the best | mean / max accuracy lost | seconds per plan: whole, raced | "
             "speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b, r in result["budgets"].items():
        for first, f in r["first"].items():
            rc = f["race"]
            lines.append(f"| {b} | {first} | {f['spearman']:.3f} | {r['accuracy_range'][0]:.3f}-"
                         f"{r['accuracy_range'][1]:.3f} | {rc['scored_in_full']:.0%} | "
                         f"{rc['images_per_plan']:.0f} of "
                         f"{r['reward_images']} | {rc['found_best']:.0%} | {rc['mean_regret']:.4f} / "
                         f"{rc['max_regret']:.4f} | {r['full_seconds_per_plan']:.2f}, "
                         f"{f['raced_seconds_per_plan']:.2f} | {f['plan_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def result_orders(result: dict) -> int:
    first = next(iter(result["budgets"].values()))["first"]
    return next(iter(first.values()))["race"]["orders"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="ChannelPrune-ResNet18-v0")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--plans", type=int, default=60)
    p.add_argument("--first", type=int, nargs="+", default=[250, 500, 1000],
                   help="first-rung sizes compared (images of the reward split scored first)")
    p.add_argument("--orders", type=int, default=1000, help="random orders the race is replayed over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/screening")
    args = p.parse_args(argv)
    if args.plans < 3:
        p.error(f"--plans {args.plans} must be at least 3 (a rank correlation of fewer means nothing)")
    result = report(args.env, args.budgets, args.plans, args.first, args.orders, parse_key_values(args.env_kwargs),
                    args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "screening.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "screening.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
