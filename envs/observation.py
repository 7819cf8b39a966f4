"""The env's observation: 23 features per group, computed once per problem (the rest is filled in per step).

Per-step entries (``reduced``, ``prev_action``, ``budget_left``) are left at 0 here; ``ChannelPruneEnv._get_obs``
sets them. The table of meanings is in ``ChannelPruneEnv``'s docstring.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .gates import collect_gate_data
from .importance import ImportancePredictors

OBS_FEATURES = (
    "index", "is_residual", "c_in", "c_out", "stride", "kernel", "in_size", "group_macs", "reduced", "rest",
    "prev_action", "budget_left", "static_q10", "static_q25", "static_q50", "static_q75", "static_q90",
    "static_top25_mass", "runtime_top25_mass", "runtime_top50_mass", "runtime_spread", "gated", "budget",
)
REDUCED, PREV_ACTION, BUDGET_LEFT, BUDGET = (OBS_FEATURES.index(n) for n in ("reduced", "prev_action",
                                                                               "budget_left", "budget"))
PER_STEP = (REDUCED, PREV_ACTION, BUDGET_LEFT)  # filled in per step; every other entry is fixed per problem


def group_features(problem) -> np.ndarray:
    """(n_groups, len(OBS_FEATURES)) in [0, 1]: structure, cost shares and importance summaries of each group."""
    model, graph, groups = problem.base_model, problem.graph, problem.groups
    mods = dict(model.named_modules())
    widest = max(max(getattr(m, "out_channels", 0), getattr(m, "in_channels", 0)) for m in mods.values()
                 if isinstance(m, nn.Conv2d))
    total = float(graph.base_macs)
    sizes = _input_sizes(model, [g.producers[0] for g in groups], problem.example_input)
    macs_pm = graph.base_macs_per_module
    producer_macs = [sum(macs_pm.get(n, 0) for n in g.producers + g.depthwise) for g in groups]
    n = len(groups)
    feats = np.zeros((n, len(OBS_FEATURES)), dtype=np.float64)
    for i, g in enumerate(groups):
        root = mods[g.producers[0]]
        c_in = root.in_channels if isinstance(root, nn.Conv2d) else root.in_features
        s = problem.static_scores[i]
        top = np.sort(s)[::-1].clip(min=0)
        feats[i, 0] = i / max(n - 1, 1)
        feats[i, 1] = float(g.kind == "residual")
        feats[i, 2] = c_in / widest
        feats[i, 3] = g.num_channels / widest
        feats[i, 4] = min(max(getattr(mods[p], "stride", (1,))[0] for p in g.producers) / 2.0, 1.0)
        feats[i, 5] = min(getattr(root, "kernel_size", (1,))[0] / 7.0, 1.0)
        feats[i, 6] = min(sizes.get(g.producers[0], 1.0), 1.0)
        feats[i, 7] = sum(macs_pm.get(m, 0) for m in set(g.producers + g.consumers + g.depthwise)) / total
        feats[i, 9] = sum(producer_macs[i + 1:]) / total
        feats[i, 12:17] = np.quantile(s / (np.abs(s).max() + 1e-12), [0.1, 0.25, 0.5, 0.75, 0.9])
        feats[i, 17] = top[: max(1, len(top) // 4)].sum() / (top.sum() + 1e-12)
    if problem.predictors is not None and problem.predictors.gates:
        feats[:, 18:21] = runtime_summaries(problem.predictors, model, graph, problem.data.calib.x[:128])
    feats[:, 21] = np.array(problem.gated, dtype=float)
    feats[:, BUDGET] = problem.cost.budget
    return np.clip(feats, 0.0, 1.0)


def _input_sizes(model: nn.Module, names: list[str], example_input: torch.Tensor) -> dict[str, float]:
    """Input feature-map side of each named module relative to the image side."""
    sizes: dict[str, float] = {}
    mods = dict(model.named_modules())
    side = example_input.shape[-1]
    hooks = [mods[n].register_forward_pre_hook(lambda m, inp, n=n: sizes.__setitem__(n, inp[0].shape[-1] / side))
             for n in names]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return sizes


@torch.no_grad()
def runtime_summaries(predictors: ImportancePredictors, model: nn.Module, graph, x: torch.Tensor) -> np.ndarray:
    """Per gated group: the mean per-input share of the group's activation mass (post-ReLU channel means) in the
    quarter and the half of the channels its gate picks, and input dependence (1 - mean rank correlation of two
    inputs' gate scores); zeros for groups without a gate. Only the gates' rankings are used: trained gates'
    scores have no scale of their own."""
    out = np.zeros((len(graph.groups), 3))
    for i, (xin, act) in collect_gate_data(model, graph, x).items():
        if not predictors.has_gate(i):
            continue
        sal = xin @ predictors.gates[f"gate{i}.weight"].T + predictors.gates[f"gate{i}.bias"]
        picked = act.gather(1, sal.argsort(1, descending=True))  # activations in the gate's order
        c = sal.shape[1]
        tot = act.sum(1).clamp_min(1e-12)
        out[i, 0] = (picked[:, : max(1, c // 4)].sum(1) / tot).mean().item()
        out[i, 1] = (picked[:, : max(1, c // 2)].sum(1) / tot).mean().item()
        ranks = sal.argsort(1).argsort(1).float()
        ranks = ranks - ranks.mean(1, keepdim=True)
        ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
        half = len(ranks) // 2
        out[i, 2] = 1.0 - (ranks[::2][:half] * ranks[1::2][:half]).sum(1).mean().item()
    return out
