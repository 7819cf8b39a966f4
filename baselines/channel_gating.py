"""Channel Gating (Hua, Zhou, De Sa, Zhang, Suh, "Channel Gating Neural Networks", NeurIPS 2019).

Algorithm (the paper's Section 3, for one gated convolution ``y = W * x`` with ``C_in`` input channels):

1. Split the input channels into a **base path** ``x_p`` (the first ``C_in // p`` channels; default ``p = 4``:
   the paper studies several base-path fractions) and the rest ``x_r``. The base path is always computed:
   ``s_p = W_p * x_p``.
2. Normalize the partial sum per output channel, ``z = (s_p - mu_c) / sigma_c`` (a BN without affine; ``mu_c``,
   ``sigma_c`` calibrated on the calibration split), and **gate** each output activation (channel and position)
   by ``z > Delta``. The per-channel threshold in raw units is ``Delta_c = mu_c + delta * sigma_c``.
3. Where the gate is open, the rest of the sum is computed: ``y = s_p + W_r * x_r``; where it is closed the
   output is the partial sum alone, ``y = s_p`` (so a gated-off activation is approximated, not zeroed).

Thresholds: the paper learns ``Delta`` per channel with a penalty pulling all of them toward one target ``delta``
(and trains the network with the gates). Here nothing is trained: ``delta`` is one shared threshold on the
normalized partial sums of all gated layers, *calibrated* so that a target fraction of their output activations
is gated off (``calibrate_gates`` records, per layer, the fraction of activations with ``z > delta`` on a grid of
``delta``; ``fit_threshold`` brackets ``delta`` from these tables and refines it with the real gated net so the
effective FLOPs meet a target).
BN statistics of the gated net are re-estimated on the calibration split (as the env does for every pruned net).

Effective FLOPs (``evaluate_channel_gating``) are counted exactly per input: every MAC of the base model, minus,
for every gated-off output activation, the ``(C_in - C_base) * k_h * k_w`` MACs of its rest path; averaged over
the split. The gate's normalization and comparison are element-wise and, as everywhere in this project, not
counted as MACs.

**CG versus the env's runtime gates.** CG is fine-grained: it decides per output *activation* (channel x position)
from the layer's own partial sum, always pays for the base path, keeps the partial sum where it stops, and only
saves MACs in the gated conv itself. The env's runtime mode (Chen et al. 2020, FBS-style) decides per input and
*whole channel* from a linear predictor on the pooled input, computes exactly the top-k channels, and also skips
those channels' inputs in the consumer conv. So ``channel_gating_topk`` (an env policy, ``plan()``) transfers
CG's per-layer allocation only: its runtime ratio for a gated group is CG's measured computed fraction of the
producer's MACs, ``(C_base + (C_in - C_base) * open fraction) / C_in`` on the calibration split, and the env then
executes that ratio with its own top-k gates. CG itself is measured by ``evaluate_channel_gating``; the
``channel_gating`` row of the benchmark is that real gated net (``ChannelGatingNet.own_network()``: every conv but
the first gated, the shared ``delta`` fitted to the env's budget, its own MAC count), fine-tuned like every method.
If gating alone cannot meet the env's budget (``delta`` capped at ``max_delta``), the static keep ratios are scaled
down uniformly until the plan fits.

Deviations: nothing is trained (the paper trains the network jointly with the gates and their thresholds), so
accuracy falls faster with the gated-off fraction than in the paper. The base path is the paper's first
``C_in // p`` input channels; ``base="l1"`` instead takes the ``C_in // p`` inputs with the largest weight mass
``sum |W[:, c]|`` (a no-retraining variant; on the tiny test ResNet-20 it is a little more accurate at equal
FLOPs). In env policy mode the gated convs are the producers of the env's gated groups (block-internal convs);
``evaluate_channel_gating(..., all_convs=True)`` gates every conv but the first, as the paper does.

Device: the calibration passes run on the env's device (a copy of the base model is moved there, float32); the
calibration tables come back as CPU tensors. The gated net is recalibrated and evaluated by the env
(``env.recalibrate_bn`` / ``env.evaluate``), on the env's device and with its evaluation precision, as every
pruned net.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from torch import nn

from envs.channel_prune import ChannelPruneEnv

from .base import Baseline, cost_of_ratios, register
from .finetune import check_positive, merge_options

GRID = torch.linspace(-4.0, 4.0, 401)  # delta grid of the calibration tables
BASE_RULES = ("first", "l1")
SPLITS = ("reward", "calib", "test", "train")
DEFAULTS = dict(p=4, base="first", delta=None, max_delta=1.0)


@dataclass
class GateCalibration:
    """Per gated conv: base-path width, partial-sum normalization and the open fraction as a function of delta."""

    layers: list[str]
    p: int
    base: str = "first"
    base_idx: dict[str, torch.Tensor] = field(default_factory=dict)  # input channels of the base path (sorted)
    n_base: dict[str, int] = field(default_factory=dict)
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    std: dict[str, torch.Tensor] = field(default_factory=dict)
    open_at: dict[str, torch.Tensor] = field(default_factory=dict)  # fraction of activations with z > GRID[j]
    rest_macs: dict[str, int] = field(default_factory=dict)  # MACs skipped per gated-off output activation

    def base_fraction(self, name: str, in_channels: int) -> float:
        return self.n_base[name] / in_channels

    def open_fraction(self, name: str, delta: float) -> float:
        j = int(torch.searchsorted(GRID, torch.tensor(float(delta))).clamp(0, len(GRID) - 1))
        return float(self.open_at[name][j])


class GatedConv(nn.Module):
    """A conv computing the base path everywhere and the rest only where ``(s_p - mean)/std > delta``.

    The rest path runs densely here and is masked (numerically identical to skipping it); the MACs it would
    really cost are counted from the open gates (``open_count``, summed over the samples seen).
    """

    def __init__(self, conv: nn.Conv2d, base_idx: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 delta: float | torch.Tensor):
        super().__init__()
        self.conv = conv
        nb = len(base_idx)
        mask = torch.ones(conv.in_channels, dtype=torch.bool)
        mask[base_idx] = False
        self.contiguous_base = bool(torch.equal(base_idx, torch.arange(nb)))  # the paper's "first 1/p"
        self.register_buffer("base_idx", base_idx.clone())
        self.register_buffer("rest_idx", torch.nonzero(mask).flatten())
        self.register_buffer("mean", mean.view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1, 1).clone())
        self.register_buffer("delta", torch.as_tensor(delta, dtype=torch.float32).reshape(1, -1, 1, 1).clone())
        self.reset_counts()

    def reset_counts(self) -> None:
        self.open_count, self.total_count, self.samples = 0.0, 0.0, 0

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, None, c.stride, c.padding, c.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        if self.contiguous_base:
            nb = len(self.base_idx)
            xb, wb, xr, wr = x[:, :nb], w[:, :nb], x[:, nb:], w[:, nb:]
        else:
            xb, wb = x.index_select(1, self.base_idx), w.index_select(1, self.base_idx)
            xr, wr = x.index_select(1, self.rest_idx), w.index_select(1, self.rest_idx)
        base = self._conv(xb, wb)
        gate = (base - self.mean) / self.std > self.delta
        out = base + self._conv(xr, wr) * gate
        if self.conv.bias is not None:
            out = out + self.conv.bias.view(1, -1, 1, 1)
        self.open_count += float(gate.sum())
        self.total_count += float(gate.numel())
        self.samples += int(x.shape[0])
        return out


def gated_layers(env: ChannelPruneEnv, all_convs: bool = False, p: int = 4) -> list[str]:
    """Names of the convs CG gates: the producers of the env's gated groups (of every gateable block-internal group
    in a static-mode env), or (``all_convs``) every conv but the first with ``groups == 1`` and at least ``p``
    input channels (the paper's choice)."""
    if not all_convs:
        return [v[1] for i, v in enumerate(env.problem.gate_layout)
                if v is not None and (env.gated[i] or env.mode != "runtime")]
    convs = [(n, m) for n, m in env.base_model.named_modules() if isinstance(m, nn.Conv2d)]
    order = _forward_order(env)
    convs.sort(key=lambda nm: order.get(nm[0], len(order)))
    return [n for n, m in convs[1:] if m.groups == 1 and m.in_channels >= p]


def _forward_order(env: ChannelPruneEnv) -> dict[str, int]:
    order: dict[str, int] = {}
    mods = {m: n for n, m in env.base_model.named_modules()}

    def record(mod: nn.Module, _inp) -> None:
        order.setdefault(mods[mod], len(order))

    hooks = [m.register_forward_pre_hook(record) for m in env.base_model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            env.base_model.eval()(env.problem.example_input)
    finally:
        for h in hooks:
            h.remove()
    return order


@torch.no_grad()
def calibrate_gates(env: ChannelPruneEnv, p: int = 4, all_convs: bool = False, split: str = "calib",
                    base: str = "first", batch_size: int = 128) -> GateCalibration:
    """Partial-sum statistics of the (ungated) base model on ``split``: per-channel mean/std and open fractions.

    Runs on ``env.device`` (a float32 copy of the base model); every table in the result is a CPU tensor.

    ``base``: which ``C_in // p`` input channels form the base path: ``"first"`` (the paper) or ``"l1"`` (those
    whose weight slices ``W[:, c]`` have the largest L1 norm; a no-retraining variant).
    """
    if not (isinstance(p, int) and not isinstance(p, bool) and p >= 1):
        raise ValueError(f"p={p!r} must be an integer >= 1 (the base path is the first C_in // p input channels)")
    if base not in BASE_RULES:
        raise ValueError(f"base={base!r} is not allowed; allowed: {', '.join(BASE_RULES)}")
    if split not in ("calib", "train"):
        raise ValueError(f"split={split!r} is not allowed for calibration; allowed: 'calib', 'train'")
    layers = gated_layers(env, all_convs, p)
    cal = GateCalibration(layers, p, base)
    mods = dict(env.base_model.named_modules())
    for n in layers:
        m = mods[n]
        nb = max(1, m.in_channels // p)
        if base == "first":
            cal.base_idx[n] = torch.arange(nb)
        else:
            mass = m.weight.detach().abs().sum((0, 2, 3))
            cal.base_idx[n] = mass.argsort(descending=True, stable=True)[:nb].sort().values
        cal.n_base[n] = nb
        cal.rest_macs[n] = (m.in_channels - cal.n_base[n]) * m.kernel_size[0] * m.kernel_size[1]
    dev = env.device
    partial: dict[str, torch.Tensor] = {}
    idx_dev = {n: cal.base_idx[n].to(dev) for n in layers}
    sums: dict[str, list] = {n: [torch.zeros(mods[n].out_channels, dtype=torch.float64, device=dev),
                                 torch.zeros(mods[n].out_channels, dtype=torch.float64, device=dev), 0]
                             for n in layers}
    grid = GRID.to(dev)

    def hook(mod, inp, _out, name):
        idx = idx_dev[name]
        s = F.conv2d(inp[0].index_select(1, idx), mod.weight.index_select(1, idx), None, mod.stride, mod.padding,
                     mod.dilation)
        partial[name] = s
        v = s.transpose(0, 1).flatten(1).double()
        sums[name][0] += v.sum(1)
        sums[name][1] += v.pow(2).sum(1)
        sums[name][2] += v.shape[1]

    data = getattr(env.data, split)
    model = copy.deepcopy(env.base_model).to(dev).eval()  # the base model stays where it is
    dmods = dict(model.named_modules())
    handles = [dmods[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in layers]
    mean, std = {}, {}
    try:
        for x, _ in data.batches(batch_size):  # pass 1: moments
            model(x.to(dev))
        for n in layers:
            s0, s1, cnt = sums[n]
            mu = s0 / cnt
            mean[n] = mu.float()
            std[n] = (s1 / cnt - mu.pow(2)).clamp_min(1e-12).sqrt().float().clamp_min(1e-6)
        counts = {n: torch.zeros(len(GRID), dtype=torch.float64, device=dev) for n in layers}
        totals = {n: 0 for n in layers}
        for x, _ in data.batches(batch_size):  # pass 2: histogram of the normalized partial sums
            partial.clear()
            model(x.to(dev))
            for n in layers:
                z = ((partial[n] - mean[n].view(1, -1, 1, 1)) / std[n].view(1, -1, 1, 1)).flatten()
                counts[n] += _above_counts(torch.bucketize(z, grid))  # bucket = number of grid points < z
                totals[n] += z.numel()
        for n in layers:
            cal.mean[n], cal.std[n] = mean[n].cpu(), std[n].cpu()
            cal.open_at[n] = (counts[n] / max(totals[n], 1)).float().cpu()
    finally:
        for h in handles:
            h.remove()
    return cal


def _above_counts(idx: torch.Tensor) -> torch.Tensor:
    """From bucket indices (number of grid points below each z): count of z > GRID[j] for every j."""
    hist = torch.bincount(idx, minlength=len(GRID) + 1).double()  # hist[k]: z with exactly k grid points below
    # z > GRID[j]  <=>  more than j grid points below  <=>  k >= j + 1
    return hist.flip(0).cumsum(0).flip(0)[1:]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _deltas(cal: GateCalibration, thresholds: float | Sequence | dict) -> dict[str, float | torch.Tensor]:
    """One delta per gated layer from a float (shared), a sequence (per layer, in ``cal.layers`` order; each a
    float or a per-channel tensor) or a {layer name: delta} dict."""
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        if thresholds != thresholds:
            raise ValueError(f"thresholds={thresholds!r} must not be NaN")
        return {n: float(thresholds) for n in cal.layers}
    if isinstance(thresholds, dict):
        missing = [n for n in cal.layers if n not in thresholds]
        if missing:
            raise ValueError(f"thresholds has no entry for gated layers {missing}; gated layers: {cal.layers}")
        return {n: thresholds[n] for n in cal.layers}
    if len(thresholds) != len(cal.layers):
        raise ValueError(f"thresholds has {len(thresholds)} entries; expected one per gated layer "
                         f"({len(cal.layers)}: {cal.layers}) or a single float")
    return dict(zip(cal.layers, thresholds))


def build_gated(env: ChannelPruneEnv, cal: GateCalibration, thresholds: float | Sequence | dict,
                recalibrate: bool = True) -> tuple[nn.Module, dict[str, GatedConv]]:
    """A deep copy of ``env.base_model`` with every calibrated conv swapped for a ``GatedConv``."""
    model = copy.deepcopy(env.base_model)
    mods = dict(model.named_modules())
    gates: dict[str, GatedConv] = {}
    for n, d in _deltas(cal, thresholds).items():
        gates[n] = GatedConv(mods[n], cal.base_idx[n], cal.mean[n], cal.std[n], d)
        _set_module(model, n, gates[n])
    if recalibrate:
        env.recalibrate_bn(model)
    for g in gates.values():
        g.reset_counts()
    return model.eval(), gates


@torch.no_grad()
def evaluate_channel_gating(
    env: ChannelPruneEnv,
    thresholds: float | Sequence | dict,
    p: int = 4,
    all_convs: bool = False,
    split: str = "reward",
    base: str = "first",
    recalibrate: bool = True,
    calibration: GateCalibration | None = None,
) -> dict:
    """Run the real channel-gated net on ``split``; accuracy and exactly counted effective FLOPs.

    ``thresholds``: the normalized threshold ``delta`` (one float for every gated conv, or one per gated conv).
    ``calibration`` (from ``calibrate_gates``) overrides ``p``, ``all_convs`` and ``base``. Returns ``accuracy``,
    ``loss``, ``effective_flops_ratio`` (per-input MACs computed / the base model's), ``open_fraction`` and
    ``computed_fraction`` per gated conv ({name: value}), ``delta``, ``layers``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    cal = calibration if calibration is not None else calibrate_gates(env, p, all_convs, base=base)
    model, gates = build_gated(env, cal, thresholds, recalibrate)
    return {**measure_gated(env, model, gates, cal, split), "layers": list(cal.layers), "delta": thresholds}


@torch.no_grad()
def measure_gated(env: ChannelPruneEnv, model: nn.Module, gates: dict[str, GatedConv], cal: GateCalibration,
                  split: str = "reward") -> dict:
    """Accuracy, loss and exactly counted effective FLOPs of a gated net (``build_gated``) on ``split``."""
    for g in gates.values():
        g.reset_counts()
    acc, loss = env.evaluate(model, split)
    total = float(env.graph.base_macs)
    saved = 0.0
    open_frac, computed = {}, {}
    mods = dict(env.base_model.named_modules())
    for n, g in gates.items():
        off_per_input = (g.total_count - g.open_count) / max(g.samples, 1)
        saved += off_per_input * cal.rest_macs[n]
        open_frac[n] = g.open_count / max(g.total_count, 1.0)
        fb = cal.base_fraction(n, mods[n].in_channels)
        computed[n] = fb + (1.0 - fb) * open_frac[n]
    return {"accuracy": acc, "loss": loss, "effective_flops_ratio": (total - saved) / total,
            "open_fraction": open_frac, "computed_fraction": computed}


def predicted_ratio(env: ChannelPruneEnv, cal: GateCalibration, delta: float) -> float:
    """The effective FLOPs ratio the calibration tables predict for a shared ``delta``: the base model's partial
    sums, so without the effect of upstream gates and of BN recalibration (``fit_threshold`` measures those)."""
    mods = dict(env.base_model.named_modules())
    per = env.graph.base_macs_per_module
    saved = sum((1.0 - cal.open_fraction(n, delta)) * per[n] * (1.0 - cal.base_fraction(n, mods[n].in_channels))
                for n in cal.layers)
    return 1.0 - saved / float(env.graph.base_macs)


def fit_threshold(env: ChannelPruneEnv, target: float, calibration: GateCalibration | None = None,
                  lo: float = -4.0, hi: float = 4.0, iters: int = 10, width: float = 0.25, xtol: float = 0.005,
                  **calib_kwargs) -> float:
    """Smallest shared ``delta`` whose measured effective FLOPs ratio on the calibration split is <= ``target``
    (``hi`` if even that does not meet it; ``lo`` if everything does). ``calib_kwargs`` go to ``calibrate_gates``
    (``p``, ``all_convs``, ``base``) when no ``calibration`` is given.

    Every measurement builds, recalibrates and runs the real gated net, so they are spent sparingly: the tables'
    prediction (``predicted_ratio``) gives a bracket of +-``width`` (widened to ``lo`` / ``hi`` when the
    measurement falls outside it), then scipy's brentq on the measured ratio (at most ``iters`` iterations, to
    ``xtol``); the answer is the smallest measured ``delta`` that meets the target."""
    check_positive("target", target)
    cal = calibration if calibration is not None else calibrate_gates(env, **calib_kwargs)
    measured: dict[float, float] = {}

    def excess(d: float) -> float:
        if d not in measured:
            measured[d] = evaluate_channel_gating(env, d, split="calib", calibration=cal)["effective_flops_ratio"]
        return measured[d] - target

    d0 = next((float(d) for d in GRID if lo <= d <= hi and predicted_ratio(env, cal, float(d)) <= target), hi)
    a, b = max(lo, d0 - width), min(hi, d0 + width)
    if excess(b) > 0:
        if b == hi or excess(hi) > 0:
            return hi
        a, b = b, hi
    elif excess(a) <= 0:
        if a == lo or excess(lo) <= 0:
            return lo
        a, b = lo, a
    try:
        brentq(excess, a, b, xtol=xtol, maxiter=iters)
    except RuntimeError:  # not converged within ``iters``: the best measured delta so far
        pass
    return min(d for d, r in measured.items() if r <= target)


@register("channel_gating_topk")
class ChannelGating(Baseline):
    """Channel Gating's per-layer computed fractions as runtime keep ratios, executed by the env's own
    whole-channel top-k gates (a transfer of CG's allocation; ``channel_gating`` is CG itself).

    Options: ``p`` (4), ``base`` ("first"), ``delta`` (None: the smallest grid delta whose predicted plan meets
    the budget, at most ``max_delta``), ``max_delta`` (1.0).
    """

    runtime = True

    def prepare(self) -> ChannelPruneEnv:
        if self.env.mode != "runtime":
            # CG plans runtime ratios: on a static env it runs on the same env in runtime mode, whose budget then
            # bounds effective FLOPs (the benchmark reports them in their own column)
            return self.env.derive(mode="runtime")
        return self.env

    def _rt(self, computed: dict[str, float]) -> np.ndarray:
        """Runtime ratio per group: CG's computed fraction for a gated group's producer, 1 elsewhere."""
        env = self.eval_env
        rt = np.ones(env.n_groups)
        for i, v in enumerate(env.problem.gate_layout):
            if v is not None and env.gated[i]:
                rt[i] = min(1.0, max(computed[v[1]], env.min_keep))
        return rt

    def plan(self) -> np.ndarray:
        env = self.eval_env
        o = merge_options(self.name, self.options, DEFAULTS)
        self.p, self.base = o["p"], o["base"]
        self.calibration = cal = calibrate_gates(env, self.p, base=self.base)
        mods = dict(env.base_model.named_modules())

        def predicted(d: float) -> dict[str, float]:
            out = {}
            for n in cal.layers:
                fb = cal.base_fraction(n, mods[n].in_channels)
                out[n] = fb + (1.0 - fb) * cal.open_fraction(n, d)
            return out

        ones = np.ones(env.n_groups)
        if o["delta"] is not None:
            self.delta = float(o["delta"])
        else:  # the least gating whose predicted plan fits, from the calibration tables
            grid = [round(float(d), 4) for d in GRID if d <= o["max_delta"]]
            fits = [d for d in grid if cost_of_ratios(env, ones, self._rt(predicted(d))) <= env.budget]
            self.delta = fits[0] if fits else grid[-1]
        self.measured = evaluate_channel_gating(env, self.delta, split="calib", calibration=cal)
        rt = self._rt(self.measured["computed_fraction"])
        static = ones if cost_of_ratios(env, ones, rt) <= env.budget else self._fit_static(rt)
        return np.stack([static, rt], axis=1)

    def _fit_static(self, rt: np.ndarray) -> np.ndarray:
        """The largest uniform static ratio s whose plan (s, rt) meets the budget (the env's root-finder)."""
        env = self.eval_env
        s = env.cost.fit_parameter(lambda s: (np.full(env.n_groups, s), rt), env.min_keep, 1.0)
        return np.full(env.n_groups, s)


@register("channel_gating")
class ChannelGatingNet(ChannelGating):
    """Channel Gating itself: the real activation-level gated network (every conv but the first gated, the shared
    ``delta`` fitted on the calibration split to the env's budget) and its own exact MAC count. As an env policy it
    plays the ``channel_gating_topk`` plan; the benchmark evaluates ``own_network()`` instead."""

    def own_network(self):
        """The gated net at the env's budget and ``measure(net, split)``. Its effective FLOPs are measured wherever
        it runs: after a fine-tune they can move away from the budget its ``delta`` was fitted to (reported as
        measured)."""
        o = merge_options(self.name, self.options, DEFAULTS)
        cal = calibrate_gates(self.env, o["p"], True, base=o["base"])
        self.delta = fit_threshold(self.env, self.env.budget, calibration=cal)
        model, gates = build_gated(self.env, cal, self.delta)
        return model, lambda net, split: measure_gated(self.env, net, gates, cal, split)
