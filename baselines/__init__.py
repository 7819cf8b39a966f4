"""Scripted pruning methods as policies with SB3's ``predict``; ``make_baseline(name, env)`` builds one."""

from __future__ import annotations

import importlib

from .base import REGISTRY, Baseline, cost_of_ratios, fit_to_budget

_MODULES = ("uniform", "uniform_internal", "random_policy", "random_search", "l1", "neuron_merging", "pfp", "scop",
            "polarization", "grda", "channel_gating")


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a method file not written yet
            if exc.name != f"{__name__}.{mod}":
                raise


def available() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def is_search(name: str) -> bool:
    """Whether baseline ``name`` is a search at equal evaluations (random search and its variants): a control
    that gets as many evaluations as the agents ran episodes, not a scripted method."""
    _load_all()
    return bool(getattr(REGISTRY.get(name), "equal_evaluations", False))


def make_baseline(name: str, env, seed: int = 0, **kwargs) -> Baseline:
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](env, seed=seed, **kwargs)


__all__ = ["Baseline", "REGISTRY", "available", "is_search", "make_baseline", "fit_to_budget", "cost_of_ratios"]
