"""Channel importance: the static and runtime importance predictors, and the classic criteria.

Static importance (dataset-wide; decides which channels are removed for storage):

* ``taylor`` (default): first-order Taylor, ``|sum(a * dL/da)|`` at the group's BN outputs on the calibration
  split. The default because it was the best pruner of all scorers (``python -m baselines.experiments.predictors``,
  README "Importance predictors"): at uniform keep ratios on ResNet-18 it kept 0.4-5.3 points more test accuracy
  than the learned predictor and 5-28 points more than L1.
* ``l1``: sum of the group's producer filters' L1 norms (each producer normalized by its mean; Li et al. 2017).
* ``bn``: sum of the group's BatchNorm ``|gamma|`` (Network Slimming).
* ``fpgm``: a filter's summed distance to the layer's other filters (He et al., CVPR 2019: the filters nearest
  the geometric median are the most replaceable, so they go first).
* ``learned``: the **static importance predictor**, a small MLP over per-channel features (filter L1 and
  L2 norms, BN |gamma|, Taylor, mean activation, distance to the layer's geometric median), trained to predict
  the measured loss increase when the channel alone is masked, on a sample of channels; its rank correlation with
  the measured ground truth on held-out channels is reported.

Runtime importance (per input; decides what each input computes): the **runtime importance predictor** is an
FBS-style gate per block-internal group, ``saliency = Linear(GAP(input of the producer conv))``, fitted with the
base net frozen (ridge regression, closed form) to each input's per-channel output saliency (mean post-ReLU
activation). Residual-stream groups carry no gate (their runtime ratio is fixed to 1). Its quality is reported as
the mean per-input Spearman correlation on the calibration split.

Both predictors are trained once per checkpoint and cached next to it (``<checkpoint>.importance.pt``, loaded
with ``weights_only=True``). A scorer is any object with ``scores(ctx) -> list[np.ndarray]`` (one array per
group, higher = more important), so a baseline can plug its own.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm

from .data import Split
from .groups import GroupGraph, channel_dim
from .paths import atomic_save

SCORERS = ("learned", "l1", "bn", "taylor", "fpgm")
DEFAULT_SCORER = "taylor"  # the best pruner of SCORERS on ResNet-18 (baselines.experiments.predictors)
FEATURES = ("l1", "l2", "bn", "taylor", "act", "gm_dist")


@dataclass
class ImportanceContext:
    """What a scorer may read: the base model, its groups and the calibration data."""

    model: nn.Module
    graph: GroupGraph
    calib: Split
    train: Split | None = None
    device: torch.device = torch.device("cpu")  # where the data-driven scorers run their forward passes


class Scorer(Protocol):
    name: str

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]: ...


# ------------------------------------------------------------------------------------------- per-channel features
def _norm(v: torch.Tensor) -> torch.Tensor:
    return v / v.mean().clamp_min(1e-12)


def weight_norms(ctx: ImportanceContext, p: int = 1) -> list[np.ndarray]:
    mods = dict(ctx.model.named_modules())
    out = []
    for g in ctx.graph.groups:
        total = torch.zeros(g.num_channels)
        for name in g.producers:
            w = mods[name].weight.detach()
            total += _norm(w.flatten(1).norm(p=p, dim=1))
        out.append(total.numpy() / len(g.producers))
    return out


def bn_scales(ctx: ImportanceContext) -> list[np.ndarray]:
    mods = dict(ctx.model.named_modules())
    out = []
    for g in ctx.graph.groups:
        if not g.bns:
            out.append(weight_norms(ctx, 1)[g.index])
            continue
        total = sum(mods[n].weight.detach().abs() for n in g.bns)
        out.append((total / len(g.bns)).numpy())
    return out


def geometric_median_distance(ctx: ImportanceContext) -> list[np.ndarray]:
    """FPGM's criterion: sum of distances from a filter to all others (small = replaceable)."""
    mods = dict(ctx.model.named_modules())
    out = []
    for g in ctx.graph.groups:
        total = torch.zeros(g.num_channels)
        for name in g.producers:
            w = mods[name].weight.detach().flatten(1)
            total += _norm(torch.cdist(w, w).sum(1))
        out.append(total.numpy() / len(g.producers))
    return out


def taylor_and_activation(ctx: ImportanceContext, batch_size: int = 128) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First-order Taylor |sum a*dL/da| and mean |a| at each group's BN (or producer) outputs."""
    dev = ctx.device
    model = copy.deepcopy(ctx.model).to(dev)  # the base model stays where it is, untouched
    mods = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    hooks = []
    targets = {n: (g.bns or g.producers) for g in ctx.graph.groups for n in [g.name]}
    names = sorted({n for v in targets.values() for n in v})

    def make(name):
        def hook(_m, _i, out):
            out.retain_grad()
            acts[name] = out
        return hook

    for n in names:
        hooks.append(mods[n].register_forward_hook(make(n)))
    taylor = {n: torch.zeros(mods[n].weight.shape[0] if hasattr(mods[n], "weight") else 1, device=dev)
              for n in names}
    act = {n: torch.zeros_like(taylor[n]) for n in names}
    model.eval()
    try:
        for x, y in ctx.calib.batches(batch_size):
            x, y = x.to(dev), y.to(dev)
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            for n in names:
                a = acts[n]
                cd = channel_dim(mods[n])  # (N, C, ...) for convs / BN, (N, ..., C) for linear layers
                ta = (a * a.grad).movedim(cd, 1)
                aa = a.detach().movedim(cd, 1)
                taylor[n] += ta.reshape(*ta.shape[:2], -1).sum(2).abs().sum(0).detach()
                act[n] += aa.clamp_min(0).reshape(*aa.shape[:2], -1).mean(2).sum(0)
    finally:
        for h in hooks:
            h.remove()
    taylor = {n: v.cpu() for n, v in taylor.items()}
    act = {n: v.cpu() for n, v in act.items()}
    t_out, a_out = [], []
    for g in ctx.graph.groups:
        ns = targets[g.name]
        t_out.append((sum(_norm(taylor[n]) for n in ns) / len(ns)).numpy())
        a_out.append((sum(_norm(act[n]) for n in ns) / len(ns)).numpy())
    return t_out, a_out


def channel_features(ctx: ImportanceContext) -> list[np.ndarray]:
    """(C, len(FEATURES)) features per group, each column rank-normalized to [0, 1] within the group."""
    taylor, act = taylor_and_activation(ctx)
    cols = [weight_norms(ctx, 1), weight_norms(ctx, 2), bn_scales(ctx), taylor, act, geometric_median_distance(ctx)]
    feats = []
    for gi, g in enumerate(ctx.graph.groups):
        mat = np.stack([c[gi] for c in cols], axis=1).astype(np.float64)
        ranks = mat.argsort(0).argsort(0) / max(g.num_channels - 1, 1)
        feats.append(ranks.astype(np.float32))
    return feats


# ------------------------------------------------------------------------------------------- classic scorers
class L1Scorer:
    name = "l1"

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        return weight_norms(ctx, 1)


class BNScaleScorer:
    name = "bn"

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        return bn_scales(ctx)


class TaylorScorer:
    name = "taylor"

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        return taylor_and_activation(ctx)[0]


class FPGMScorer:
    name = "fpgm"

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        return geometric_median_distance(ctx)


# ------------------------------------------------------------------------------------------- static predictor
class StaticMLP(nn.Module):
    def __init__(self, n_features: int = len(FEATURES) + 2, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _group_context(graph: GroupGraph) -> list[np.ndarray]:
    """Per-group context features appended to each channel's row: relative depth, log2 width."""
    n = len(graph.groups)
    return [np.array([g.index / max(n - 1, 1), np.log2(g.num_channels) / 10.0], dtype=np.float32) for g in graph.groups]


@torch.no_grad()
def measure_mask_loss_increase(
    ctx: ImportanceContext, samples: Sequence[tuple[int, int]], images: int = 256, progress: bool = True
) -> np.ndarray:
    """Ground truth: loss increase on ``images`` calibration images when channel c of group g alone is masked."""
    dev = ctx.device
    model = copy.deepcopy(ctx.model).to(dev).eval()  # masks go through hooks on this copy only
    x, y = ctx.calib.x[:images].to(dev), ctx.calib.y[:images].to(dev)
    base = F.cross_entropy(model(x), y).item()
    out = np.zeros(len(samples))
    for i, (gi, c) in enumerate(tqdm(samples, desc="static importance ground truth", disable=not progress,
                                      mininterval=2.0)):
        mask = torch.ones(ctx.graph.groups[gi].num_channels, device=dev)
        mask[c] = 0.0
        hooks = ctx.graph.mask_hooks(model, {gi: mask})
        try:
            out[i] = F.cross_entropy(model(x), y).item() - base
        finally:
            for h in hooks:
                h.remove()
    return out


def train_static_predictor(
    ctx: ImportanceContext,
    per_group: int = 8,
    images: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Fit the static predictor. Returns (state to cache, quality report)."""
    rng = np.random.default_rng(seed)
    feats = channel_features(ctx)
    ctxf = _group_context(ctx.graph)
    samples = []
    for g in ctx.graph.groups:
        k = min(per_group, g.num_channels)
        samples += [(g.index, int(c)) for c in rng.choice(g.num_channels, k, replace=False)]
    target = measure_mask_loss_increase(ctx, samples, images, progress)
    rows = np.stack([np.concatenate([feats[g][c], ctxf[g]]) for g, c in samples]).astype(np.float32)
    scale = float(np.abs(target).mean() + 1e-8)
    yt = target / scale
    # held-out channels for the quality report (30%), training on the rest
    perm = rng.permutation(len(samples))
    n_test = max(2, int(0.3 * len(samples)))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    torch.manual_seed(seed)
    mlp = StaticMLP(rows.shape[1])
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3, weight_decay=1e-3)
    xt, ytt = torch.from_numpy(rows[train_idx]), torch.from_numpy(yt[train_idx]).float()
    for _ in range(600):
        opt.zero_grad()
        loss = F.smooth_l1_loss(mlp(xt), ytt)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = mlp(torch.from_numpy(rows)).numpy()
    rho = float(spearmanr(pred[test_idx], target[test_idx]).statistic)
    l1_rank = np.array([feats[g][c][0] for g, c in samples])
    rho_l1 = float(spearmanr(l1_rank[test_idx], target[test_idx]).statistic)
    report = {"static_spearman_heldout": rho, "l1_spearman_heldout": rho_l1, "channels_measured": len(samples),
              "heldout_channels": int(n_test)}
    # refit on all measured channels for use
    xa, ya = torch.from_numpy(rows), torch.from_numpy(yt).float()
    mlp = StaticMLP(rows.shape[1])
    torch.manual_seed(seed)
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(600):
        opt.zero_grad()
        F.smooth_l1_loss(mlp(xa), ya).backward()
        opt.step()
    with torch.no_grad():
        scores = [mlp(torch.from_numpy(np.concatenate([feats[g.index], np.repeat(ctxf[g.index][None], g.num_channels, 0)],
                                                       1))).numpy() * scale for g in ctx.graph.groups]
    state = {"mlp": mlp.state_dict(), "scale": torch.tensor(scale),
             "scores": [torch.from_numpy(s.astype(np.float32)) for s in scores]}
    return state, report


# ------------------------------------------------------------------------------------------- runtime predictor
def gate_layout(graph: GroupGraph) -> list[tuple[int, str, str, str] | None]:
    """Per group: (group index, producer conv, its BN, consumer conv) if the group can be gated at run time.

    Gated: a conv -> BN -> conv chain whose consumer reads exactly this group's channels and whose producer reads
    the image or exactly one group (the gate's weights are sliced by that group's kept channels). Groups inside a
    concatenation (DenseNet, Inception), squeeze-excitation convs without a BN, linear layers and depthwise
    groups are left ungated (runtime ratio 1)."""
    mods = dict(graph.model.named_modules())
    out = []
    for g in graph.groups:
        ok = (g.kind == "internal" and len(g.producers) == 1 and len(g.consumers) == 1 and len(g.bns) == 1
              and not g.depthwise and not g.shared and isinstance(mods[g.producers[0]], nn.Conv2d)
              and isinstance(mods[g.consumers[0]], nn.Conv2d) and mods[g.consumers[0]].groups == 1
              and graph.is_exact_reader(g.consumers[0], g.index))
        if ok:
            reads = graph.input_groups(g.producers[0])
            ok = not reads or (len(reads) == 1 and graph.is_exact_reader(g.producers[0], reads[0]))
        out.append((g.index, g.producers[0], g.bns[0], g.consumers[0]) if ok else None)
    return out


@torch.no_grad()
def collect_gate_data(model: nn.Module, graph: GroupGraph, x: torch.Tensor, batch_size: int = 256):
    """Per gated group: GAP of the producer's input (N, C_in) and post-ReLU output saliency (N, C_out), on the CPU
    (the forward passes run wherever ``model`` is)."""
    dev = next(model.parameters()).device
    layout = gate_layout(graph)
    mods = dict(model.named_modules())
    ins: dict[int, list] = {i: [] for i, v in enumerate(layout) if v}
    outs: dict[int, list] = {i: [] for i, v in enumerate(layout) if v}
    hooks = []
    for i, v in enumerate(layout):
        if not v:
            continue
        _, prod, bn, _ = v
        hooks.append(mods[prod].register_forward_pre_hook(
            lambda m, inp, i=i: ins[i].append(inp[0].mean((2, 3)).float().cpu())))
        hooks.append(mods[bn].register_forward_hook(
            lambda m, inp, out, i=i: outs[i].append(out.clamp_min(0).mean((2, 3)).float().cpu())))
    was = model.training
    model.eval()
    try:
        for j in range(0, len(x), batch_size):
            model(x[j : j + batch_size].to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {i: (torch.cat(ins[i]), torch.cat(outs[i])) for i in ins}


def fit_runtime_predictor(
    ctx: ImportanceContext, fit_images: int = 2048, ridge: float = 1e-2, progress: bool = True
) -> tuple[dict, dict]:
    """Fit one linear gate per gated group by ridge regression; report per-input Spearman on the calib split."""
    src = ctx.train if ctx.train is not None else ctx.calib
    x_fit = src.x[:fit_images]
    if progress:
        print(f"fitting runtime importance gates on {len(x_fit)} images ...", file=sys.stderr)
    fit = collect_gate_data(ctx.model, ctx.graph, x_fit)
    val = collect_gate_data(ctx.model, ctx.graph, ctx.calib.x)
    state: dict = {}
    rhos, rhos_static = [], []
    for i, (xin, yout) in fit.items():
        xa = torch.cat([xin, torch.ones(len(xin), 1)], 1).double()
        reg = ridge * torch.eye(xa.shape[1], dtype=torch.float64) * xa.pow(2).mean()
        reg[-1, -1] = 0
        w = torch.linalg.solve(xa.T @ xa + reg * len(xa), xa.T @ yout.double())  # (C_in+1, C_out)
        state[f"gate{i}.weight"] = w[:-1].T.float().contiguous()
        state[f"gate{i}.bias"] = w[-1].float().contiguous()
        vin, vout = val[i]
        pred = vin @ state[f"gate{i}.weight"].T + state[f"gate{i}.bias"]
        static = vout.mean(0, keepdim=True).expand_as(vout)  # a per-input-agnostic ranking, for comparison
        per_in = [spearmanr(pred[n].numpy(), vout[n].numpy()).statistic for n in range(min(256, len(vout)))]
        per_st = [spearmanr(static[n].numpy() + 1e-9 * np.arange(static.shape[1]), vout[n].numpy()).statistic
                  for n in range(min(256, len(vout)))]
        rhos.append(float(np.nanmean(per_in)))
        rhos_static.append(float(np.nanmean(per_st)))
    report = {"runtime_spearman_per_input": float(np.mean(rhos)) if rhos else float("nan"),
              "runtime_spearman_static_ranking": float(np.mean(rhos_static)) if rhos_static else float("nan"),
              "gated_groups": len(fit)}
    return state, report


# ------------------------------------------------------------------------------------------- cache
def _structure_key(graph: GroupGraph) -> str:
    h = hashlib.sha1()
    for g in graph.groups:
        h.update(f"{g.name}:{g.num_channels}:{','.join(g.producers)}|".encode())
    return h.hexdigest()[:10]


class ImportancePredictors:
    """Static scores and runtime gates for one checkpoint, trained once and cached."""

    def __init__(self, static_scores: list[np.ndarray], gates: dict, report: dict):
        self.static_scores = static_scores
        self.gates = gates  # "gate{i}.weight" (C_out, C_in), "gate{i}.bias" (C_out,)
        self.report = report

    def has_gate(self, i: int) -> bool:
        return f"gate{i}.weight" in self.gates

    @classmethod
    def load_or_train(
        cls, ctx: ImportanceContext, cache_path: Path | None, progress: bool = True, per_group: int = 8,
        images: int = 256, seed: int = 0,
    ) -> "ImportancePredictors":
        """The cached predictors of ``cache_path`` (a checkpoint), else trained (``seed``: which channels are
        measured and the MLP's initialisation) and cached."""
        key = _structure_key(ctx.graph) + (f"-s{seed}" if seed else "")  # seed 0 keeps the caches of before
        path = None if cache_path is None else Path(f"{cache_path}.importance-{key}-{per_group}-{images}.pt")
        if path is not None and path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                scores = [s.numpy() for s in blob["static"]["scores"]]
                report = {k: float(v) for k, v in blob["report"].items()}
                return cls(scores, blob["gates"], report)
            except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                print(f"rebuilding unreadable importance cache {path}: {exc}", file=sys.stderr)
        static, rep_s = train_static_predictor(ctx, per_group=per_group, images=images, seed=seed,
                                               progress=progress)
        gates, rep_r = fit_runtime_predictor(ctx, progress=progress)
        report = {**rep_s, **rep_r}
        if path is not None:
            atomic_save({"static": static, "gates": gates,
                         "report": {k: torch.tensor(float(v)) for k, v in report.items()}}, path)
        return cls([s.numpy() for s in static["scores"]], gates, report)


class LearnedScorer:
    """The static importance predictor as a scorer."""

    name = "learned"

    def __init__(self, predictors: ImportancePredictors):
        self.predictors = predictors

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        return self.predictors.static_scores


def make_scorer(name: str, predictors: ImportancePredictors | None = None) -> Scorer:
    if name == "learned":
        if predictors is None:
            raise ValueError("scorer='learned' needs the importance predictors")
        return LearnedScorer(predictors)
    if name == "l1":
        return L1Scorer()
    if name == "bn":
        return BNScaleScorer()
    if name == "taylor":
        return TaylorScorer()
    if name == "fpgm":
        return FPGMScorer()
    raise ValueError(f"unknown scorer {name!r}; allowed: {', '.join(SCORERS)} or an object with scores(ctx)")
