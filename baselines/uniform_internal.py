"""Uniform pruning inside the residual blocks, the residual streams kept whole.

Li, Kadav, Durdanovic, Samet & Graf ("Pruning Filters for Efficient ConvNets", ICLR 2017, Sec. 4.3) prune ResNets
this way: "we only prune the first layer of each residual block", because the channels a residual stream carries
are shared by every block's addition. Here every block-internal group keeps one ratio, the largest that meets the
budget with the residual-stream groups whole; if even ``min_keep`` inside the blocks does not fit, the streams are
cut too, by one common factor (``fit_to_budget``). It is also the structure the best PPO plans share on
ResNet-18 and ResNet-56 (README, "Agents"), so it is the scripted control for that structure.

Deviation: channels are chosen by the env's static importance (as in ``uniform``), not by L1 norms; ``l1`` and
``uniform`` cut every group alike, streams included.
"""

from __future__ import annotations

import numpy as np

from .base import Baseline, fit_to_budget, register


@register("uniform_internal")
class UniformInternal(Baseline):
    def plan(self) -> np.ndarray:
        env = self.eval_env
        stream = np.array([g.kind == "residual" for g in env.groups])
        if stream.all() or not stream.any():  # nothing to keep apart: the uniform plan
            return fit_to_budget(env, np.ones(env.n_groups))
        cost = env.cost  # eval_env is the unwrapped ChannelPruneEnv
        plan = lambda u: np.where(stream, 1.0, u)  # noqa: E731
        u = cost.fit_parameter(lambda u: (plan(u), None), env.min_keep, 1.0)
        if not cost.fits(cost.plan_counts(plan(u))[0]):  # the streams alone overspend: cut them too
            return fit_to_budget(env, plan(env.min_keep))
        return plan(u)
