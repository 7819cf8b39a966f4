"""Aggregate evaluation throughput of K single-thread worker processes on this machine (issue 13 item 3: does a
third `--n-envs` worker on 2 cores slow the others down? docs/reports/agents.md, "A second rung and a third
worker"). From the repository root:

    python docs/agents/worker_throughput.py K SECONDS

Each worker builds ChannelPrune-ResNet18-v0 at budget 0.3, prunes and BN-recalibrates one random budget-fitted
plan, then scores the first 250 reward-split images again and again for SECONDS; all start together. Prints the
images per second of each worker and their sum."""
import multiprocessing as mp
import sys
import time


def work(ready, go, results, seconds: float) -> None:
    import gymnasium as gym
    import numpy as np
    import torch

    import envs  # noqa: F401 - registers the ids
    from baselines.random_search import budget_plans
    torch.set_num_threads(1)  # as a SubprocVecEnv worker of agents.train
    env = gym.make("ChannelPrune-ResNet18-v0", budget=0.3).unwrapped
    problem = env.problem
    plan = budget_plans(env, np.random.default_rng(0), 1)[0][0][0]
    kept, rt = env.cost.plan_counts(plan)
    pruned = problem.build_pruned(kept, rt)
    problem.recalibrate_bn(pruned)
    part = problem.data.reward.part(0, 250)
    ready.put(1)
    go.wait()
    t0, images = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        problem.evaluate_on(pruned, part)
        images += len(part)
    results.put(images / (time.perf_counter() - t0))


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit("usage: worker_throughput.py K SECONDS")
    k, seconds = int(sys.argv[1]), float(sys.argv[2])
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=work, args=(ready, go, results, seconds)) for _ in range(k)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    go.set()
    rates = [results.get() for _ in procs]
    for p in procs:
        p.join()
    print(f"K={k}: per worker {[round(r) for r in rates]} img/s, total {sum(rates):.0f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
