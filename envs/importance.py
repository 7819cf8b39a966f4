"""Channel importance: the static and runtime importance predictors, and the classic criteria.

Static importance (dataset-wide; decides which channels are removed for storage):

* ``taylor`` (default): first-order Taylor, ``|sum(a * dL/da)|`` at the group's BN outputs on the calibration
  split. The default because it was the best pruner of all scorers (``python -m baselines.experiments.predictors``,
  docs/reports/predictors.md): at uniform keep ratios on ResNet-18 it kept 0.4-5.3 points more test accuracy
  than the learned predictor and 5-28 points more than L1.
* ``l1``: sum of the group's producer filters' L1 norms (each producer normalized by its mean; Li et al. 2017).
* ``bn``: sum of the group's BatchNorm ``|gamma|`` (Network Slimming).
* ``fpgm``: a filter's summed distance to the layer's other filters (He et al., CVPR 2019: the filters nearest
  the geometric median are the most replaceable, so they go first).
* ``learned``: the **static importance predictor**, a small MLP over per-channel features (filter L1 and
  L2 norms, BN |gamma|, Taylor, mean activation, distance to the layer's geometric median, depth, width), trained
  for what the env asks of it: which channels a group keeps at a keep ratio. Per group and keep ratio it measures
  the loss of a few plausible keep sets and learns a correction to Taylor's within-group rank that ranks them
  (``train_static_predictor``); how often it orders held-out keep sets right, next to Taylor and L1, is reported.

Runtime importance (per input; decides what each input computes): the **runtime importance predictor**, an
FBS-style gate per block-internal group, lives in ``envs.gates`` (fitted by ridge regression onto activations,
or trained end to end through the frozen network); this module loads or trains it and caches it.

Each predictor is trained once per checkpoint, only when asked for (the static one for ``scorer="learned"``, the
gates in runtime mode), and cached next to it (``<checkpoint>.static-predictor-*.pt``,
``<checkpoint>.runtime-gates-*.pt``; loaded with ``weights_only=True``). A scorer is any object with
``scores(ctx) -> list[np.ndarray]`` (one array per group, higher = more important), so a baseline can plug its own.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Split
from .gates import (DEFAULT_GATE_STEPS, DEFAULT_RUNTIME_GATES, check_gate_training, fit_runtime_predictor,
                    train_gates_end_to_end)
from .groups import GroupGraph, channel_dim
from .paths import atomic_save

SCORERS = ("learned", "l1", "bn", "taylor", "fpgm")
DEFAULT_SCORER = "taylor"  # the best pruner of SCORERS on ResNet-18 (baselines.experiments.predictors)
FEATURES = ("l1", "l2", "bn", "taylor", "act", "gm_dist")
BASE_CRITERION = "taylor"  # the learned predictor corrects its rank (the best classic pruner)


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


def taylor_and_activation(ctx: ImportanceContext, batch_size: int = 128
                          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
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
    cols = [weight_norms(ctx, 1), weight_norms(ctx, 2), bn_scales(ctx), taylor, act,
            geometric_median_distance(ctx)]
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
    """A channel's correction to the base criterion's rank; the last layer starts at zero, so an untrained
    predictor ranks exactly as the base criterion does."""

    def __init__(self, n_features: int = len(FEATURES) + 2, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _group_context(graph: GroupGraph) -> list[np.ndarray]:
    """Per-group context features appended to each channel's row: relative depth, log2 width."""
    n = len(graph.groups)
    return [np.array([g.index / max(n - 1, 1), np.log2(g.num_channels) / 10.0], dtype=np.float32)
            for g in graph.groups]


SUBSET_RATIOS = (0.3, 0.5, 0.7)  # the keep ratios the static predictor is trained at: those the env is asked for


@torch.no_grad()
def measure_subset_losses(
    ctx: ImportanceContext, subsets: Sequence[tuple[int, np.ndarray]], images: int = 128, progress: bool = True
) -> np.ndarray:
    """Ground truth: cross-entropy on the first ``images`` calibration images when group g keeps only the channels
    ``keep`` (every other group whole), for each ``(g, keep)`` of ``subsets``; masked, not pruned."""
    dev = ctx.device
    model = copy.deepcopy(ctx.model).to(dev).eval()  # masks go through hooks on this copy only
    x, y = ctx.calib.x[:images].to(dev), ctx.calib.y[:images].to(dev)
    out = np.zeros(len(subsets))
    for i, (gi, keep) in enumerate(tqdm(subsets, desc="static predictor: subset losses", disable=not progress,
                                        mininterval=2.0)):
        mask = torch.zeros(ctx.graph.groups[gi].num_channels, device=dev)
        mask[torch.as_tensor(keep, device=dev)] = 1.0
        hooks = ctx.graph.mask_hooks(model, {gi: mask})
        try:
            out[i] = F.cross_entropy(model(x), y).item()
        finally:
            for h in hooks:
                h.remove()
    return out


def candidate_subsets(feats: np.ndarray, k: int, n: int, rng: np.random.Generator, noise: float = 0.15
                      ) -> list[np.ndarray]:
    """``n`` keep sets of ``k`` channels that a pruner could plausibly choose: the top k by a random convex mix of
    the group's rank-normalized criteria (``feats``, one column each) plus Gaussian noise of ``noise``."""
    out = []
    for _ in range(n):
        mix = feats @ rng.dirichlet(np.ones(feats.shape[1])) + rng.normal(0.0, noise, len(feats))
        out.append(np.sort(np.argsort(-mix, kind="stable")[:k]))
    return out


def _pairs(cells: np.ndarray, losses: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(better, worse, weight) over the pairs of subsets in ``idx`` measured in the same (group, ratio) cell;
    the weight is the loss gap relative to the mean gap (capped at 3), so near-ties count little."""
    pairs = [sorted(pair, key=lambda m: losses[m]) for cell in np.unique(cells[idx])
             for pair in itertools.combinations(idx[cells[idx] == cell], 2)]
    a, b = (np.array([p[i] for p in pairs], dtype=np.int64) for i in (0, 1))
    gap = losses[b] - losses[a]
    return a, b, np.minimum(gap / max(gap.mean(), 1e-12), 3.0) if len(gap) else gap


def _pair_accuracy(utility: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float:
    """Share of the pairs (weighted by their loss gap) whose lower-loss subset has the higher ``utility``."""
    a, b, w = pairs
    return float(((utility[a] > utility[b]) * w).sum() / max(w.sum(), 1e-12))


def _fit_ranker(rows: torch.Tensor, base: torch.Tensor, member: torch.Tensor, pairs, seed: int, steps: int = 400
                ) -> StaticMLP:
    """An MLP correction f to each channel's ``base`` rank, so that a subset's utility mean(base + f over its
    channels) ranks the measured subsets of each cell (RankNet's pairwise logistic loss, weighted by the loss
    gap). It starts from the base criterion and moves only where the measured keep sets say so."""
    torch.manual_seed(seed)
    mlp = StaticMLP(rows.shape[1])
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3, weight_decay=1e-3)
    a, b, w = (torch.from_numpy(v) for v in pairs)
    w = w.float()
    for _ in range(steps):
        opt.zero_grad()
        u = member @ (base + mlp(rows))
        # x10: keep sets of one cell share most channels, so their mean scores differ by little
        # clamp: when every measured set loses the same there is nothing to learn (and 0/0 would be NaN)
        (F.softplus(-(u[a] - u[b]) * 10.0) * w).sum().div(w.sum().clamp_min(1e-12)).backward()
        opt.step()
    return mlp


def check_importance_samples(per_group) -> None:
    """ValueError unless ``per_group`` (the env's ``importance_samples``) is an integer >= 2."""
    if isinstance(per_group, bool) or not (isinstance(per_group, int) and per_group >= 2):
        raise ValueError(f"importance_samples (per_group)={per_group!r}: the static predictor ranks keep sets "
                         "against each other, so it needs an integer >= 2 per group and ratio")


def train_static_predictor(
    ctx: ImportanceContext,
    per_group: int = 4,
    images: int = 128,
    seed: int = 0,
    progress: bool = True,
    ratios: Sequence[float] = SUBSET_RATIOS,
) -> tuple[dict, dict]:
    """Fit the static predictor to the job the env gives it: choosing which channels a group keeps at a ratio.

    For every group and keep ratio in ``ratios``, ``per_group`` plausible keep sets (``candidate_subsets``) are
    measured (``measure_subset_losses``, that group alone masked). An MLP over each channel's features (the
    classic criteria, mean activation, depth, width) learns a correction to each channel's Taylor rank, so that
    the mean corrected score of a keep set ranks the sets of the same group and ratio by their loss
    (``_fit_ranker``); with nothing measured against it, the predictor ranks as Taylor does. Quality: on the
    (group, ratio) cells held out (30%), the share of subset pairs it orders right, next to the same share for the
    sum of Taylor's and of L1's ranks. Returns (state to cache, quality report)."""
    check_importance_samples(per_group)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    feats = channel_features(ctx)
    ctxf = _group_context(ctx.graph)
    subsets, cells = [], []
    for g in ctx.graph.groups:
        for r, ratio in enumerate(ratios):
            k = min(g.num_channels, max(1, round(ratio * g.num_channels)))
            for keep in candidate_subsets(feats[g.index], k, per_group, rng):
                subsets.append((g.index, keep))
                cells.append(g.index * len(ratios) + r)
    cells = np.array(cells)
    losses = measure_subset_losses(ctx, subsets, images, progress)
    offsets = np.cumsum([0] + [g.num_channels for g in ctx.graph.groups])
    rows = torch.from_numpy(np.concatenate([np.concatenate([feats[g.index], np.repeat(ctxf[g.index][None],
                                                                                         g.num_channels, 0)], 1)
                                            for g in ctx.graph.groups]).astype(np.float32))
    member = torch.zeros(len(subsets), int(offsets[-1]))  # row i: 1/k on subset i's channels
    for i, (gi, keep) in enumerate(subsets):
        member[i, torch.from_numpy(offsets[gi] + keep)] = 1.0 / len(keep)
    # quality on held-out (group, ratio) cells, then the predictor used is refit on every cell
    ids = rng.permutation(np.unique(cells))
    held = np.isin(cells, ids[: max(1, int(0.3 * len(ids)))])
    train_pairs = _pairs(cells, losses, np.flatnonzero(~held))
    test_pairs = _pairs(cells, losses, np.flatnonzero(held))
    base = rows[:, FEATURES.index(BASE_CRITERION)].clone()
    mlp = _fit_ranker(rows, base, member, train_pairs, seed)
    with torch.no_grad():
        pred = (member @ (base + mlp(rows))).numpy()
    classic = {name: member.numpy() @ np.concatenate([f[:, FEATURES.index(name)] for f in feats])
               for name in ("taylor", "l1")}
    report = {"static_pair_accuracy_heldout": _pair_accuracy(pred, test_pairs),
              "taylor_pair_accuracy_heldout": _pair_accuracy(classic["taylor"], test_pairs),
              "l1_pair_accuracy_heldout": _pair_accuracy(classic["l1"], test_pairs),
              "subsets_measured": len(subsets), "heldout_pairs": len(test_pairs[0])}
    mlp = _fit_ranker(rows, base, member, _pairs(cells, losses, np.arange(len(subsets))), seed)
    with torch.no_grad():
        flat = F.softplus(base + mlp(rows)).numpy()  # positive, as the observation's score summaries expect
    scores = [flat[offsets[g.index]:offsets[g.index + 1]] for g in ctx.graph.groups]
    report["static_train_seconds"] = time.perf_counter() - t0
    state = {"mlp": mlp.state_dict(), "scores": [torch.from_numpy(s.astype(np.float32)) for s in scores]}
    return state, report


# ------------------------------------------------------------------------------------------- cache
def _structure_key(graph: GroupGraph) -> str:
    h = hashlib.sha1()
    for g in graph.groups:
        h.update(f"{g.name}:{g.num_channels}:{','.join(g.producers)}|".encode())
    return h.hexdigest()[:10]


def _cached(path: Path | None, build, what: str) -> dict:
    """The tensors blob saved at ``path``, else ``build()``'s, saved there (``None``: not cached)."""
    if path is not None and path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            print(f"rebuilding the unreadable {what} cache {path}: {exc}", file=sys.stderr)
    blob = build()
    if path is not None:
        atomic_save(blob, path)
    return blob


def _as_blob(state: dict, report: dict) -> dict:
    """What a cache file holds: the tensors of ``state`` and the quality report, as tensors (``weights_only``)."""
    return {**state, "report": {k: torch.tensor(float(v)) for k, v in report.items()}}


def _named_gates(fitted: tuple[dict, dict]) -> tuple[dict, dict]:
    gates, report = fitted
    return {"gates": gates}, report


class ImportancePredictors:
    """The static predictor's scores and the runtime gates of one checkpoint, each trained once and cached."""

    def __init__(self, static_scores: list[np.ndarray] | None, gates: dict, report: dict):
        self.static_scores = static_scores  # None when the static predictor was not asked for
        self.gates = gates  # "gate{i}.weight" (C_out, C_in), "gate{i}.bias" (C_out,); empty when not asked for
        self.report = report

    def has_gate(self, i: int) -> bool:
        return f"gate{i}.weight" in self.gates

    @classmethod
    def load_or_train(
        cls, ctx: ImportanceContext, cache_path: Path | None, progress: bool = True, per_group: int = 4,
        images: int = 128, seed: int = 0, static: bool = True, runtime: bool = True,
        runtime_gates: str = DEFAULT_RUNTIME_GATES, gate_steps: int = DEFAULT_GATE_STEPS,
    ) -> "ImportancePredictors":
        """The static predictor (when ``static``) and the runtime gates (when ``runtime``) of the checkpoint
        ``cache_path``: each loaded from its own cache file next to it, else trained and cached there (None: not
        cached). ``seed`` picks the keep sets the static predictor measures and its MLP's initialisation.
        ``runtime_gates="trained"`` trains the ridge gates end to end for ``gate_steps`` steps (``envs.gates``)."""
        check_gate_training(runtime_gates, gate_steps)
        key = _structure_key(ctx.graph)
        stem = None if cache_path is None else str(cache_path)
        scores, gates, report = None, {}, {}
        if static:
            path = None if stem is None else Path(
                f"{stem}.static-predictor-{BASE_CRITERION}-{key}-{per_group}-{images}-s{seed}.pt")
            blob = _cached(path, lambda: _as_blob(*train_static_predictor(
                ctx, per_group=per_group, images=images, seed=seed, progress=progress)), "static predictor")
            scores = [t.numpy() for t in blob["scores"]]
            report.update({k: float(v) for k, v in blob["report"].items()})
        if runtime:
            path = None if stem is None else Path(f"{stem}.runtime-gates-{key}.pt")
            fit_split = ctx.train if ctx.train is not None else ctx.calib
            blob = _cached(path, lambda: _as_blob(*_named_gates(fit_runtime_predictor(
                ctx.model, ctx.graph, fit_split, ctx.calib, progress=progress))), "runtime gates")
            gates = blob["gates"]
            report.update({k: float(v) for k, v in blob["report"].items()})
            if runtime_gates == "trained":
                path = None if stem is None else Path(f"{stem}.runtime-gates-trained-{key}-{gate_steps}.pt")
                blob = _cached(path, lambda: _as_blob(*_named_gates(train_gates_end_to_end(
                    ctx.model, ctx.graph, gates, fit_split, steps=gate_steps, device=ctx.device,
                    progress=progress))), "trained runtime gates")
                gates = blob["gates"]
                report.update({k: float(v) for k, v in blob["report"].items()})
        return cls(scores, gates, report)


class LearnedScorer:
    """The static importance predictor as a scorer."""

    name = "learned"

    def __init__(self, predictors: ImportancePredictors):
        self.predictors = predictors

    def scores(self, ctx: ImportanceContext) -> list[np.ndarray]:
        if self.predictors.static_scores is None:
            raise ValueError("scorer='learned' needs predictors loaded with static=True")
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
