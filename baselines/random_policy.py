"""Random pruning: i.i.d. uniform keep ratios in [min_keep, 1] (seeded), brought to the budget by one scale."""

from __future__ import annotations

import numpy as np

from .base import Baseline, fit_to_budget, register


@register("random")
class RandomRatios(Baseline):
    def plan(self) -> np.ndarray:
        env = self.eval_env
        raw = self.rng.uniform(env.min_keep, 1.0, size=env.n_groups)
        return fit_to_budget(env, raw)
