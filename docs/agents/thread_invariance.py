"""Does a worker's thread count change a plan's score, and how much faster are two threads than one? (issue 13
item 3: a worker that evaluates alone takes its idle siblings' cores, envs.cores; docs/reports/agents.md, "Idle
cores, and checks that do not stop training"). From the repository root:

    python docs/agents/thread_invariance.py RUN [EPISODE ...]

For each listed episode of an `agents.train` run on ChannelPrune-ResNet18-v0 (default: 1, 100, 301, 686, 801),
prunes its plan, recalibrates BN at one thread (as a worker does), then scores the whole reward split at one and
at two threads. Prints both (accuracy, loss) pairs, whether they are equal to the last bit, and the seconds each
took."""
import csv
import json
import sys
import time
from pathlib import Path

import gymnasium as gym
import torch
import yaml

import envs  # noqa: F401 - registers the ids


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit("usage: thread_invariance.py RUN [EPISODE ...]")
    run = Path(sys.argv[1])
    wanted = [int(e) for e in sys.argv[2:]] or [1, 100, 301, 686, 801]
    config = yaml.safe_load((run / "config.yaml").read_text())
    with open(run / "episodes.csv", newline="") as f:
        rows = {int(r["episode"]): r for r in csv.DictReader(f)}
    torch.set_num_threads(1)
    env = gym.make(config["env_id"], **config["env_kwargs"]).unwrapped
    problem = env.problem
    for episode in wanted:
        kept, rt = env.cost.plan_counts(json.loads(rows[episode]["keep_ratios"]))
        torch.set_num_threads(1)
        pruned = problem.build_pruned(kept, rt)
        problem.recalibrate_bn(pruned)
        scores, seconds = [], []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            scores.append(problem.evaluate(pruned, "reward"))
            seconds.append(time.perf_counter() - t0)
        same = "equal" if scores[0] == scores[1] else "DIFFERENT"
        print(f"episode {episode}: 1 thread {scores[0]} in {seconds[0]:.1f} s, 2 threads {scores[1]} in "
              f"{seconds[1]:.1f} s: {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
