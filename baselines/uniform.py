"""Uniform pruning: every group keeps the same fraction, the largest that meets the budget.

Channels are chosen by the env's static importance (its default scorer); ``l1`` is the same plan with L1 filters.
"""

from __future__ import annotations

import numpy as np

from .base import Baseline, fit_to_budget, register


@register("uniform")
class Uniform(Baseline):
    def plan(self) -> np.ndarray:
        return fit_to_budget(self.eval_env, np.ones(self.eval_env.n_groups))
