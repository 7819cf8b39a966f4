"""Polarization pruning (Zhuang, Tao, Lin, Lu, Liu, Li, "Neuron-level Structured Pruning using Polarization
Regularizer", NeurIPS 2020).

Algorithm (the paper's Section 3, as run here):

1. Sparsity training with the polarization regularizer on the BatchNorm scales ``g`` of every BN in the net::

       min_W  L(W) + lambda * R_s(g),   R_s(g) = sum_i t*|g_i| - |g_i - g_bar|,   g_bar = mean of all g,
       g clamped to [0, a] after every step (and once before the first).

   The gradient pushes a scale below the mean down with ``lambda*(t+1)`` and one above it with only
   ``lambda*(t-1)``, so the scales split into a cluster at 0 and a cluster away from it (unlike L1, which moves
   all of them to 0 alike). ``polarize(env, reg="l1")`` runs the same loop with ``R = ||g||_1`` for comparison.
2. Threshold per group at the **first valley** of the histogram of the group's ``|gamma|`` (``first_valley``):
   ``bins = clip(round(2*sqrt(C)), 8, 32)`` bins over [0, a], smoothed with a [1, 2, 1]/4 kernel (edge padding);
   from the first local maximum, walk right while the density does not rise; the valley is that descent's
   lowest run of bins, accepted only if it is at most half the peak and the density rises after it; the threshold
   is the run's centre. No valley (one cluster): the group keeps everything, unless that cluster is the one at 0
   (median below 0.1a), where it keeps the channels above 0.1a.
   For a residual-stream group with several BNs, ``|gamma|`` is averaged over them (as the env's ``bn`` scorer).
3. Keep ratio per group = fraction of its channels above its threshold; the ratios are brought to the env's
   budget by one common scale factor (``fit_to_budget``). Which channels: largest BN ``|gamma|`` of the
   fine-tuned net (``env.derive(model=finetuned, scorer="bn")``), which is then evaluated like every policy
   (physical pruning, BN recalibration, reward split).

Deviations: the paper sparsity-trains over a full training schedule (its CIFAR scripts use lambda = 1e-4); here it
is a bounded fine-tune of the pretrained net (default 150 SGD steps of batch 64, lr 0.01, momentum 0.9), so
lambda is larger (default 0.03) to let the polarization form in that budget; no data augmentation. The paper
tunes ``t`` per FLOPs target; here ``t`` is fixed (default 1.2) and the budget is met by ``fit_to_budget``. The
paper then fine-tunes the pruned net; the benchmark's common fine-tune (if any) does that for every method alike.

Device: the sparsity fine-tune runs on the env's device (``baselines.finetune.finetune``: a copy of the base model,
handed back on the CPU); the penalty and the clamp work on whatever device the model is on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from envs.channel_prune import ChannelPruneEnv

from .base import Baseline, fit_to_budget, register
from .finetune import bn_modules, cached_finetune, check_positive, env_progress, finetune, merge_options

REGULARIZERS = ("polar", "l1")
DEFAULTS = dict(lam=0.03, t=1.2, a=1.0, steps=150, batch_size=64, lr=0.01, cache=True, progress=None)


def polarization_penalty(model: nn.Module, lam: float, t: float) -> torch.Tensor:
    """``lam * (t*||g||_1 - ||g - mean(g)||_1)`` over all BN scales of ``model`` (one global mean)."""
    g = torch.cat([m.weight for m in bn_modules(model)])
    return lam * (t * g.abs().sum() - (g - g.mean()).abs().sum())


def l1_penalty(model: nn.Module, lam: float) -> torch.Tensor:
    """Network Slimming's ``lam * ||g||_1`` over all BN scales (the comparison the paper makes)."""
    return lam * torch.cat([m.weight for m in bn_modules(model)]).abs().sum()


def polarize(
    env: ChannelPruneEnv,
    lam: float = 0.03,
    t: float = 1.2,
    a: float = 1.0,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 0.01,
    seed: int = 0,
    reg: str = "polar",
    cache: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Sparsity-train a copy of ``env.base_model`` with the polarization (or L1) regularizer; cached."""
    if reg not in REGULARIZERS:
        raise ValueError(f"reg={reg!r} is not allowed; allowed: {', '.join(REGULARIZERS)}")
    check_positive("lam", lam, allow_zero=True)
    check_positive("t", t, allow_zero=True)
    check_positive("a", a)
    check_positive("lr", lr)
    if not bn_modules(env.base_model):
        raise ValueError(f"polarization regularizes BatchNorm scales; model {env.problem.model_name!r} has no "
                         "BatchNorm layer with affine weights")
    progress = env_progress(env) if progress is None else progress

    def clamp(model: nn.Module) -> None:
        for m in bn_modules(model):
            m.weight.clamp_(0.0, a)

    def penalty(model: nn.Module) -> torch.Tensor:
        return polarization_penalty(model, lam, t) if reg == "polar" else l1_penalty(model, lam)

    hp = dict(lam=lam, t=t if reg == "polar" else None, a=a, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
              reg=reg)
    return cached_finetune(env, "polarization", hp, lambda: finetune(
        env, steps, batch_size, seed, penalty=penalty, after_step=clamp, before=clamp, lr=lr,
        desc=f"{reg} sparsity fine-tune", progress=progress), cache=cache)


def first_valley(values: np.ndarray, a: float = 1.0, bins: int | None = None) -> float | None:
    """Threshold at the first valley of the histogram of ``values`` on [0, a] (rule in the module docstring).

    Returns None when the histogram has no valley (unimodal).
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, a)
    if bins is None:
        bins = int(np.clip(round(2 * np.sqrt(len(v))), 8, 32))
    h, edges = np.histogram(v, bins=bins, range=(0.0, a))
    hp = np.pad(h.astype(np.float64), 1, mode="edge")
    hs = 0.25 * hp[:-2] + 0.5 * hp[1:-1] + 0.25 * hp[2:]
    n = len(hs)
    peak = 0
    while peak + 1 < n and hs[peak + 1] >= hs[peak]:  # climb to the first local maximum
        peak += 1
    j = peak
    while j + 1 < n and hs[j + 1] <= hs[j]:  # descend until the density rises again
        j += 1
    if j + 1 >= n or hs[j] > 0.5 * hs[peak]:
        return None  # no rise after the descent, or too shallow to be a valley
    lo = j
    while lo - 1 > peak and hs[lo - 1] == hs[j]:  # the flat bottom of the valley
        lo -= 1
    return float(0.5 * (edges[lo] + edges[j + 1]))


def group_bn_scales(env: ChannelPruneEnv, model: nn.Module) -> list[np.ndarray]:
    """Per group of ``env``: |gamma| of ``model`` (averaged over the group's BNs; L1 of filters if it has none)."""
    mods = dict(model.named_modules())
    out = []
    for g in env.groups:
        if g.bns:
            out.append((sum(mods[n].weight.detach().abs() for n in g.bns) / len(g.bns)).cpu().numpy())
        else:
            w = sum(mods[n].weight.detach().flatten(1).abs().sum(1) for n in g.producers)
            out.append((w / w.max().clamp_min(1e-12)).cpu().numpy())
    return out


def otsu_separation(values: np.ndarray) -> float:
    """Otsu's eta: best two-cluster between-class variance / total variance (1 = two point masses)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    total = v.var()
    if total <= 0:
        return 0.0
    n = len(v)
    csum = np.cumsum(v)
    k = np.arange(1, n)  # split after the k smallest values
    m0, m1 = csum[k - 1] / k, (csum[-1] - csum[k - 1]) / (n - k)
    return float(np.max(k / n * (n - k) / n * (m0 - m1) ** 2) / total)


@register("polarization")
class Polarization(Baseline):
    """Options: ``lam`` (0.03), ``t`` (1.2), ``a`` (1.0), ``steps`` (150), ``batch_size`` (64), ``lr`` (0.01),
    ``cache`` (True), ``progress`` (the env's)."""

    def prepare(self) -> ChannelPruneEnv:
        o = merge_options(self.name, self.options, DEFAULTS)
        self.a = float(o["a"])
        self.finetuned = polarize(self.env, seed=self.seed, **o)
        return self.env.derive(model=self.finetuned, scorer="bn")

    def plan(self) -> np.ndarray:
        scales = group_bn_scales(self.eval_env, self.finetuned)
        self.thresholds = [first_valley(s, self.a) for s in scales]
        ratios = []
        for s, th in zip(scales, self.thresholds):
            if th is None:  # one cluster: all kept, unless it is the cluster at 0
                th = 0.1 * self.a if np.median(s) < 0.1 * self.a else -1.0
            ratios.append(max(float((s > th).mean()), 1e-3))
        self.raw_ratios = np.array(ratios)
        return fit_to_budget(self.eval_env, self.raw_ratios)
