"""The keyword arguments of ``ChannelPruneEnv`` (what ``gym.make(id, **kwargs)`` forwards) and their checks.

``check_kwargs`` validates a dict of them without building anything, so a command line can reject a bad value
before it starts workers.
"""

from __future__ import annotations

from typing import Any

from .gates import DEFAULT_GATE_STEPS, DEFAULT_RUNTIME_GATES, check_gate_training
from .importance import check_importance_samples
from .problem import PROBLEM_KWARGS, check_settings
from .screening import check_rungs

REWARDS = ("acc", "acc_flops", "relative_ce")
REWARD_ALIASES = {"chen2020": "relative_ce", "paper7": "relative_ce"}  # "paper7": the name of earlier versions
BUDGET_MODES = ("wall", "penalty", "fill")
RENDER_MODES = ("ansi", "rgb_array")
ENV_KWARGS = ("problem", "reward", "budget_mode", "penalty_coef", "render_mode", "screen_size") + PROBLEM_KWARGS


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """Check ``gym.make`` keyword arguments without building anything: unknown names and bad values raise
    ValueError naming the argument, the value and what is allowed."""
    bad = [k for k in kwargs if k not in ENV_KWARGS]
    if bad:
        raise ValueError(f"unknown env kwarg(s) {', '.join(map(repr, bad))}; ChannelPruneEnv accepts: "
                         f"{', '.join(ENV_KWARGS)}")
    reward = REWARD_ALIASES.get(kwargs.get("reward", "acc"), kwargs.get("reward", "acc"))
    if reward not in REWARDS:
        raise ValueError(f"reward={reward!r} is not allowed; allowed: {', '.join(REWARDS)} "
                         f"(aliases: {', '.join(REWARD_ALIASES)})")
    if kwargs.get("budget_mode", "wall") not in BUDGET_MODES:
        raise ValueError(f"budget_mode={kwargs['budget_mode']!r} is not allowed; allowed: "
                         f"{', '.join(BUDGET_MODES)}")
    if kwargs.get("render_mode") not in (None, *RENDER_MODES):
        raise ValueError(f"render_mode={kwargs['render_mode']!r} is not allowed; allowed: None, "
                         f"{', '.join(map(repr, RENDER_MODES))}")
    if kwargs.get("screen_size") is not None:
        check_rungs(kwargs["screen_size"])
    if kwargs.get("budget_mode") == "fill" and kwargs.get("mode", "static") != "static":
        raise ValueError(f"budget_mode='fill' is not allowed with mode={kwargs['mode']!r}; allowed: mode='static' "
                         "(fill scales the static keep ratios; use budget_mode='wall' in runtime mode)")
    if "importance_samples" in kwargs:
        check_importance_samples(kwargs["importance_samples"])
    if "runtime_gates" in kwargs or "gate_steps" in kwargs:
        check_gate_training(kwargs.get("runtime_gates", DEFAULT_RUNTIME_GATES),
                            kwargs.get("gate_steps", DEFAULT_GATE_STEPS))
    settings = ("budget", "target", "mode", "storage_budget", "min_keep", "round_to", "scorer", "compensate")
    check_settings(**{k: kwargs[k] for k in settings if k in kwargs})
