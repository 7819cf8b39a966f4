"""The command-line arguments that say which env an experiment runs on, shared by the experiments' CLIs."""

from __future__ import annotations

import argparse
from typing import Any

import envs
from envs.cli import parse_key_values


def add_env_arguments(p: argparse.ArgumentParser, default_env: str = "ChannelPrune-ResNet18-v0") -> None:
    """``--env``, ``--env-kwargs K=V ...``, ``--test-size`` and ``--device``."""
    p.add_argument("--env", default=default_env)
    p.add_argument("--env-kwargs", nargs="*", default=[], metavar="K=V")
    p.add_argument("--test-size", type=int, default=None, help="test images (default: the whole test split)")
    p.add_argument("--device", default="auto")


def env_from_arguments(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The resolved env id and its keyword arguments; ValueError for an unknown id or a bad key=value."""
    kwargs = {**parse_key_values(args.env_kwargs, "--env-kwargs"), "device": args.device}
    if args.test_size is not None:
        kwargs["test_size"] = args.test_size
    return envs.resolve_env_id(args.env), kwargs
