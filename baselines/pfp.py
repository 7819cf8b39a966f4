"""Provable Filter Pruning (Liebenwein, Baykal, Lang, Feldman, Rus, "Provable Filter Pruning for Efficient Neural
Networks", ICLR 2020).

Data-informed filter sensitivities turned into per-layer budgets by a sampling bound:

    S  <- a small batch of calibration images
    for each layer l (here: each coupled channel group):
        s_j  = max_{x in S} max_i g_ij(x),  g_ij(x) = w_ij a_j(x) / sum_k w_ik a_k(x)   (per sign of w)
        S_l  = sum_j s_j,  p_j = s_j / S_l
        m_l(eps) = K (6 + 2 eps) S_l log(8 eta / delta) / eps^2     # samples for a (1 +- eps) approximation
        keep_l(eps) = E[#unique filters in m_l i.i.d. draws from p] = sum_j 1 - (1 - p_j)^m_l
    eps* = the one global eps whose plan meets the budget (the env's root-finder, scipy's brentq)
    keep in layer l the keep_l(eps*) filters of largest sensitivity

Details and deviations:

* ``a_j(x)`` is channel j of the consumer's input (post-ReLU activations) and ``i`` runs over the consumer's
  output neurons; for a convolution every output position of every output channel is one neuron, and the
  relative contribution is taken per weight tap, ``w_ijt a_j(x)_t / z_i``, then maximized over taps, positions,
  output channels and images (what the authors' tracker does). As in the paper, positive and negative weights
  are treated separately (``z_i`` sums the same sign's contributions); a channel's sensitivity is the larger of
  the two. A neuron with ``z_i`` ~ 0 (nothing of that sign reaches it) is skipped. Inputs that can be negative
  are split into their positive and negative parts (extra points).
* The paper's layers are single convolutions; here a decision unit is a coupled group. A group with several
  consumers (a residual stream and every layer reading it) takes the maximum sensitivity over its consumers.
* ``m_l = ceil(K (6 + 2 eps) S_l log(8 eta / delta) / eps^2)`` (eta = number of channels of the network, delta =
  the failure probability, K = 3 as in the authors' code); K and delta change only which eps is found.
* Randomized PFP samples filters and reweights them; here the deterministic variant keeps, per layer, the
  expected number of unique samples' worth of the most sensitive filters. No reweighting and no retraining: the
  benchmark's common fine-tune is applied to every method alike.
* The forward passes run on the env's device (``ImportanceContext.device``; a copy of the network is moved there),
  in float32; the sensitivities come back as numpy arrays.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from envs.channel_prune import ChannelPruneEnv
from envs.episodes import unwrap
from envs.groups import GroupGraph
from envs.importance import ImportanceContext
from envs.machine import resolve_device

from .base import Baseline, cost_of_ratios, on_device, register


def _unfold(a: torch.Tensor, mod: nn.Module, channels: int) -> torch.Tensor:
    """(N, channels, taps, P): the input entry each weight tap multiplies, for every output position P."""
    if isinstance(mod, nn.Conv2d):
        cols = F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, C*k*k, P)
        return cols.view(a.shape[0], channels, -1, cols.shape[-1])
    return a.reshape(a.shape[0], channels, -1, 1)  # a linear layer: one "position", a channel's features as taps


def _weight_rows(mod: nn.Module, channels: int) -> torch.Tensor:
    """(C_out, channels, taps): the consumer's weights grouped by input channel."""
    return mod.weight.detach().reshape(mod.weight.shape[0], channels, -1)


def relative_contributions(a: torch.Tensor, mod: nn.Module, channels: int, chunk: int = 1 << 19) -> torch.Tensor:
    """Per input channel j: max over the batch, output neurons i and weight taps t of ``w_ijt a_jt / z_i``.

    ``z_i`` is the neuron's total from weights of the same sign (``W+`` or ``W-``, the paper's split), ``a >= 0``.
    """
    w = _weight_rows(mod, channels)  # (O, C, T)
    cols = _unfold(a, mod, channels)  # (N, C, T, P)
    n, c, t, p = cols.shape
    out = torch.zeros(c, dtype=torch.float64, device=a.device)
    for wpart in (w.clamp_min(0), (-w).clamp_min(0)):
        # z (N, O, P): each neuron's total from this sign's weights (bias excluded, as in the paper)
        z = torch.einsum("oct,nctp->nop", wpart, cols)
        inv = torch.where(z > torch.finfo(z.dtype).eps, 1.0 / z.clamp_min(1e-30), torch.zeros_like(z))
        wf = wpart.reshape(wpart.shape[0], c * t)  # (O, F)
        fc = max(1, chunk // max(1, wf.shape[0] * p))  # taps per block: bounds the (O, taps, P) intermediate
        for i in range(n):
            best = torch.empty(c * t, p, device=a.device)
            for f0 in range(0, c * t, fc):  # max_i w_if / z_ip
                torch.amax(wf[:, f0 : f0 + fc, None] * inv[i][:, None, :], 0, out=best[f0 : f0 + fc])
            g = (cols[i].reshape(c * t, p) * best).reshape(c, t * p).amax(1)
            out = torch.maximum(out, g.double())
    return out.clamp_(max=1.0)  # a share of a total is at most 1 (float rounding can overshoot)


@torch.no_grad()
def pfp_sensitivities(
    model: nn.Module,
    graph: GroupGraph,
    images: torch.Tensor,
    batch_size: int = 16,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> list[np.ndarray]:
    """Empirical sensitivity (the paper's s_j) of every channel of every group on ``images``; max over readers.

    Runs on ``device`` (a copy of ``model`` is moved there unless it is there already; ``images`` are moved batch
    by batch); returns CPU numpy arrays.
    """
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"images has shape {tuple(images.shape)}; expected a non-empty batch (N, C, H, W)")
    dev = resolve_device(device)
    model = on_device(model, dev)
    mods = dict(model.named_modules())
    sens = [torch.zeros(g.num_channels, dtype=torch.float64, device=dev) for g in graph.groups]
    readers: dict[str, list[int]] = {}
    for g in graph.groups:
        for name in g.consumers:
            readers.setdefault(name, []).append(g.index)
    captured: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_pre_hook(lambda m, inp, n=n: captured.__setitem__(n, inp[0].detach()))
             for n in readers]
    was = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="PFP sensitivities", disable=not progress):
            captured.clear()
            model(images[start : start + batch_size].to(dev))
            for name, a in captured.items():
                mod = mods[name]
                for gi in readers[name]:
                    c = graph.groups[gi].num_channels
                    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                        continue  # depthwise readers are carried by the group, not consumers of it
                    if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                        raise ValueError(f"PFP: consumer {name!r} of group {gi} is a {type(mod).__name__}; "
                                         "expected Conv2d or Linear")
                    # negative inputs (no ReLU before the reader): their magnitudes count as extra samples
                    parts = [a] if bool((a >= 0).all()) else [a.clamp_min(0), (-a).clamp_min(0)]
                    for part in parts:
                        sens[gi] = torch.maximum(sens[gi], relative_contributions(part, mod, c))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return [s.cpu().numpy() for s in sens]


def expected_unique(sensitivities: np.ndarray, m: float) -> float:
    """E[number of distinct channels] in m i.i.d. draws with probabilities proportional to the sensitivities."""
    s = np.asarray(sensitivities, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(np.sum(-np.expm1(m * np.log1p(-np.minimum(p, 1.0 - 1e-16)))))


def sample_sizes(sensitivities: Sequence[np.ndarray], eps: float, delta: float = 1e-6, k: float = 3.0
                 ) -> np.ndarray:
    """m_l(eps) = ceil(K (6 + 2 eps) S_l log(8 eta / delta) / eps^2) per group (eta = channels of the network)."""
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    eta = sum(len(s) for s in sensitivities)
    log_term = math.log(8.0 * eta / delta)
    return np.array([math.ceil(k * (6.0 + 2.0 * eps) * float(np.sum(s)) * log_term / eps**2)
                     for s in sensitivities], dtype=np.float64)


def keep_ratios(sensitivities: Sequence[np.ndarray], eps: float, delta: float = 1e-6) -> np.ndarray:
    """Per group: expected unique samples / channels for the global eps."""
    ms = sample_sizes(sensitivities, eps, delta)
    return np.array([expected_unique(s, m) / len(s) for s, m in zip(sensitivities, ms)])


def find_eps(env: ChannelPruneEnv, sensitivities: Sequence[np.ndarray], budget: float | None = None,
             delta: float = 1e-6) -> tuple[float, np.ndarray]:
    """The global eps (brentq on log eps) whose plan is the largest meeting the budget; returns (eps, ratios)."""
    budget = env.budget if budget is None else float(budget)
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} must be in (0, 1]")

    def plan(u: float) -> np.ndarray:
        return np.clip(keep_ratios(sensitivities, math.exp(u), delta), env.min_keep, 1.0)

    # eps -> 0 (log 1e-6): every sampled channel kept; eps -> inf (log 1e6): min_keep. The cost falls as log eps
    # grows, so the root-finder (cost rising in its parameter) works on v = -log eps.
    lo, hi = math.log(1e-6), math.log(1e6)
    v = unwrap(env).cost.fit_parameter(lambda v: (plan(-v), None), -hi, -lo, budget, xtol=1e-7)
    if cost_of_ratios(env, plan(-v)) > budget:
        raise ValueError(f"budget={budget} is unreachable even with every group at min_keep={env.min_keep}")
    return math.exp(-v), plan(-v)


class PFPScorer:
    """Channel sensitivities on the first ``images`` calibration images as a scorer (higher = keep)."""

    name = "pfp"

    def __init__(self, images: int = 64, batch_size: int = 16, progress: bool = False):
        if not (isinstance(images, int) and images >= 1):
            raise ValueError(f"images={images!r} must be a positive integer")
        self.images, self.batch_size, self.progress = images, batch_size, progress
        self.sensitivities: list[np.ndarray] | None = None

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        if self.sensitivities is None:
            self.sensitivities = pfp_sensitivities(ctx.model, ctx.graph, ctx.calib.x[: self.images],
                                                   self.batch_size, self.progress, device=ctx.device)
        return self.sensitivities


@register("pfp")
class PFP(Baseline):
    """Options: ``images`` (calibration images for the sensitivities, 64), ``delta`` (failure probability)."""

    def prepare(self) -> ChannelPruneEnv:
        self.scorer = PFPScorer(int(self.options.get("images", 64)), progress=bool(self.options.get("progress",
                                                                                                     False)))
        return self.env.derive(scorer=self.scorer)

    def plan(self) -> np.ndarray:
        self.eps, ratios = find_eps(self.eval_env, self.eval_env.static_scores, delta=float(self.options.get(
            "delta", 1e-6)))
        return ratios
