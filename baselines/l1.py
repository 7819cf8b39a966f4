"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets",
ICLR 2017).

Uniform keep ratios (the paper prunes a fixed fraction per layer), removing the filters with the smallest sum of
absolute weights; for a coupled group the L1 norms of all its producer filters are summed (each normalized by its
layer mean), which is how Torch-Pruning's grouped L1 importance treats residual streams. No retraining here: the
benchmark's common fine-tune is applied to every method alike.
"""

from __future__ import annotations

import numpy as np

from envs.channel_prune import ChannelPruneEnv

from .base import Baseline, fit_to_budget, register


@register("l1")
class L1(Baseline):
    def prepare(self) -> ChannelPruneEnv:
        return self.env if getattr(self.env.problem.scorer, "name", "") == "l1" else self.env.derive(scorer="l1")

    def plan(self) -> np.ndarray:
        return fit_to_budget(self.eval_env, np.ones(self.eval_env.n_groups))
