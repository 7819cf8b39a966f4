"""Would more rungs have stopped an agent's near-best plans, and would they have stopped its best? (issue 13,
items 2 and 3; docs/reports/agents.md, "A second rung"). From the repository root:

    python docs/agents/rung_replay.py RUN --rungs 500 1000 --out OUT.json

RUN is an `agents.train` run raced with `screen_size` (one rung or several). Its episodes scored in full have a known
whole-split accuracy (their reward); this script scores each of them again on the first images at every rung of
`--rungs` (BN recalibration included, the env's evaluator) and replays the run's race in episode order: the bar
is the best whole-split accuracy so far, as the run's one shared race had it, and a plan stops at the first rung
where `envs.screening.Screen` (with the finite-population factor) says it can no longer win. Reported: how many
of the run's full scores each rung would have stopped, the images saved, and every stopped plan that would have
raised the bar (a miss). Plans the run stopped early count the images the run scored: give `--rungs` that include
the run's own, so the new rule is nowhere looser (the factor `(N - n) / N` only tightens it)."""
import argparse
import csv
import json
import sys
import time
from pathlib import Path

import gymnasium as gym
import yaml

import envs  # noqa: F401 - registers the ids
from baselines.experiments.screening import score_in_parts
from envs.screening import Screen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--rungs", type=int, nargs="+", default=[500, 1000])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    with open(args.run / "episodes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    total = max(int(r["images_scored"]) for r in rows)
    kwargs = {k: v for k, v in config["env_kwargs"].items() if k != "screen_size"}
    env = gym.make(config["env_id"], **kwargs).unwrapped
    problem = env.problem
    rungs = sorted(args.rungs)
    screen, t0 = Screen(tuple(rungs)), time.perf_counter()
    stopped = dict.fromkeys(rungs + [total], 0)
    misses, images, images_before = [], 0, 0
    for r in rows:
        full = int(r["images_scored"]) == total
        images_before += int(r["images_scored"])
        if not full:  # stopped at the first rung by the run's own (looser) rule
            images += int(r["images_scored"])
            continue
        kept, rt = env.cost.plan_counts(json.loads(r["keep_ratios"]))
        acc = float(r["accuracy"])
        at = {n: r["accuracy"] for n, r in score_in_parts(problem, kept, rt, rungs)["rungs"].items()}
        stop = next((n for n in rungs if not screen.can_win(at[n], n, total)), total)
        stopped[stop] += 1
        images += stop
        if stop < total and acc > screen.best:
            misses.append({"episode": int(r["episode"]), "accuracy": acc, "bar": screen.best, "stopped_at": stop})
        if stop == total or acc > screen.best:  # the bar follows the run's (it moved on a miss too)
            screen.record(acc)
    out = {"run": str(args.run), "rungs": rungs, "episodes": len(rows),
           "scored_in_full_by_the_run": sum(int(r["images_scored"]) == total for r in rows),
           "stopped_at": stopped, "misses": misses, "images_per_episode_run": images_before / len(rows),
           "images_per_episode_replayed": images / len(rows), "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    json.dump(out, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
