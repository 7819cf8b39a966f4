"""The runtime importance predictor: one FBS-style gate per block-internal group, and how it is trained.

A gate reads the global average pool of its producer conv's input and scores the group's channels,
``saliency = W @ GAP(input) + b``; each input then computes only the top-k channels by that score
(``envs.runtime``). Two ways to train it, both with the network frozen:

* ``fit_runtime_predictor`` (``runtime_gates="ridge"``; also where the trained gates start): ridge regression,
  in closed form, of each input's per-channel mean post-ReLU activation. Fast, but a proxy: a channel with a
  large activation is not necessarily the one the loss needs.
* ``train_gates_end_to_end`` (``runtime_gates="trained"``, the default): from the ridge gates, trained for the
  task they do, as FBS (Gao et al., ICLR 2019) and Chen, Chen & Pan (NeurIPS 2020) train theirs: the whole
  gated network classifies a training batch with every gate's top-k in place and the cross-entropy is minimised
  over the gate weights only. The top-k is relaxed by a straight-through estimator: the forward pass uses the
  hard 0/1 mask, the backward pass the gradient of ``sigmoid((z - threshold) / temperature)`` of the per-input
  standardised scores ``z``, so a channel's score moves with how much keeping it lowers the loss of that input.
  Each batch draws every group's runtime ratio uniformly from ``ratio_range``, so one set of gates serves every
  ratio an agent may ask for. BatchNorms use batch statistics, as after the env's BN recalibration of a gated
  plan. Deviations from FBS: no L1 sparsity term on the saliencies (the top-k fixes the computed share), and the
  kept channels are not scaled by their saliency (the executors apply a 0/1 mask).

``finetune_with_gates`` is the third way, after pruning: FBS's joint training. The network is fine-tuned by the
common recipe (``envs.finetune``) while the same relaxed top-k masks are in place at the plan's runtime ratio,
and the gates are trained along with it (Adam), so network and gates adapt to each other.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from .data import DatasetSplits, Split
from .finetune import finetune
from .groups import GroupGraph
from .machine import backend
from .training import batch_indices, train_steps

RUNTIME_GATES = ("ridge", "trained")
DEFAULT_RUNTIME_GATES = "trained"  # beat the ridge gates at every budget measured (runtime_gating experiment)
DEFAULT_GATE_STEPS = 100
TEMPERATURE = 0.5  # of the relaxed top-k, in units of the per-input standard deviation of the scores


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


def activation_spearman(gates: dict, data: dict, n: int = 256) -> tuple[float, float]:
    """Mean per-input Spearman correlation of the gates' scores with the true post-ReLU saliency (``data`` from
    ``collect_gate_data``), and the same for one dataset-wide ranking (the mean saliency), for comparison."""
    rhos, rhos_static = [], []
    for i, (vin, vout) in data.items():
        pred = vin @ gates[f"gate{i}.weight"].T + gates[f"gate{i}.bias"]
        static = vout.mean(0, keepdim=True).expand_as(vout)  # a per-input-agnostic ranking
        m = min(n, len(vout))
        rhos.append(np.nanmean([spearmanr(pred[j].numpy(), vout[j].numpy()).statistic for j in range(m)]))
        rhos_static.append(np.nanmean([spearmanr(static[j].numpy() + 1e-9 * np.arange(static.shape[1]),
                                                 vout[j].numpy()).statistic for j in range(m)]))
    nan = float("nan")
    return (float(np.mean(rhos)) if rhos else nan), (float(np.mean(rhos_static)) if rhos_static else nan)


def fit_runtime_predictor(model: nn.Module, graph: GroupGraph, fit: Split, val: Split, fit_images: int = 2048,
                          ridge: float = 1e-2, progress: bool = True) -> tuple[dict, dict]:
    """Fit one linear gate per gated group by ridge regression on ``fit`` (its first ``fit_images``); report the
    per-input Spearman with the activations on ``val``."""
    x_fit = fit.x[:fit_images]
    if progress:
        print(f"fitting runtime importance gates on {len(x_fit)} images ...", file=sys.stderr)
    state: dict = {}
    for i, (xin, yout) in collect_gate_data(model, graph, x_fit).items():
        xa = torch.cat([xin, torch.ones(len(xin), 1)], 1).double()
        reg = ridge * torch.eye(xa.shape[1], dtype=torch.float64) * xa.pow(2).mean()
        reg[-1, -1] = 0
        w = torch.linalg.solve(xa.T @ xa + reg * len(xa), xa.T @ yout.double())  # (C_in+1, C_out)
        state[f"gate{i}.weight"] = w[:-1].T.float().contiguous()
        state[f"gate{i}.bias"] = w[-1].float().contiguous()
    rho, rho_static = activation_spearman(state, collect_gate_data(model, graph, val.x))
    report = {"runtime_spearman_per_input": rho, "runtime_spearman_static_ranking": rho_static,
              "gated_groups": len(state) // 2}
    return state, report


# ------------------------------------------------------------------------------------------- end-to-end
def relaxed_topk(scores: torch.Tensor, k: int, temperature: float = TEMPERATURE) -> torch.Tensor:
    """(B, C) 0/1 mask of each row's ``k`` highest scores in the forward pass, with the gradient of a sigmoid
    around the threshold between the k-th and (k+1)-th score of the standardised row in the backward pass."""
    c = scores.shape[1]
    if k >= c:
        return torch.ones_like(scores)
    z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
    top = z.topk(k + 1, dim=1)
    threshold = top.values[:, k - 1 : k + 1].mean(1, keepdim=True).detach()
    soft = torch.sigmoid((z - threshold) / temperature)
    hard = torch.zeros_like(z).scatter_(1, top.indices[:, :k], 1.0)
    return hard + (soft - soft.detach())  # exactly the hard mask forward (x - x == 0)


class GatedForTraining(nn.Module):
    """A copy of ``model`` (frozen unless ``train_network``) with trainable gates (initialised from ``gates``) and
    relaxed top-k masks after each gated BN; every forward pass draws each group's runtime ratio from
    ``ratio_range`` (k = the ratio times the group's channels, rounded; a plan's own counts may differ from that
    by one channel). ``release()`` hands back the copy without the masks."""

    def __init__(self, model: nn.Module, graph: GroupGraph, gates: dict, ratio_range: tuple[float, float],
                 generator: torch.Generator, train_network: bool = False):
        super().__init__()
        self.net = copy.deepcopy(model)
        if not train_network:
            self.net.requires_grad_(False)
        self.ratio_range, self.generator = ratio_range, generator
        self.linears = nn.ModuleDict()
        mods = dict(self.net.named_modules())
        self._scores: dict[str, torch.Tensor] = {}
        self._handles: list = []
        for v in gate_layout(graph):
            if v is None or f"gate{v[0]}.weight" not in gates:
                continue
            i, prod, bn, _ = v
            w = gates[f"gate{i}.weight"]
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(gates[f"gate{i}.bias"])
            self.linears[str(i)] = lin
            self._handles += [mods[prod].register_forward_pre_hook(self._score_hook(str(i))),
                              mods[bn].register_forward_hook(self._mask_hook(str(i)))]

    def _score_hook(self, key: str):
        def hook(_m, inp):
            self._scores[key] = self.linears[key](inp[0].mean((2, 3)).float())
        return hook

    def _mask_hook(self, key: str):
        def hook(_m, _inp, out):
            scores = self._scores.pop(key)
            lo, hi = self.ratio_range
            ratio = lo + (hi - lo) * float(torch.rand((), generator=self.generator))
            k = max(1, int(round(ratio * scores.shape[1])))
            return out * relaxed_topk(scores, k).to(out.dtype)[:, :, None, None]
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def release(self) -> nn.Module:
        """The network copy with the training masks removed (this wrapper is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.net

    def gates(self) -> dict:
        """The trained gates, in the format of ``fit_runtime_predictor``'s."""
        out = {}
        for key, lin in self.linears.items():
            out[f"gate{key}.weight"] = lin.weight.detach().cpu().float().contiguous()
            out[f"gate{key}.bias"] = lin.bias.detach().cpu().float().contiguous()
        return out


def check_gate_training(runtime_gates: str, gate_steps: int) -> None:
    if runtime_gates not in RUNTIME_GATES:
        raise ValueError(f"runtime_gates={runtime_gates!r} is not allowed; allowed: {', '.join(RUNTIME_GATES)}")
    if not (isinstance(gate_steps, int) and gate_steps >= 1):
        raise ValueError(f"gate_steps={gate_steps!r} must be an integer >= 1")


def train_gates_end_to_end(
    model: nn.Module, graph: GroupGraph, gates: dict, train: Split, steps: int = DEFAULT_GATE_STEPS,
    batch_size: int = 64, lr: float = 1e-3, ratio_range: Sequence[float] = (0.15, 0.9), seed: int = 0,
    device: str | torch.device = "cpu", progress: bool = True,
) -> tuple[dict, dict]:
    """Train ``gates`` (ridge-fitted, say) through the frozen ``model`` for ``steps`` Adam steps on ``train``
    (module docstring); returns the trained gates and a report (final training loss, seconds)."""
    check_gate_training("trained", steps)
    lo, hi = (float(r) for r in ratio_range)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"ratio_range={tuple(ratio_range)!r} must satisfy 0 < low <= high <= 1")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    gated = GatedForTraining(model, graph, gates, (lo, hi), gen)
    opt = torch.optim.Adam(gated.linears.parameters(), lr=lr)
    loss = train_steps(gated, train, steps, [opt], batch_indices(len(train), batch_size, gen),
                       generator=gen, pad=2, flip=True, bf16=True, device=backend(device),
                       progress=progress, desc="training runtime gates")
    report = {"gate_train_loss": loss, "gate_train_seconds": time.perf_counter() - t0, "gate_train_steps": steps}
    return gated.gates(), report


def finetune_with_gates(
    model: nn.Module, graph: GroupGraph, gates: dict, data: DatasetSplits, steps: int, runtime_ratio: float,
    seed: int = 0, gate_lr: float = 1e-3, device: str | torch.device = "cpu", progress: bool = True,
) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``model`` (a plan's pruned network, ``gates`` sliced to it) jointly with its gates for
    ``steps`` steps (module docstring): the network by ``envs.finetune``'s recipe, the gates by Adam at
    ``gate_lr``, every gated group computing ``runtime_ratio`` of its channels per input. Returns the fine-tuned
    network (eval mode, no gates installed) and the trained gates."""
    if not 0 < runtime_ratio <= 1:
        raise ValueError(f"runtime_ratio={runtime_ratio!r} must be in (0, 1]")
    if not gate_lr > 0:
        raise ValueError(f"gate_lr={gate_lr!r} must be > 0")
    gated = GatedForTraining(model, graph, gates, (runtime_ratio, runtime_ratio),
                             torch.Generator().manual_seed(seed), train_network=True)
    gate_opt = torch.optim.Adam(gated.linears.parameters(), lr=gate_lr)
    finetune(gated, data, steps, seed=seed, progress=progress, device=device, sgd_module=gated.net,
             extra_optimizers=[gate_opt])
    trained = gated.gates()
    return gated.release().eval(), trained
