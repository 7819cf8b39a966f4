"""Export the physically pruned network of a policy file or of a baseline's plan (the command line of
``envs.export``): weights, a pickle-free channel config, ONNX and a report.

    python -m baselines.experiments.export --policy best.json --out model/ [--finetune-steps 500]
    python -m baselines.experiments.export --baseline uniform --env ChannelPrune-ResNet20-v0 \\
        --env-kwargs budget=0.5 --out model/
    ... [--device auto|cpu|cuda|cuda:N]   (where the env evaluates and the fine-tune trains; default auto)

The library (``export_pruned``, ``export_policy``, ``load_exported``, ...) is ``envs.export``; this module adds
``export_baseline`` (a baseline's plan needs ``baselines``, which ``envs`` does not import) and the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from baselines import available, make_baseline
from envs import export as export_lib
from envs.cli import parse_key_values
from envs.episodes import run_episode, unwrap
from envs.export import env_arch, export_policy, export_pruned, jsonable_kwargs, make_env
from envs.machine import backend, resolve_device


def export_baseline(name: str, env_id: str, out_dir: str | Path, env_kwargs: dict[str, Any] | None = None,
                    env=None, seed: int = 0, **kwargs) -> dict:
    """Export the plan of baseline ``name`` on ``env_id`` (or on ``env``): its ``setup()``, then one episode."""
    names = available()
    if name not in names:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(names)}")
    env = unwrap(env) if env is not None else make_env(env_id, env_kwargs)
    arch = kwargs.pop("arch", None) or env_arch(env)
    baseline = make_baseline(name, env, seed=seed).setup()
    ev = baseline.eval_env
    info = run_episode(ev, baseline, seed=seed)[1]
    source = {"kind": "baseline", "baseline": name, "seed": seed, "env_id": env_id,
              "env_kwargs": jsonable_kwargs(env_kwargs or {}), "plan_cpu_seconds": baseline.cpu_seconds,
              "plan_wall_seconds": baseline.wall_seconds, "machine": backend(ev.device).machine}
    return export_pruned(ev, info["kept_counts"], out_dir, env_info=info, arch=arch, source=source, seed=seed,
                         **kwargs)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m baselines.experiments.export",
                                description=__doc__ + "\n" + (export_lib.__doc__ or ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="a best.json policy file (env_id, env_kwargs, keep_ratios / kept_counts)")
    src.add_argument("--baseline", help="a baseline name (see baselines.available())")
    p.add_argument("--env", help="env id for --baseline (e.g. ChannelPrune-ResNet20-v0)")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V",
                   help="env keyword arguments (with --policy: overrides of the policy's env_kwargs)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default=None,
                   help="auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N: where the env "
                        "evaluates and the fine-tune trains; overrides a policy file's device. Latency: CPU, plus "
                        "the GPU")
    p.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps after pruning (envs.finetune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-repeats", type=int, default=20,
                   help="timed forward passes per network and batch size (0: skip latency)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the latency measurement")
    p.add_argument("--no-onnx", action="store_true", help="do not write model.onnx")
    p.add_argument("--no-test", action="store_true", help="skip the test-set accuracy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    opts = dict(finetune_steps=args.finetune_steps, seed=args.seed, latency_repeats=args.latency_repeats,
                threads=args.threads, onnx=not args.no_onnx, test_accuracy=not args.no_test,
                progress=not args.quiet)
    try:
        kv = parse_key_values(args.env_kwargs, "--env-kwargs")
        if args.device is not None:
            if "device" in kv and str(kv["device"]) != args.device:
                raise ValueError(f"--device {args.device} differs from --env-kwargs device={kv['device']}; "
                                 "give one of them")
            kv["device"] = args.device
        kv.setdefault("device", "auto")  # the machine's choice, not the policy's: a GPU run's policy exports here
        resolve_device(kv["device"])
        if args.quiet:
            kv.setdefault("progress", False)
        if args.policy is not None:
            if args.env is not None:
                raise ValueError(f"--env={args.env!r} is only for --baseline; a policy file names its env_id")
            report = export_policy(args.policy, args.out, env_overrides=kv, **opts)
        else:
            if args.env is None:
                raise ValueError("--baseline needs --env ENV_ID (e.g. --env ChannelPrune-ResNet20-v0)")
            seed = opts.pop("seed")
            report = export_baseline(args.baseline, args.env, args.out, env_kwargs=kv, seed=seed, **opts)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: report.get(k) for k in ("reward_accuracy", "env_accuracy", "test_accuracy", "flops_ratio",
                                          "flops_reduction", "params_ratio")}
    if "latency" in report:
        summary["speedup"] = {k: v["speedup"] for k, v in report["latency"].items() if k.startswith("batch")}
    print(json.dumps({"out": str(args.out), **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
