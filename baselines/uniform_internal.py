"""Uniform pruning inside the residual blocks, the residual streams kept whole.

Li, Kadav, Durdanovic, Samet & Graf ("Pruning Filters for Efficient ConvNets", ICLR 2017, Sec. 4.3) prune ResNets
this way: "we only prune the first layer of each residual block", because the channels a residual stream carries
are shared by every block's addition. Here every block-internal group keeps one ratio, the largest that meets the
budget with the residual-stream groups whole; if even ``min_keep`` inside the blocks does not fit, the streams are
cut too, by one common factor (``CostModel.streams_whole``). It is also the structure the best PPO plans share on
ResNet-18 and ResNet-56 (docs/reports/agents.md), so it is the scripted control for that structure, and the anchor
of ``actions: anchored`` and ``random_search_anchored``.

Deviation: channels are chosen by the env's static importance (as in ``uniform``), not by L1 norms; ``l1`` and
``uniform`` cut every group alike, streams included.
"""

from __future__ import annotations

import numpy as np

from .base import Baseline, register


@register("uniform_internal")
class UniformInternal(Baseline):
    def plan(self) -> np.ndarray:
        return self.eval_env.cost.streams_whole()  # eval_env is the unwrapped ChannelPruneEnv
