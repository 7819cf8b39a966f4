"""Coupled channel groups (Torch-Pruning's DependencyGraph), exact cost formulas, physical pruning and masks.

A *group* is a set of channels that must be removed together: the output channels of one or more convolutions,
the BatchNorms after them, and the input channels of every layer that reads them. ResNet-18 (CIFAR stem, the
classifier ignored as a root) has 12 groups: 8 block-internal convs and 4 residual streams.

The dependency graph is built once on the base model. Pruning a copy asks the base graph for the group's
dependencies (with Torch-Pruning's index mapping) and applies each dependency's Torch-Pruning handler to the
same-named module of the copy, so the base model is never mutated and the graph is never rebuilt.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from .cost import count_macs_per_module

_OUT = {tp.prune_conv_out_channels, tp.prune_batchnorm_out_channels, tp.prune_linear_out_channels,
        tp.prune_depthwise_conv_out_channels}
_IN = {tp.prune_conv_in_channels, tp.prune_linear_in_channels, tp.prune_depthwise_conv_in_channels}


class UnsupportedModelError(ValueError):
    """The dependency graph cannot handle a layer of the model; the message names the layer."""


@dataclass
class ChannelGroup:
    """One decision unit of the environment."""

    index: int
    name: str  # the root convolution's module name
    kind: str  # "internal" (one producer conv) or "residual" (several producers joined by additions)
    num_channels: int
    producers: list[str]  # convs / linears whose output channels are this group
    consumers: list[str]  # convs / linears whose input channels are this group
    bns: list[str]  # BatchNorms of this group's channels
    depthwise: list[str] = field(default_factory=list)  # depthwise convs carried by this group


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


class GroupGraph:
    """Channel groups of ``model`` for ``example_input`` and everything that follows from them.

    Args:
        model: the base network (never modified).
        example_input: a batch-1 input tensor for tracing.
        ignored_layers: modules that are never roots of a group (default: the final classifier).
        internal_only: keep only groups with a single producer (AMC's choice: block-internal convs).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        ignored_layers: Sequence[nn.Module] | None = None,
        internal_only: bool = False,
    ):
        self.model = model
        self.example_input = example_input
        self.names = {m: n for n, m in model.named_modules()}
        if ignored_layers is None:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            ignored_layers = linears[-1:]
        self._check_supported(model)
        model.eval()
        try:
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        except Exception as exc:  # noqa: BLE001 - surface which layer failed
            raise UnsupportedModelError(f"Torch-Pruning could not trace the model: {type(exc).__name__}: {exc}") from exc
        raw = list(self.dg.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=[nn.Conv2d, nn.Linear]))
        order = {n: i for i, n in enumerate(self.names.values())}
        groups: list[ChannelGroup] = []
        self._roots: list[tuple[nn.Module, object]] = []
        for g in raw:
            producers, consumers, bns, dw = [], [], [], []
            root_dep = g[0].dep
            for dep, _ in g:
                mod = dep.target.module
                if not isinstance(mod, nn.Module) or mod not in self.names:
                    continue
                name = self.names[mod]
                if _is_depthwise(mod):
                    if name not in dw:
                        dw.append(name)
                elif dep.handler in _OUT and isinstance(mod, (nn.Conv2d, nn.Linear)):
                    producers.append(name)
                elif dep.handler in _OUT and isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    bns.append(name)
                elif dep.handler in _IN:
                    consumers.append(name)
            if not producers:
                continue
            producers.sort(key=order.get)
            kind = "internal" if len(producers) == 1 else "residual"
            root_mod = root_dep.target.module
            n_ch = root_mod.out_channels if isinstance(root_mod, nn.Conv2d) else root_mod.out_features
            groups.append(ChannelGroup(-1, self.names[root_mod], kind, int(n_ch), producers, sorted(set(consumers),
                                       key=order.get), sorted(set(bns), key=order.get), dw))
            self._roots.append((root_mod, root_dep.handler))
        # forward order: by the first producer's position in the module tree
        idx = sorted(range(len(groups)), key=lambda i: order[groups[i].producers[0]])
        groups = [groups[i] for i in idx]
        self._roots = [self._roots[i] for i in idx]
        if internal_only:
            keep = [i for i, g in enumerate(groups) if g.kind == "internal"]
            groups = [groups[i] for i in keep]
            self._roots = [self._roots[i] for i in keep]
        for i, g in enumerate(groups):
            g.index = i
        if not groups:
            raise UnsupportedModelError("the model has no prunable channel group (no Conv2d/Linear roots found)")
        self.groups = groups
        self._build_cost_tables()

    # ---------------------------------------------------------------- model checks
    @staticmethod
    def _check_supported(model: nn.Module) -> None:
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m):
                raise UnsupportedModelError(
                    f"layer {name!r} ({m}) is a grouped convolution (groups={m.groups}) that is not depthwise; "
                    "grouped convolutions are not supported (depthwise ones are)"
                )
            if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention)):
                raise UnsupportedModelError(f"layer {name!r} ({type(m).__name__}) is not supported by channel pruning")

    # ---------------------------------------------------------------- cost tables
    def _build_cost_tables(self) -> None:
        """Exact per-module MAC and parameter formulas as functions of the kept channel counts."""
        self.base_macs_per_module = count_macs_per_module(self.model, self.example_input)
        out_group: dict[str, int] = {}
        in_group: dict[str, int] = {}
        for g in self.groups:
            for n in g.producers + g.bns + g.depthwise:
                out_group[n] = g.index
            for n in g.consumers:
                in_group[n] = g.index
        self._out_group, self._in_group = out_group, in_group
        mods = dict(self.model.named_modules())
        self._mac_terms = []  # (spatial, out_group|None, c_out, in_group|None, c_in_per_group, depthwise)
        self._const_macs = 0
        for name, macs in self.base_macs_per_module.items():
            m = mods.get(name)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                c_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                c_in = (m.in_channels // m.groups) if isinstance(m, nn.Conv2d) else m.in_features
                spatial = macs // (c_out * c_in) if c_out * c_in else 0
                dw = _is_depthwise(m)
                self._mac_terms.append((spatial, out_group.get(name), c_out, None if dw else in_group.get(name), c_in, dw))
            else:
                self._const_macs += macs
        self._param_terms = []  # (numel_per_out_in, out_group, c_out, in_group, c_in)
        self._const_params = 0
        for name, m in self.model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                og, ig = out_group.get(name), in_group.get(name)
                if isinstance(m, (nn.Conv2d, nn.Linear)) and pname == "weight" and p.ndim >= 2:
                    if _is_depthwise(m):
                        self._param_terms.append((p[0].numel(), og, p.shape[0], None, 1))
                    else:
                        self._param_terms.append((p[0, 0].numel(), og, p.shape[0], ig, p.shape[1]))
                elif p.ndim >= 1 and og is not None and p.shape[0] == self.groups[og].num_channels:
                    self._param_terms.append((p[0].numel() if p.ndim > 1 else 1, og, p.shape[0], None, 1))
                else:
                    self._const_params += p.numel()
        self.base_macs = self.macs([g.num_channels for g in self.groups])
        self.base_params = self.params([g.num_channels for g in self.groups])

    def output_group(self, module_name: str) -> int | None:
        """Index of the group whose channels ``module_name`` produces (conv / linear / BN / depthwise), or None."""
        return self._out_group.get(module_name)

    def input_group(self, module_name: str) -> int | None:
        """Index of the group whose channels ``module_name`` consumes as input channels, or None."""
        return self._in_group.get(module_name)

    def macs(self, kept: Sequence[int], runtime_kept: Sequence[float] | None = None) -> int:
        """Exact MACs per example when group ``i`` keeps ``kept[i]`` channels.

        ``runtime_kept`` (optional) gives the channels each input actually computes (<= kept); used for runtime
        mode's effective MACs (producers compute only those outputs, consumers read only those inputs).
        """
        counts = list(runtime_kept) if runtime_kept is not None else list(kept)
        total = self._const_macs
        for spatial, og, c_out, ig, c_in, dw in self._mac_terms:
            o = counts[og] if og is not None else c_out
            i = counts[ig] if ig is not None else c_in
            total += spatial * o * (1 if dw else i)
        return int(round(total))

    def params(self, kept: Sequence[int]) -> int:
        """Exact parameter count when group ``i`` keeps ``kept[i]`` channels."""
        total = self._const_params
        for unit, og, c_out, ig, c_in in self._param_terms:
            o = kept[og] if og is not None else c_out
            i = kept[ig] if ig is not None else c_in
            total += unit * o * i
        return int(total)

    # ---------------------------------------------------------------- pruning
    def prune_copy(self, keep: Sequence[np.ndarray | Sequence[int]], model: nn.Module | None = None) -> nn.Module:
        """A physically pruned deep copy of ``model`` (default: the base model) keeping ``keep[i]`` in group i."""
        src = self.model if model is None else model
        pruned = copy.deepcopy(src)
        mods = dict(pruned.named_modules())
        for g, (root, handler), kept in zip(self.groups, self._roots, keep):
            kept_set = set(int(k) for k in kept)
            if len(kept_set) == 0:
                raise ValueError(f"group {g.index} ({g.name}) must keep at least one channel")
            drop = [i for i in range(g.num_channels) if i not in kept_set]
            if not drop:
                continue
            group = self.dg.get_pruning_group(root, handler, idxs=drop)
            for dep, idxs in group:
                mod = dep.target.module
                if not isinstance(mod, nn.Module) or mod not in self.names:
                    continue  # functional nodes (adds, reshapes) carry no weights
                target = mods[self.names[mod]]
                dep.handler(target, idxs)  # Torch-Pruning's handler, applied to the copy's module
        return pruned

    def masks(self, keep: Sequence[np.ndarray | Sequence[int]]) -> list[torch.Tensor]:
        """0/1 float masks per group (for mask-based evaluation, what AMC-style tools do)."""
        out = []
        for g, kept in zip(self.groups, keep):
            m = torch.zeros(g.num_channels)
            m[torch.as_tensor(np.asarray(kept, dtype=np.int64))] = 1.0
            out.append(m)
        return out

    def mask_hooks(self, model: nn.Module, masks: Sequence[torch.Tensor] | dict[int, torch.Tensor]) -> list:
        """Register hooks zeroing masked channels on every BN (or producer, if no BN) output of each group.

        ``masks``: one 0/1 tensor per group, or ``{group index: mask}`` for some groups. Returns the handles.
        """
        mods = dict(model.named_modules())
        hooks = []
        items = masks.items() if isinstance(masks, dict) else enumerate(masks)
        for gi, m in items:
            g = self.groups[gi]
            targets = g.bns if g.bns else g.producers
            for name in targets:
                def hook(_mod, _inp, out, m=m):
                    return out * m.view(1, -1, *([1] * (out.ndim - 2)))
                hooks.append(mods[name].register_forward_hook(hook))
        return hooks


def keep_count(ratio: float, channels: int, round_to: int = 1, min_channels: int = 1) -> int:
    """Number of channels kept for a keep ratio: rounded to a multiple of ``round_to``, at least ``min_channels``."""
    k = int(math.floor(ratio * channels / round_to + 0.5)) * round_to
    return int(min(channels, max(min_channels, round_to, k)))
