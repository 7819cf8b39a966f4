"""Speed benchmark of the environment (``make bench``; numbers go to docs/reports/speed.md).

    python -m baselines.experiments.speed --env ChannelPrune-ResNet18-v0 --budget 0.5 --episodes 5 \\
        --memory-episodes 300 [--device auto|cpu|cuda|cuda:N]

Prints, for one fixed plan (uniform keep ratios fitted to the budget):

* ``episode``: wall time of a whole env episode (every step, pruning a copy, BN recalibration, evaluation);
* ``pruned forward + recal``: the same physically pruned net's BN recalibration and reward-split forward alone;
* ``mask-based``: what AMC-style tools do: the full net with zeroed channels (forward hooks), recalibrated and
  evaluated on the same data;
* evaluator throughput: the unpruned net on the reward split, images/s, for a plain contiguous float32 loop and
  for the env's evaluator with ``eval_precision`` "fp32" (channels-last) and "bf16" (channels-last + autocast);
* runtime gating at batch 1 (``--runtime-effective``, default 0.5): the network kept whole, every gated group
  computing the same fraction of its channels per input so that the effective FLOPs are that fraction, run by
  the sparse executor (``envs.runtime``) at batch 1, against the unpruned net and against static pruning to the
  same FLOPs (``torch.utils.benchmark`` via ``envs.cost.compare_latency``: alternated, best of 3 rounds); on
  the env's input size and on the larger square inputs of ``--runtime-image-sizes`` (default 56 and 112 pixels).
  Per input, the executor must gather that input's weights: on small maps that traffic costs what the skipped
  multiply-accumulates save, on larger ones the saving shows;
* resident memory (RSS) before and after ``--memory-episodes`` episodes on a small reward/calibration split
  (memory growth is what matters there, not speed); on a GPU also the peak of CUDA memory allocated.

Everything runs on ``--device`` ("auto": CUDA when available, else the CPU), and the result names its machine
(``device``, ``machine``: ``envs.machine.backend(device).machine``). Wall-clock times are read after the device
has finished its queued work.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

import envs  # noqa: F401 - registers the ids
from baselines import make_baseline
from envs.cli import parse_key_values
from envs.cost import compare_latency
from envs.episodes import run_actions
from envs.machine import backend, resolve_device

from .runtime_gating import equal_flops_plans


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _uniform_actions(env) -> list[np.ndarray]:
    b = make_baseline("uniform", env).setup()
    return [b.action_for_step(t) for t in range(env.n_groups)]


def _sync(device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, repeats: int, device="cpu") -> float:
    """Median wall-clock seconds of ``fn()``, the device's queued work included."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def _plain_fp32_eval(model: torch.nn.Module, split, batch_size: int, device="cpu") -> None:
    """A plain contiguous float32 loop over ``split`` with ``model`` (already on ``device``)."""
    model.eval()
    for x, _ in split.batches(batch_size):
        model(x.to(device)).argmax(1)


def evaluator_throughput(env, repeats: int) -> dict[str, float]:
    """Images/s of the unpruned net on the reward split: a plain float32 loop, then the env's evaluator."""
    n = len(env.data.reward)
    dev = env.device
    plain = copy.deepcopy(env.base_model).to(dev)  # the base model stays on the CPU
    batch = env.problem.eval_batch_size
    out = {"plain_fp32": n / _timed(lambda: _plain_fp32_eval(plain, env.data.reward, batch, dev), repeats, dev)}
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not backend(env.device).bf16:
            continue
        other = env.derive(eval_precision=precision)
        out[precision] = n / _timed(lambda e=other: e.evaluate(e.base_model), repeats, dev)
    return out


def run(env_id: str, budget: float, episodes: int, memory_episodes: int, env_kwargs: dict) -> dict:
    env = gym.make(env_id, budget=budget, **env_kwargs).unwrapped
    dev = env.device
    actions = _uniform_actions(env)
    info = run_actions(env, actions)  # warm-up
    kept = info["kept_counts"]
    t_episode = _timed(lambda: run_actions(env, actions), episodes, dev)

    def pruned_only():
        pruned = env.build_pruned(kept)
        env.recalibrate_bn(pruned)
        env.evaluate(pruned)

    def pruned_forward_only():  # the net already built: recalibration + evaluation alone
        env.recalibrate_bn(net)
        env.evaluate(net)

    net = env.build_pruned(kept)
    t_pruned_build = _timed(pruned_only, episodes, dev)
    t_pruned = _timed(pruned_forward_only, episodes, dev)

    masked = copy.deepcopy(env.base_model)
    hooks = env.graph.mask_hooks(masked, env.graph.masks(env.kept_channels(kept)))

    def mask_based():
        env.recalibrate_bn(masked)
        env.evaluate(masked)

    t_mask = _timed(mask_based, episodes, dev)
    for h in hooks:
        h.remove()
    throughput = evaluator_throughput(env, episodes)
    result = {
        "env": env_id, "budget": budget, "threads": torch.get_num_threads(),
        "device": str(dev), "machine": backend(dev).machine,
        "reward_images": len(env.data.reward), "calib_images": len(env.data.calib),
        "flops_ratio": info["flops_ratio"], "accuracy": info["accuracy"],
        "episode_s": t_episode, "pruned_forward_recal_s": t_pruned, "pruned_build_forward_recal_s": t_pruned_build,
        "mask_based_s": t_mask,
        "episode_over_pruned_forward": t_episode / t_pruned, "mask_over_episode": t_mask / t_episode,
        "eval_precision": env.problem.eval_precision, "eval_images_per_s": throughput,
    }
    if memory_episodes > 0:
        small = gym.make(env_id, budget=budget, **{**env_kwargs, "reward_size": 64, "calib_size": 64}).unwrapped
        marks = {"rss_mb_after_10": min(9, memory_episodes - 1), "rss_mb_mid": memory_episodes // 2,
                 "rss_mb_end": memory_episodes - 1}
        for i in range(memory_episodes):
            rng = np.random.default_rng(i)  # random actions: every episode prunes to new layer shapes
            actions = [rng.uniform(-1, 1, small.action_space.shape) for _ in range(small.n_groups)]
            run_actions(small, actions, seed=i)
            result.update({name: _rss_mb() for name, at in marks.items() if at == i})
        result.update(memory_episodes=memory_episodes,
                      rss_growth_mb_10_to_end=result["rss_mb_end"] - result["rss_mb_after_10"])
    if dev.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def runtime_latency(env_id: str, effective: float, env_kwargs: dict, batch_size: int = 1,
                    image_sizes: list[int | None] | None = None) -> list[dict]:
    """Batch-``batch_size`` CPU latency, at ``effective`` FLOPs, of three networks against the unpruned one (on
    the CPU, contiguous float32; the gated ones in the sparse executor):

    * ``gated``: runtime gating alone, nothing pruned statically, every gated group computing one common
      fraction of its channels per input;
    * ``static``: static uniform pruning to the same FLOPs;
    * ``mixed``: the runtime plan of the accuracy comparison (``runtime_gating.equal_flops_plans``): the ungated
      groups pruned statically as ``static`` prunes them, the gated ones whole in storage and computing a share
      per input. Its saving is partly static.

    One dict per entry of ``image_sizes``: ``None`` (the default) the env's own input size, an integer a square
    input of that many pixels (the same networks, which end in global pooling, on larger images, where a
    convolution does more work per weight it reads)."""
    sizes = [None] if image_sizes is None else list(image_sizes)
    for size in sizes:
        if size is not None and not (isinstance(size, int) and size >= 8):
            raise ValueError(f"image_sizes={image_sizes!r}: each size must be an integer >= 8 (pixels)")
    # the ridge gates: which channels a gate picks does not change the time, so the trained ones are not needed
    env = gym.make(env_id, **{**env_kwargs, "mode": "runtime", "budget": effective, "storage_budget": 1.0,
                              "runtime_gates": "ridge"}).unwrapped
    cost, equal = env.cost, equal_flops_plans(env.problem)
    kept, rt, _, u = equal_flops_plans(env.problem, "whole")["runtime"]  # nothing static, gated groups at u
    kept_static, rt_static = equal["static"][:2]
    kept_mixed, rt_mixed, _, q_mixed = equal["runtime"]
    nets = {"gated": env.build_pruned(kept, rt, sparse=True), "static": env.build_pruned(kept_static, rt_static),
            "mixed": env.build_pruned(kept_mixed, rt_mixed, sparse=True)}
    plans = {"batch_size": batch_size, "runtime_ratio": u, "gated_groups": int(sum(env.gated)),
             "effective_flops_ratio": cost.ratios(kept, rt)["effective"],
             "static_flops_ratio": cost.ratios(kept_static)["flops"],
             "mixed_effective_flops_ratio": cost.ratios(kept_mixed, rt_mixed)["effective"],
             "mixed_static_keep": equal["runtime"][2], "mixed_runtime_ratio": q_mixed}  # the same at every size
    channels, height = env.problem.example_input.shape[1:3]
    rows = []
    for size in sizes:
        shape = (channels, size or height, size or height)
        row, bases = {**plans, "image_size": shape[-1]}, []
        for name, net in nets.items():  # each against the unpruned net, interleaved; the best unpruned time
            t_net, t_base = compare_latency(net, env.base_model, shape, batch_size)
            row[f"{name}_ms"] = 1e3 * t_net
            bases.append(t_base)
        row["unpruned_ms"] = 1e3 * min(bases)
        for name in nets:
            row[f"{name}_over_unpruned"] = row[f"{name}_ms"] / row["unpruned_ms"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baselines.experiments.speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="ChannelPrune-ResNet18-v0")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--episodes", type=int, default=5, help="timed repeats (median)")
    p.add_argument("--memory-episodes", type=int, default=300)
    p.add_argument("--runtime-effective", type=float, default=0.5,
                   help="effective FLOPs of the batch-1 runtime-gating latency (0 skips it; runtime mode trains "
                        "the runtime predictor on first use)")
    p.add_argument("--runtime-image-sizes", type=int, nargs="*", default=[56, 112], metavar="PIXELS",
                   help="also time the batch-1 runtime gating on square inputs of these sizes (the env's own size "
                        "always runs): per-input gating pays where convolutions do more work per weight")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V")
    p.add_argument("--device", default=None,
                   help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    try:
        kwargs = parse_key_values(args.env_kwargs, "--env-kwargs")
    except ValueError as exc:
        p.error(str(exc))
    if args.device is not None:
        if "device" in kwargs and str(kwargs["device"]) != args.device:
            p.error(f"--device {args.device} differs from --env-kwargs device={kwargs['device']}; give one")
        kwargs["device"] = args.device
    kwargs.setdefault("device", "auto")
    try:
        resolve_device(kwargs["device"])
    except ValueError as exc:
        p.error(str(exc))
    if not 0 <= args.runtime_effective <= 1:
        p.error(f"--runtime-effective {args.runtime_effective} must be in [0, 1] (0: skip)")
    if any(size < 8 for size in args.runtime_image_sizes):
        p.error(f"--runtime-image-sizes {args.runtime_image_sizes}: each size must be >= 8 pixels")
    res = run(args.env, args.budget, args.episodes, args.memory_episodes, kwargs)
    if args.runtime_effective > 0:
        res["runtime_batch1"] = runtime_latency(args.env, args.runtime_effective, kwargs,
                                                image_sizes=[None, *args.runtime_image_sizes])
    print(f"{args.env} at {args.budget:.0%} FLOPs, reward split {res['reward_images']} images, "
          f"calibration {res['calib_images']}, on {res['device']}: {res['machine']}")
    print(f"  episode (all steps + prune + recal + eval):  {res['episode_s']:.2f} s")
    print(f"  pruned net recal + forward alone:           {res['pruned_forward_recal_s']:.2f} s "
          f"(episode / this = {res['episode_over_pruned_forward']:.2f}x)")
    print(f"  mask-based (full net, zeroed channels):      {res['mask_based_s']:.2f} s "
          f"(mask / episode = {res['mask_over_episode']:.2f}x)")
    print("  evaluator, unpruned net, images/s:          " + ", ".join(
        f"{k} {v:.0f}" for k, v in res["eval_images_per_s"].items()) + f" (env default: {res['eval_precision']})")
    if "rss_mb_end" in res:
        print(f"  RSS over {res['memory_episodes']} episodes: {res['rss_mb_after_10']:.0f} MB after 10 -> "
              f"{res['rss_mb_end']:.0f} MB at the end ({res['rss_growth_mb_10_to_end']:+.0f} MB)")
    for r in res.get("runtime_batch1", []):
        print(f"  batch 1, CPU, {r['image_size']}x{r['image_size']} input: unpruned {r['unpruned_ms']:.2f} ms; "
              f"runtime gating at {r['effective_flops_ratio']:.0%} effective FLOPs (sparse executor, "
              f"{r['gated_groups']} gated groups) {r['gated_ms']:.2f} ms = {r['gated_over_unpruned']:.2f}x; "
              f"static pruning at {r['static_flops_ratio']:.0%} FLOPs {r['static_ms']:.2f} ms "
              f"= {r['static_over_unpruned']:.2f}x; both (ungated groups static, gated ones per input, "
              f"{r['mixed_effective_flops_ratio']:.0%} effective FLOPs) {r['mixed_ms']:.2f} ms "
              f"= {r['mixed_over_unpruned']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
