"""SB3 agents for the ChannelPrune environments: training, presets, the best episode as a policy, evaluation.

* ``from agents.train import train`` (the function; ``agents.train`` is the module) / ``python -m agents.train``:
  train PPO, SAC, TD3, DDPG (AMC's recipe) or A2C.
* :class:`agents.policy.BestPolicy`: a run's ``best.json`` as a policy with SB3's ``predict``;
  :func:`agents.policy.make_env_from_best` rebuilds its env.
* :func:`agents.evaluate.evaluate_run` / ``python -m agents.evaluate RUN_DIR``.
* :class:`agents.relative_actions.RelativeActions` / ``AnchoredActions``: actions as factors of the even keep
  ratio (preset ``actions: relative``) or of the ``uniform_internal`` plan (``actions: anchored``).
"""

from __future__ import annotations

from typing import Any

# Lazy exports: importing agents.train here would make ``python -m agents.train`` warn that the module is already
# in sys.modules (and would import SB3 for ``import agents`` alone).
_EXPORTS = {"ALGOS": "algos", "BestPolicy": "policy", "make_env_from_best": "policy", "evaluate_run": "evaluate",
            "RelativeActions": "relative_actions", "AnchoredActions": "relative_actions"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
