"""Neuron Merging (Kim, Kim, Park, Jeon, "Neuron Merging: Compensating for Pruned Neurons", NeurIPS 2020).

Data-free compensation applied after a structured prune. For a producer P (with BatchNorm) feeding one consumer
C through a ReLU, a pruned filter j that is a positive multiple of a kept filter i after the BN transform
(``z_j = s * z_i``) gives ``ReLU(z_j) = s * ReLU(z_i)``, so C's input weights of j can be folded into i:
``C[:, i] += s * C[:, j]`` and the network's output is unchanged. For real networks the paper decomposes the
weights greedily with cosine similarity (its Algorithm for conv-BN):

    for each block-internal group (P -> BN -> ReLU -> C), in forward order:
        f_k = (gamma_k / sigma_k) * w_k,  b_k = beta_k - gamma_k * mu_k / sigma_k     # BN folded into filter k
        for each pruned channel j and each kept channel i:
            s_ji   = ||f_j|| / ||f_i||                             # BN-aware scale
            bias_ji = |b_j - s_ji * b_i| / s_ji                    # bias left over by z_j ~ s_ji * z_i
            score_ji = lam * (1 - cos(f_j, f_i)) + (1 - lam) * minmax_i(bias_ji)
        i* = argmin_i score_ji
        if cos(f_j, f_i*) >= t:  C[:, i*] += s_ji* * C[:, j]       # absorbed into the consumer's inputs

Details and deviations:

* Defaults ``t = 0.1`` and ``lam = 0.85`` are the authors' released settings for conv-BN networks (VGG-16 and
  ResNet-56 on CIFAR-10); their fully connected setting (LeNet-300-100, t = 0.45, cosine only) is available
  with ``threshold=0.45, lam=1.0``. The cosine is taken between BN-folded filters, so a kept filter whose BN
  flips the sign is never chosen (the scale must be positive for ``ReLU(s z) = s ReLU(z)``); it equals the
  paper's cosine of the raw filters whenever the two gammas share a sign. The scale is the ratio of the folded
  filters' norms (the authors' code multiplies the raw-norm ratio by BN factors; the folded ratio is the one
  that makes ``z_j = s z_i`` exact for proportional filters, which the unit test checks).
* Residual-stream groups (several producers joined by additions) are skipped: the merge needs one
  conv-BN-ReLU chain, which is what the paper handles. Groups with depthwise convs (MobileNetV2; ReLU6 is not
  positively homogeneous) or several consumers are skipped too. Without a BN the raw filter and bias are used.
* Groups are processed in forward order, and a consumer's merged weights are what the next group compares
  (VGG chains), as in the paper's layer-by-layer merging.
* ``l1_merge`` is the paper's pruning setting: L1-norm filter choice (Li et al. 2017) with uniform ratios, here
  fitted to the env's budget by one scale factor; no fine-tuning. The env still recalibrates BN statistics before
  evaluating, as for every method.
* Merging pays off when filters are redundant (near-parallel after BN, as in the over-parameterized networks of
  the paper). On the small test ResNet-20 (width 0.5, 2 epochs) filters are nearly orthogonal (mean best cosine
  ~0.15), and merging at t = 0.1 lowers the BN-recalibrated accuracy of an L1 prune instead of raising it.
* Data-free: no forward pass, only weight arithmetic on small matrices, done where the weights are (the env builds
  pruned networks on the CPU); ``merge_compensation`` works as well for networks on a GPU.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from torch import nn

from envs.channel_prune import ChannelPruneEnv
from envs.groups import GroupGraph

from .base import Baseline, fit_to_budget, register

DEFAULT_THRESHOLD = 0.1
DEFAULT_LAMBDA = 0.85


def folded_filters(prod: nn.Module, weight: torch.Tensor, bn: nn.Module | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """BN folded into the producer: rows ``(gamma/sigma) * w_k``, biases ``beta - gamma * (mu - b_k) / sigma``."""
    w = weight.detach().flatten(1).double()
    bias = prod.bias.detach().double() if getattr(prod, "bias", None) is not None else torch.zeros(
        w.shape[0], dtype=w.dtype, device=w.device)
    if bn is None:
        return w, bias
    sigma = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
    scale = gamma / sigma
    return w * scale[:, None], beta + scale * (bias - bn.running_mean.double())


def merge_pairs(
    filters: torch.Tensor,
    biases: torch.Tensor,
    kept: Sequence[int],
    threshold: float = DEFAULT_THRESHOLD,
    lam: float = DEFAULT_LAMBDA,
) -> list[tuple[int, int, float]]:
    """The paper's decomposition: ``(pruned j, kept i, scale s)`` for every pruned channel that is merged.

    ``filters`` (C, D) and ``biases`` (C,) are BN-folded. For pruned j and each kept i: cosine distance
    ``1 - cos(f_j, f_i)``, scale ``s = ||f_j|| / ||f_i||`` and bias mismatch ``|b_j - s * b_i| / s`` (the bias left
    over when ``z_j`` is replaced by ``s * z_i``, in units of ``z_i``), min-max normalized over the candidates. The
    partner minimizes ``lam * cos distance + (1 - lam) * bias mismatch``; it is merged if its cosine similarity is
    at least ``threshold``.
    """
    kept = np.asarray(sorted(int(k) for k in kept), dtype=np.int64)
    pruned = np.setdiff1d(np.arange(filters.shape[0]), kept)
    if len(pruned) == 0 or len(kept) == 0:
        return []
    norms = filters.norm(dim=1)
    unit = filters / norms.clamp_min(1e-12)[:, None]
    kt, pt = torch.as_tensor(kept, device=filters.device), torch.as_tensor(pruned, device=filters.device)
    cos = unit[pt] @ unit[kt].T  # (pruned, kept)
    scale = norms[pt][:, None] / norms[kt][None, :].clamp_min(1e-12)
    mismatch = (biases[pt][:, None] - scale * biases[kt][None, :]).abs() / scale.clamp_min(1e-12)
    lo, hi = mismatch.min(1, keepdim=True).values, mismatch.max(1, keepdim=True).values
    mismatch = (mismatch - lo) / (hi - lo).clamp_min(1e-12)
    score = lam * (1.0 - cos) + (1.0 - lam) * mismatch
    best = score.argmin(1)
    out = []
    for r, j in enumerate(pruned):
        c = int(best[r])
        if float(cos[r, c]) >= threshold and norms[kt[c]] > 1e-12 and norms[j] > 1e-12:
            out.append((int(j), int(kept[c]), float(scale[r, c])))
    return out


def _check(threshold: float, lam: float) -> None:
    if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r} must be a cosine similarity in [-1, 1]")
    if not (isinstance(lam, (int, float)) and 0.0 <= lam <= 1.0):
        raise ValueError(f"lam={lam!r} must be in [0, 1] (weight of the cosine distance vs the bias mismatch)")


def _mergeable(graph: GroupGraph, gi: int) -> bool:
    g = graph.groups[gi]
    mods = dict(graph.model.named_modules())
    if g.kind != "internal" or len(g.producers) != 1 or len(g.consumers) != 1 or g.depthwise or len(g.bns) > 1:
        return False
    cons = mods[g.consumers[0]]
    if isinstance(cons, nn.Conv2d):
        return cons.groups == 1 and cons.in_channels == g.num_channels
    return isinstance(cons, nn.Linear) and cons.in_features == g.num_channels


@torch.no_grad()
def merge_compensation(
    graph: GroupGraph,
    base_model: nn.Module,
    pruned_model: nn.Module,
    keep_idx: Sequence[np.ndarray | Sequence[int]],
    threshold: float = DEFAULT_THRESHOLD,
    lam: float = DEFAULT_LAMBDA,
) -> list[int]:
    """Fold every pruned channel of each block-internal group into its most similar kept one (in place).

    ``keep_idx[g]`` are the base channel indices group g keeps (what ``graph.prune_copy`` was given);
    ``pruned_model`` is that physically pruned copy of ``base_model``. Returns the number of merged channels per
    group (0 for skipped groups). ``ChannelPruneEnv(compensate=merge_compensation)`` calls this with the default
    threshold; ``functools.partial(merge_compensation, threshold=t)`` sets another.
    """
    _check(threshold, lam)
    if len(keep_idx) != len(graph.groups):
        raise ValueError(f"keep_idx has {len(keep_idx)} entries; expected one per group ({len(graph.groups)})")
    base = dict(base_model.named_modules())
    pruned = dict(pruned_model.named_modules())
    kept_sorted = [np.asarray(sorted(int(k) for k in ks), dtype=np.int64) for ks in keep_idx]
    merged_w: dict[str, torch.Tensor] = {}  # consumer weights after merging: all output rows, pruned inputs
    counts = [0] * len(graph.groups)

    def current_weight(name: str) -> torch.Tensor:
        """A producer's weight as the pruned network computes it (inputs pruned/merged), all output rows."""
        if name in merged_w:
            return merged_w[name]
        w = base[name].weight.detach()
        ig = graph.input_group(name)
        if ig is not None and w.ndim >= 2 and not (isinstance(base[name], nn.Conv2d) and base[name].groups > 1):
            w = w[:, torch.as_tensor(kept_sorted[ig], device=w.device)]
        return w

    for g in graph.groups:
        if not _mergeable(graph, g.index) or len(kept_sorted[g.index]) == g.num_channels:
            continue
        prod_name, cons_name = g.producers[0], g.consumers[0]
        bn = base[g.bns[0]] if g.bns else None
        filt, bias = folded_filters(base[prod_name], current_weight(prod_name), bn)
        pairs = merge_pairs(filt, bias, kept_sorted[g.index], threshold, lam)
        cw = base[cons_name].weight.detach()  # consumer's inputs are this group only: not merged before
        kept_t = torch.as_tensor(kept_sorted[g.index], device=cw.device)
        new = cw[:, kept_t].clone()
        pos = {int(c): p for p, c in enumerate(kept_sorted[g.index])}
        for j, i, s in pairs:
            new[:, pos[i]] += s * cw[:, j]
        merged_w[cons_name] = new
        counts[g.index] = len(pairs)
        # the consumer's own output channels may be pruned by the group it produces
        og = graph.output_group(cons_name)
        rows = new if og is None else new[torch.as_tensor(kept_sorted[og], device=new.device)]
        target = pruned[cons_name].weight
        if target.shape != rows.shape:
            raise ValueError(f"pruned consumer {cons_name!r} has weight shape {tuple(target.shape)}; expected "
                             f"{tuple(rows.shape)} from keep_idx (was pruned_model pruned with these indices?)")
        target.copy_(rows.to(device=target.device, dtype=target.dtype))
    return counts


@register("l1_merge")
class L1Merge(Baseline):
    """L1 filter choice with uniform ratios fitted to the budget, plus neuron merging (options ``threshold``,
    ``lam``)."""

    def prepare(self) -> ChannelPruneEnv:
        t = self.options.get("threshold", DEFAULT_THRESHOLD)
        lam = self.options.get("lam", DEFAULT_LAMBDA)
        _check(t, lam)
        fn = (merge_compensation if (t, lam) == (DEFAULT_THRESHOLD, DEFAULT_LAMBDA)
              else functools.partial(merge_compensation, threshold=t, lam=lam))
        return self.env.derive(scorer="l1", compensate=fn)

    def plan(self) -> np.ndarray:
        return fit_to_budget(self.eval_env, np.ones(self.eval_env.n_groups))
