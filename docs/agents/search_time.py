"""Where a training run's wall time went (issue 13, item 3: 800 episodes on ResNet-18 within 60 minutes on 2 CPU
cores; docs/reports/agents.md, "Search time on the AVX2 CPU"). From the repository root:

    python docs/agents/search_time.py RUN [RUN ...]

For each run directory of `agents.train`: its training seconds and episodes per minute (config.yaml), a table
by blocks of episodes (mean and best reward, episodes scored in full, wall seconds per episode) from
episodes.csv, its policy checks (selection.csv: how many were scored in full, the selected one) and, for runs
that record each episode's `eval_seconds` (2026-12-08 on), the wall time outside the evaluations: the parallel
envs step together, so each step that ends episodes lasts as long as its slowest evaluation, and what is left
is the rest of the search (policy, PPO updates, policy checks that stop training)."""
import csv
import sys
from pathlib import Path

import numpy as np
import yaml

BLOCKS = [(1, 100), (101, 200), (201, 400), (401, 600), (601, 800)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarize(run: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = read_csv(run / "episodes.csv")
    full = max(int(r["images_scored"]) for r in rows)
    # a run stopped by hand has no train_seconds: the wall clock at its last episode then
    seconds = float(config.get("train_seconds") or max(float(r["seconds"]) for r in rows))
    print(f"## {run}\n")
    print(f"{config['env_id']}, budget {config['env_kwargs'].get('budget')}, n_envs {config['n_envs']}, seed "
          f"{config['seed']}: {len(rows)} episodes + {config.get('selection_checks', 0)} checks in {seconds:.0f} s "
          f"({seconds / 60:.1f} min, {60 * len(rows) / seconds:.1f} episodes per minute); "
          f"{sum(int(r['images_scored']) == full for r in rows)} episodes scored in full\n")
    levels = sorted({int(r["images_scored"]) for r in rows})  # the race's rungs a plan stopped at, and the whole
    print("episodes by images scored: " + ", ".join(
        f"{n}: {sum(int(r['images_scored']) == n for r in rows)}" for n in levels) + "\n")
    print("| episodes | mean reward | best reward | scored in full | seconds per episode |\n|---|---|---|---|---|")
    before = 0.0
    for lo, hi in BLOCKS:
        block = [r for r in rows if lo <= int(r["episode"]) <= hi]
        if not block:
            break
        reward = np.array([float(r["reward"]) for r in block])
        end = max(float(r["seconds"]) for r in block)  # wall clock at the block's last episode (checks included)
        print(f"| {lo}-{hi} | {reward.mean():.4f} | {reward.max():.4f} | "
              f"{sum(int(r['images_scored']) == full for r in block)} | {(end - before) / len(block):.2f} |")
        before = end
    if rows[0].get("eval_seconds"):
        steps: dict[int, list[dict[str, str]]] = {}  # the episodes that ended at the same step of the vec env
        for r in rows:
            steps.setdefault(int(r["timesteps"]), []).append(r)
        slowest = sum(max(float(r["eval_seconds"]) for r in s) for s in steps.values())
        wall = max(float(r["seconds"]) for r in rows)
        # every episode also runs the calibration split once (BN recalibration; 512 images unless set)
        images = sum(int(r["images_scored"]) for r in rows) + len(rows) * config["env_kwargs"].get("calib_size", 512)
        print(f"wall {wall:.0f} s: the slowest evaluation of each step {slowest:.0f} s, outside the evaluations "
              f"{wall - slowest:.0f} s; {1000 * wall / images:.2f} s per 1,000 images evaluated (reward "
              "images scored and the recalibration's)\n")
    best = max(rows, key=lambda r: float(r["reward"]))
    print(f"\nbest reward {float(best['reward']):.4f} at episode {best['episode']}")
    if (run / "selection.csv").exists():
        checks = read_csv(run / "selection.csv")
        scored = [int(c["images_scored"]) == full for c in checks]
        chosen = max((c for c, s in zip(checks, scored) if s), key=lambda c: float(c["reward"]))
        print(f"checks: {len(checks)}, {sum(scored)} scored in full; selected check {chosen['check']} (after "
              f"{chosen['episodes']} episodes), reward {float(chosen['reward']):.4f}")
    print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: search_time.py RUN [RUN ...]")
    for arg in sys.argv[1:]:
        summarize(Path(arg))
