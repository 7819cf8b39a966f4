"""Directional pruning with gRDA (Chao, Wang, Xing, Cheng, "Directional Pruning of Deep Neural Networks",
NeurIPS 2020).

Algorithm (the paper's gRDA update, elementwise on every conv weight):

    a_0 = w_0                                  (the pretrained weights)
    for n = 1, 2, ...:
        a_n = a_{n-1} - lr * grad f(w_{n-1}; Z_n)        (dual averaging: w_0 minus lr times all gradients so far)
        g(n) = c * lr^(1/2) * (n * lr)^mu                (the growing soft threshold)
        w_n = sign(a_n) * max(0, |a_n| - g(n))           (soft thresholding -> exact zeros)

``GRDA`` is that update as a ``torch.optim.Optimizer`` (constant ``lr``, as the paper's analysis assumes). The
fine-tune applies it to the conv weights; BatchNorm and the classifier train with plain SGD (same ``lr``, no
momentum). The paper shows the iterates approach the minimum in the direction that keeps the training loss
flat while most weights reach exactly zero.

Densities -> keep ratios: the paper reports what gRDA leaves as per-layer *density* (fraction of nonzero
weights). Its thresholding is elementwise, so whole filters rarely die in a bounded run (measured on the tiny
ResNet-20: no filter entirely zero, or below 5% of its layer's largest filter norm, even at 95% weight sparsity),
and a channel-alive count would be 1 everywhere. So the default keep ratio of a group is the **weight density**
of its producer filters (``density="weights"``); ``density="channels"`` counts alive channels instead (a filter
with a nonzero weight whose L2 norm is at least ``alive_tol`` = 0.05 times its layer's largest). Either way the
ratios (at least 1e-3) are brought to the budget by one common scale factor (``fit_to_budget``). Which channels:
L1 of the fine-tuned filters (``env.derive(model=finetuned, scorer="l1")``); the sparse weights stay in the
fine-tuned copy that the env prunes and evaluates.

Deviations: gRDA is meant to run for a whole training schedule (the authors' guidance: SGD's learning rate,
0 < c <= 0.005, mu from 0.501 on ImageNet to ~0.6 on CIFAR-10, tens of thousands of steps); here it is a bounded
fine-tune of the pretrained net (default 150 steps of batch 64, lr 0.02, mu 0.51), so ``c`` must be far larger
to reach a comparable threshold in that budget. By default it is set from the network's scale: ``c`` such that
the last step's threshold g(steps) equals the ``c_quantile`` (default 0.5: the median) of the pretrained conv
weights' magnitudes, ``c = quantile(|w_0|) / (lr^(1/2) (steps lr)^mu)`` (0.25 for the tiny test ResNet-20 at 150
steps); an explicit ``c`` overrides it. No data augmentation. The step counter n starts at 1 for the first update,
as in the authors' implementation.

Device: the fine-tune runs on the env's device (``baselines.finetune.finetune``: a copy of the base model, handed
back on the CPU); ``GRDA`` keeps each accumulator on its parameter's device (the copy is moved before the optimizer
is built).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import nn

from envs.channel_prune import ChannelPruneEnv

from .base import Baseline, fit_to_budget, register
from .finetune import cached_finetune, check_positive, env_progress, finetune, merge_options

DENSITY_RULES = ("weights", "channels")
DEFAULTS = dict(c=None, mu=0.51, lr=0.02, steps=150, batch_size=64, c_quantile=0.5, density="weights",
                alive_tol=0.05, cache=True, progress=None)


class GRDA(torch.optim.Optimizer):
    """Generalized regularized dual averaging (Chao et al. 2020) with the soft threshold ``g(n)`` above.

    The accumulator ``a`` starts at the parameter values when the optimizer is built (the pretrained ``w_0``);
    ``n`` is the number of the update (1 for the first).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.01, c: float = 0.005, mu: float = 0.51):
        check_positive("lr", lr)
        check_positive("c", c, allow_zero=True)
        if not (isinstance(mu, (int, float)) and 0.5 < mu < 1):
            raise ValueError(f"mu={mu!r} must be in (0.5, 1) (the paper's range for the threshold's growth)")
        super().__init__(params, dict(lr=lr, c=c, mu=mu))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["accumulator"] = p.detach().clone()
                self.state[p]["n"] = 0

    @staticmethod
    def threshold(n: int, lr: float, c: float, mu: float) -> float:
        """``g(n) = c * lr^(1/2) * (n lr)^mu``."""
        return c * math.sqrt(lr) * (n * lr) ** mu

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, c, mu = group["lr"], group["c"], group["mu"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                acc = st["accumulator"]
                acc.add_(p.grad, alpha=-lr)
                st["n"] += 1
                g = self.threshold(st["n"], lr, c, mu)
                p.copy_(acc.sign() * (acc.abs() - g).clamp_min(0.0))
        return loss


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def auto_c(model: nn.Module, steps: int, lr: float, mu: float, quantile: float = 0.5) -> float:
    """``c`` whose threshold after ``steps`` updates is the ``quantile`` of the conv weights' magnitudes."""
    if not (isinstance(quantile, (int, float)) and 0 < quantile < 1):
        raise ValueError(f"c_quantile={quantile!r} must be in (0, 1)")
    w = torch.cat([p.detach().abs().flatten().cpu() for p in _conv_weights(model)])
    q = float(torch.quantile(w[torch.randperm(len(w), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                             quantile))
    return q / GRDA.threshold(steps, lr, 1.0, mu)


def grda_finetune(
    env: ChannelPruneEnv,
    c: float | None = None,
    mu: float = 0.51,
    lr: float = 0.02,
    steps: int = 150,
    batch_size: int = 64,
    seed: int = 0,
    c_quantile: float = 0.5,
    cache: bool = True,
    progress: bool | None = None,
) -> nn.Module:
    """Fine-tune a copy of ``env.base_model`` with gRDA on the conv weights (plain SGD elsewhere); cached.

    ``c=None`` sets ``c`` with ``auto_c`` (the threshold reaches the ``c_quantile`` of |w_0| at the last step).
    """
    progress = env_progress(env) if progress is None else progress
    check_positive("steps", steps, integer=True)
    check_positive("lr", lr)
    if c is None:
        c = auto_c(env.base_model, steps, lr, mu, c_quantile)

    def optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
        convs = _conv_weights(model)
        ids = {id(p) for p in convs}
        rest = [p for p in model.parameters() if id(p) not in ids]
        opts: list[torch.optim.Optimizer] = [GRDA(convs, lr=lr, c=c, mu=mu)]
        if rest:
            opts.append(torch.optim.SGD(rest, lr=lr))
        return opts

    hp = dict(c=c, mu=mu, lr=lr, steps=steps, batch_size=batch_size, seed=seed)
    return cached_finetune(env, "grda", hp, lambda: finetune(
        env, steps, batch_size, seed, optimizers=optimizers, desc="gRDA fine-tune", progress=progress),
        cache=cache)


def channel_density(env: ChannelPruneEnv, model: nn.Module, rule: str = "weights", alive_tol: float = 0.05
                    ) -> np.ndarray:
    """Density per group of ``env`` in ``model`` (rules in the module docstring).

    ``rule="weights"``: fraction of nonzero weights in the group's producer filters. ``rule="channels"``: fraction
    of alive channels (a nonzero filter whose L2 norm is >= ``alive_tol`` x the layer's largest).
    """
    if rule not in DENSITY_RULES:
        raise ValueError(f"rule={rule!r} is not allowed; allowed: {', '.join(DENSITY_RULES)}")
    check_positive("alive_tol", alive_tol, allow_zero=True)
    mods = dict(model.named_modules())
    out = np.zeros(env.n_groups)
    for i, g in enumerate(env.groups):
        ws = [mods[name].weight.detach().flatten(1) for name in g.producers]
        if rule == "weights":
            out[i] = sum((w != 0).sum().item() for w in ws) / sum(w.numel() for w in ws)
            continue
        alive = torch.zeros(g.num_channels, dtype=torch.bool, device=ws[0].device)
        for w in ws:
            norms = w.norm(dim=1)
            alive |= (w != 0).any(1) & (norms >= alive_tol * norms.max())
        out[i] = alive.float().mean().item()
    return out


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of conv weights that are exactly zero."""
    ws = _conv_weights(model)
    return float(sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws))


@register("grda")
class GRDABaseline(Baseline):
    """Options: ``c`` (None: set from ``c_quantile``, 0.5), ``mu`` (0.51), ``lr`` (0.02), ``steps`` (150),
    ``batch_size`` (64), ``density`` ("weights" or "channels"), ``alive_tol`` (0.05), ``cache`` (True),
    ``progress`` (the env's)."""

    def prepare(self) -> ChannelPruneEnv:
        o = merge_options(self.name, self.options, DEFAULTS)
        self.density_rule, self.alive_tol = o.pop("density"), o.pop("alive_tol")
        if self.density_rule not in DENSITY_RULES:
            raise ValueError(f"density={self.density_rule!r} is not allowed; allowed: {', '.join(DENSITY_RULES)}")
        self.finetuned = grda_finetune(self.env, seed=self.seed, **o)
        self.sparsity = weight_sparsity(self.finetuned)
        return self.env.derive(model=self.finetuned, scorer="l1")

    def plan(self) -> np.ndarray:
        self.density = channel_density(self.eval_env, self.finetuned, self.density_rule, self.alive_tol)
        return fit_to_budget(self.eval_env, np.maximum(self.density, 1e-3))
