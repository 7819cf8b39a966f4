"""Evaluate a training run: replay the saved agent (one deterministic episode), ``best.json`` as a policy, and
the selected policy snapshot (``selected.zip``) when the run checked its policy (``select_every``).

    python -m agents.evaluate runs/ChannelPrune-ResNet18-v0/ppo_s0_20250101-120000
    python -m agents.evaluate RUN_DIR --env-kwargs reward_size=500 --split test

The env is rebuilt from ``config.yaml`` (env id and kwargs); ``--env-kwargs`` overrides them (and must supply
any kwarg that could not be recorded, such as a ``DatasetSplits`` passed through the Python API). The env is
deterministic, so the agent's episode and the replay of ``best.json`` print the metrics the env reports; the
replay reproduces the recorded accuracy and FLOPs when the env kwargs are unchanged. ``--split test`` also
reports the test-set accuracy of each pruned network (the reward split stays the env's reward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from envs.cli import parse_key_values
from envs.episodes import run_episode

from .algos import ALGOS
from .common import BEST_FILE, CONFIG_FILE, MODEL_FILE, SELECTED_MODEL_FILE
from .policy import BestPolicy, make_env_from_record
from .relative_actions import actions_of_config, wrap_actions

METRICS = ("reward", "accuracy", "loss", "flops_ratio", "params_ratio", "effective_flops_ratio", "latency_ratio",
           "clamp_total")


def _test_accuracy(env, info: dict[str, Any]) -> float:
    base = env.unwrapped
    pruned = base.build_pruned(info["kept_counts"], [round(r * k) for r, k in zip(info["runtime_ratios"],
                                                                                  info["kept_counts"])])
    base.recalibrate_bn(pruned)
    return base.evaluate(pruned, "test")[0]


def evaluate_run(run_dir: str | Path, test: bool = False, **env_overrides: Any) -> dict[str, dict[str, Any]]:
    """``{"agent": metrics, "best": metrics, "selected": metrics}`` for a run directory (``best`` absent without
    best.json, ``selected`` without selected.zip).

    ``metrics`` holds the env's final info (reward, accuracy, FLOPs / params / effective-FLOPs ratios, keep
    ratios); with ``test=True`` also ``test_accuracy``.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"run_dir={str(run_dir)!r} has no {CONFIG_FILE}; is it a directory written by "
                         "agents.train?")
    cfg = yaml.safe_load(cfg_path.read_text())
    # every replay scored on the whole reward split: in a raced env (screen_size) a replay that cannot beat an
    # earlier one would stop at a rung
    env = make_env_from_record(cfg, repr(str(cfg_path)), **{"screen_size": None, **env_overrides})
    out: dict[str, dict[str, Any]] = {}
    try:
        for name, model_path in (("agent", run_dir / MODEL_FILE), ("selected", run_dir / SELECTED_MODEL_FILE)):
            if model_path.is_file():
                model = ALGOS[cfg["algo"]].load(model_path, device="cpu")
                reward, info = run_episode(wrap_actions(env, actions_of_config(cfg)), model)
                out[name] = {**info, "reward": reward}
        if (run_dir / BEST_FILE).is_file():
            reward, info = run_episode(env, BestPolicy.load(run_dir / BEST_FILE))
            out["best"] = {**info, "reward": reward}
        if test:
            for m in out.values():
                m["test_accuracy"] = _test_accuracy(env, m)
    finally:
        env.close()
    if not out:
        raise ValueError(f"run_dir={str(run_dir)!r} has neither {MODEL_FILE} nor {BEST_FILE}")
    return out


def format_results(results: dict[str, dict[str, Any]]) -> str:
    keys = [k for k in METRICS + ("test_accuracy",) if any(k in m for m in results.values())]
    names = list(results)
    lines = [f"{'metric':<24}" + "".join(f"{n:>14}" for n in names)]
    for k in keys:
        lines.append(f"{k:<24}" + "".join(f"{results[n][k]:>14.4f}" if k in results[n] else f"{'-':>14}"
                                          for n in names))
    for n in names:
        lines.append(f"{n} keep ratios: " + " ".join(f"{r:.2f}" for r in results[n]["keep_ratios"]))
        rt = results[n].get("runtime_ratios")
        if rt is not None and not np.allclose(rt, 1.0):
            lines.append(f"{n} runtime ratios: " + " ".join(f"{r:.2f}" for r in rt))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agents.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory written by agents.train")
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override the recorded env kwargs (values parsed as YAML)")
    p.add_argument("--split", choices=("reward", "test"), default="reward",
                   help="'test' also reports each pruned network's test accuracy")
    args = p.parse_args(argv)
    try:
        results = evaluate_run(args.run_dir, test=args.split == "test",
                               **parse_key_values(args.env_kwargs, "--env-kwargs"))
    except ValueError as exc:
        p.error(str(exc))
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
