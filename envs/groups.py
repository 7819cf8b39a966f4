"""Coupled channel groups (Torch-Pruning's DependencyGraph), exact cost formulas, physical pruning and masks.

A *group* is a set of channels that must be removed together: the output channels of one or more convolutions,
the BatchNorms after them, and the input channels of every layer that reads them. ResNet-18 (CIFAR stem, the
classifier ignored as a root) has 12 groups: 8 block-internal convs and 4 residual streams.

The dependency graph is built once on the base model. For every group it records, with Torch-Pruning's index
mapping, which channel indices of every coupled layer carry each of the group's channels: the identity for a
plain conv -> BN -> conv chain, an offset for a layer reading a ``torch.cat`` of several groups (DenseNet,
Inception), ``s`` consecutive inputs of a linear layer reading a flattened ``s``-pixel map. Pruning a copy maps
each group's dropped channels through that table and applies Torch-Pruning's handler once per layer with the
union of all groups' indices (all in the base model's coordinates), so the base model is never mutated and the
graph is never rebuilt. The same table gives every layer's width as an affine function of the groups' kept
counts, hence exact closed-form MACs and parameters.

Refused at construction, with an ``UnsupportedModelError`` naming the layer: grouped (non-depthwise)
convolutions, recurrent and attention layers, multiply-accumulates outside ``nn.Conv2d`` / ``nn.Linear`` layers
(functional matmuls), channel shuffles (a reshape that regroups channels), splits or slices that send part of a
group's channels to a layer (its width would depend on *which* channels are kept), and layers that run only in
training mode (auxiliary heads: the env recalibrates BN statistics in training mode).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from .cost import count_macs_per_module

_MAC_LAYERS = (nn.Conv2d, nn.Linear)  # the layers whose multiply-accumulates the cost model expresses
_BN = nn.modules.batchnorm._BatchNorm
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten}
_ALLOWED = ("allowed: plain and depthwise Conv2d, Linear, normalization and element-wise layers, additions, "
            "multiplications (squeeze-excitation), concatenation along the channel dimension, flatten and "
            "pooling")


class UnsupportedModelError(ValueError):
    """The dependency graph cannot handle a layer of the model; the message names the layer."""


@dataclass
class ChannelGroup:
    """One decision unit of the environment."""

    index: int
    name: str  # the root convolution's module name
    kind: str  # "internal" (one producer conv) or "residual" (several producers joined by additions)
    num_channels: int
    producers: list[str]  # convs / linears whose output channels are exactly this group
    consumers: list[str]  # convs / linears reading this group's channels (alone, or within a concatenation)
    bns: list[str]  # BatchNorms whose channels are exactly this group's
    depthwise: list[str] = field(default_factory=list)  # depthwise convs carried by this group
    shared: list[str] = field(default_factory=list)  # BatchNorms over a concatenation including this group


@dataclass(frozen=True)
class _Dep:
    """One layer (or unwrapped parameter) a group prunes, with Torch-Pruning's index mapping resolved."""

    target: str  # module name, or parameter name for an unwrapped nn.Parameter (ConvNeXt's layer scale)
    is_param: bool
    handler: Callable  # Torch-Pruning's pruning function for this target and axis
    pruning_dim: int | None  # Torch-Pruning's pruning dimension of the target node (used by parameters)
    axis: str  # "out" (output channels / features) or "in" (input channels / features)
    positions: np.ndarray  # (num_channels, m): the target's indices along ``axis`` carrying group channel c


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def channel_dim(m: nn.Module) -> int:
    """Channel dimension of a layer's output: last for linear layers and LayerNorm (channels-last: (N, C) or
    ConvNeXt's (N, H, W, C)), 1 for convolutions and BatchNorm ((N, C, H, W))."""
    return -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1


def _meta_clone(m: nn.Module) -> nn.Module:
    """A shallow copy of a leaf module with its parameters and buffers on the meta device (no memory), so that
    a Torch-Pruning handler can be applied to it to see which tensor dimensions it prunes."""
    c = copy.copy(m)
    c.__dict__["_parameters"] = {
        k: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), p.requires_grad)
        for k, p in m._parameters.items()}
    c.__dict__["_buffers"] = {k: None if b is None else torch.empty(b.shape, dtype=b.dtype, device="meta")
                              for k, b in m._buffers.items()}
    return c


class _ModuleTracker:
    """Forward hooks keeping the stack of running modules and the order in which parameterized ones ran."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.ran: list[str] = []
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: self._enter(n, _m)))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, name: str, m: nn.Module) -> None:
        self.stack.append(name)
        if next(m.parameters(recurse=False), None) is not None and name not in self.ran:
            self.ran.append(name)

    def _leave(self, _m, _i, _o) -> None:  # returns None: a forward hook's return value replaces the output
        self.stack.pop()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _ChannelRegroupWatch(TorchFunctionMode):
    """Records reshapes that split the channel dimension of an (N, C, H, W) map into several dimensions (a
    channel shuffle: (N, g, C/g, H, W)), with the module running them."""

    def __init__(self, tracker: _ModuleTracker):
        super().__init__()
        self.tracker, self.found = tracker, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _RESHAPES and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            x = args[0]
            if (x.ndim == 4 and out.ndim == 5 and out.shape[3:] == x.shape[2:]
                    and out.shape[1] * out.shape[2] == x.shape[1]):
                self.found.append((self.tracker.stack[-1] if self.tracker.stack else "", tuple(x.shape),
                                   tuple(out.shape)))
        return out


class GroupGraph:
    """Channel groups of ``model`` for ``example_input`` and everything that follows from them.

    Args:
        model: the base network (never modified).
        example_input: a batch-1 input tensor for tracing.
        ignored_layers: modules that are never roots of a group (default: the final classifier, the last
            Conv2d / Linear the forward pass runs).
        internal_only: keep only groups with a single producer (AMC's choice: block-internal convs).

    Raises:
        UnsupportedModelError: a layer the group machinery cannot handle; the message names it and says why.
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
        self._check_supported(model)
        model.eval()
        ran = self._check_forward(model, example_input)
        if ignored_layers is None:
            mods = dict(model.named_modules())
            classifier = [n for n in ran if isinstance(mods[n], _MAC_LAYERS)][-1:]
            ignored_layers = [mods[n] for n in classifier]
        try:
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
            raw = list(self.dg.get_all_groups(ignored_layers=list(ignored_layers),
                                              root_module_types=[nn.Conv2d, nn.Linear]))
        except Exception as exc:  # noqa: BLE001 - surface which layer failed
            raise UnsupportedModelError(f"Torch-Pruning could not trace the model: {type(exc).__name__}: {exc}"
                                        ) from exc
        param_names = {p: n for n, p in model.named_parameters()}
        order = {n: i for i, n in enumerate(self.names.values())}
        groups: list[ChannelGroup] = []
        deps: list[list[_Dep]] = []
        for g in raw:
            group, group_deps = self._read_group(g, param_names, order)
            if group is not None:
                groups.append(group)
                deps.append(group_deps)
        # forward order: by the first producer's position in the module tree
        idx = sorted(range(len(groups)), key=lambda i: order[groups[i].producers[0]])
        if internal_only:
            idx = [i for i in idx if groups[i].kind == "internal"]
        groups, deps = [groups[i] for i in idx], [deps[i] for i in idx]
        for i, g in enumerate(groups):
            g.index = i
        if not groups:
            raise UnsupportedModelError("the model has no prunable channel group (no Conv2d/Linear roots found)")
        self.groups = groups
        self._deps = deps
        self._build_cost_tables()

    def _read_group(self, g, param_names: dict, order: dict[str, int]) -> tuple[ChannelGroup | None, list[_Dep]]:
        """One Torch-Pruning group -> the ChannelGroup (None if it has no producer conv / linear) and its deps."""
        root_mod = g[0].dep.target.module
        root = self.names[root_mod]
        n_ch = int(root_mod.out_channels if isinstance(root_mod, nn.Conv2d) else root_mod.out_features)
        roles: dict[str, list[str]] = {"producers": [], "consumers": [], "bns": [], "depthwise": [], "shared": []}
        deps: list[_Dep] = []
        for item in g:
            dep, idxs = item
            target = dep.target.module
            if isinstance(target, nn.Parameter) and target in param_names:
                name, is_param = param_names[target], True
            elif isinstance(target, nn.Module) and target in self.names:
                name, is_param = self.names[target], False
            else:
                continue  # functional nodes (adds, concatenations, reshapes) carry no weights
            axis = "out" if self.dg.is_out_channel_pruning_fn(dep.handler) else "in"
            pos = _positions(root, name, axis, idxs, item.root_idxs, n_ch)
            deps.append(_Dep(name, is_param, dep.handler, dep.target.pruning_dim, axis, pos))
            if is_param:
                continue
            # exact: the layer's channels along the axis are this group's, in order (not a concatenation)
            exact = pos.shape[1] == 1 and np.array_equal(pos[:, 0], np.arange(n_ch))
            if _is_depthwise(target) or (axis == "out" and isinstance(target, _MAC_LAYERS)):
                if not (exact and _width(target, axis) == n_ch):
                    raise UnsupportedModelError(
                        f"layer {name!r} ({type(target).__name__}) produces the channels of the group rooted at "
                        f"{root!r} only in part or permuted ({_width(target, axis)} channels for a group of "
                        f"{n_ch}: a split, slice or shuffle of channels between them); a layer's output must be "
                        f"exactly one group; {_ALLOWED}")
                roles["depthwise" if _is_depthwise(target) else "producers"].append(name)
            elif axis == "out" and isinstance(target, _BN):
                roles["bns" if exact and _width(target, axis) == n_ch else "shared"].append(name)
            elif axis == "in" and isinstance(target, _MAC_LAYERS):
                roles["consumers"].append(name)
        if not roles["producers"]:
            return None, deps
        roles = {k: sorted(set(v), key=order.get) for k, v in roles.items()}
        kind = "internal" if len(roles["producers"]) == 1 else "residual"
        return ChannelGroup(-1, root, kind, n_ch, **roles), deps

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
                raise UnsupportedModelError(f"layer {name!r} ({type(m).__name__}) is not supported by channel "
                                            f"pruning; {_ALLOWED}")

    @torch.no_grad()
    def _check_forward(self, model: nn.Module, x: torch.Tensor) -> list[str]:
        """Checks that need a forward pass; returns the parameterized modules in the order the eval pass ran them.

        * no reshape regroups channels (a channel shuffle): coupled groups cannot follow channels through it;
        * every multiply-accumulate is in a Conv2d / Linear layer (the closed-form cost model counts only those);
        * no layer runs only in training mode: the env recalibrates BN statistics with a training-mode forward,
          and a layer the (eval-mode) trace never saw would keep its unpruned input width.
        """
        tracker = _ModuleTracker(model)
        watch = _ChannelRegroupWatch(tracker)
        try:
            with watch:
                model(x)
        finally:
            tracker.close()
        if watch.found:
            layer, before, after = watch.found[0]
            raise UnsupportedModelError(
                f"{_layer(model, layer)} reshapes its channels {before} -> {after} (a channel shuffle); coupled "
                f"channel groups cannot follow channels through a regrouping, so it is not supported; {_ALLOWED}")
        for name, macs in _own_macs(model, x).items():
            if macs and not isinstance(model.get_submodule(name), _MAC_LAYERS):
                raise UnsupportedModelError(
                    f"{_layer(model, name)} computes {macs} multiply-accumulates outside Conv2d/Linear layers (a "
                    f"functional matmul, linear or convolution, e.g. attention); the closed-form cost model "
                    f"covers nn.Conv2d and nn.Linear layers only")
        only_train = [n for n in self._training_forward(model, x) if n not in set(tracker.ran)]
        if only_train:
            raise UnsupportedModelError(
                f"{_layer(model, only_train[0])} runs only in training mode (an auxiliary head?); the eval-mode "
                f"trace never sees its inputs, so their channels cannot be pruned with the rest; build the model "
                f"without it (torchvision: aux_logits=False)")
        return tracker.ran

    @staticmethod
    def _training_forward(model: nn.Module, x: torch.Tensor) -> list[str]:
        """Parameterized modules a training-mode forward runs; the model's buffers and the RNG are left as
        found."""
        tracker = _ModuleTracker(model)
        buffers = [b.clone() for b in model.buffers()]
        try:
            with torch.random.fork_rng(devices=[]):  # dropout draws must not move the caller's random stream
                model.train()
                model(torch.cat([x, x]))  # two examples: BN needs more than one value per channel
        except Exception as exc:  # noqa: BLE001 - the env's BN recalibration would fail the same way
            layer = tracker.stack[-1] if tracker.stack else ""
            raise UnsupportedModelError(f"{_layer(model, layer)} fails in the model's training-mode forward (used "
                                        f"to recalibrate BatchNorm statistics): {type(exc).__name__}: {exc}"
                                        ) from exc
        finally:
            tracker.close()
            model.eval()
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        return tracker.ran

    # ---------------------------------------------------------------- cost tables
    def _build_cost_tables(self) -> None:
        """Exact per-module MAC and parameter formulas as functions of the kept channel counts.

        Every pruned tensor dimension is an *axis* whose size is affine in the kept counts: fixed channels (the
        image's, or channels in no group) plus ``m`` per kept channel of each group it carries (m = 1 for a plain
        or concatenated read, s for a linear layer reading an s-pixel flattened map). A parameter's size is a
        constant times its pruned axes; a Conv2d / Linear layer's MACs are its weight's size times the positions
        it is applied at.
        """
        self.base_macs_per_module = count_macs_per_module(self.model, self.example_input)
        mods = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        # handlers per target and axis, and which groups each axis carries
        handlers: dict[str, dict[str, _Dep]] = {}
        carried: dict[tuple[str, str], dict[int, int]] = {}
        for gi, group_deps in enumerate(self._deps):
            for d in group_deps:
                handlers.setdefault(d.target, {}).setdefault(d.axis, d)
                carried.setdefault((d.target, d.axis), {})[gi] = d.positions.shape[1]
        # which tensor dimensions each handler prunes: apply it to a meta-device clone and compare shapes
        dims: dict[str, list[tuple[str, int, int]]] = {}  # tensor name -> [(axis, dim, full size)]
        for by_axis in handlers.values():
            for axis, d in by_axis.items():
                for tname, before, after in _probe(d, mods, params):
                    for k, (b, a) in enumerate(zip(before, after)):
                        if a != b:
                            dims.setdefault(tname, []).append((axis, k, b))
        self._axis_rows: dict[tuple[str, str], int] = {}
        const, coef = [1], [np.zeros(len(self.groups), dtype=np.int64)]  # row 0: the constant 1

        def row(target: str, axis: str, full: int) -> int:
            key = (target, axis)
            if key not in self._axis_rows:
                per = np.zeros(len(self.groups), dtype=np.int64)
                for gi, m in carried.get(key, {}).items():
                    per[gi] = m
                fixed = full - int(sum(per[gi] * self.groups[gi].num_channels for gi in range(len(self.groups))))
                if fixed < 0:
                    raise UnsupportedModelError(f"layer {target!r}: the groups carried by its {axis} axis overlap "
                                                f"({full} channels); {_ALLOWED}")
                self._axis_rows[key] = len(const)
                const.append(fixed)
                coef.append(per)
            return self._axis_rows[key]

        def term(tname: str, owner: str, numel: int) -> tuple[int, int, int]:
            axes = dims.get(tname, [])
            if len(axes) > 2:
                raise UnsupportedModelError(f"parameter {tname!r} is pruned along {len(axes)} dimensions; at most "
                                            "two (output and input channels) are supported")
            rows = [row(owner, axis, full) for axis, _, full in axes]
            denom = math.prod(full for _, _, full in axes)
            return numel // denom, *(rows + [0, 0])[:2]

        param_terms = []
        for mname, m in self.model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                tname = _tensor_name(mname, pname)
                owner = tname if tname in handlers else mname
                param_terms.append(term(tname, owner, p.numel()))
        mac_terms = []
        for name, macs in self.base_macs_per_module.items():
            w = getattr(mods.get(name), "weight", None)
            if not isinstance(mods.get(name), _MAC_LAYERS) or macs % w.numel():
                raise UnsupportedModelError(f"layer {name!r} computes {macs} MACs that the closed-form cost model "
                                            "cannot express (it covers nn.Conv2d and nn.Linear layers)")
            unit, r0, r1 = term(_tensor_name(name, "weight"), name, w.numel())
            mac_terms.append((unit * (macs // w.numel()), r0, r1))
        self._axis_const = np.asarray(const, dtype=np.int64)
        self._axis_coef = np.stack(coef)  # (axes, groups)
        self._mac_terms = np.asarray(mac_terms, dtype=np.int64).reshape(-1, 3)
        self._param_terms = np.asarray(param_terms, dtype=np.int64).reshape(-1, 3)
        self._out_group = {t: self._sole_group(t, "out") for t, _ in self._axis_rows}
        self._in_group = {t: self._sole_group(t, "in") for t, _ in self._axis_rows}
        full = [g.num_channels for g in self.groups]
        self.base_macs = self.macs(full)
        self.base_params = self.params(full)
        if self.base_macs != sum(self.base_macs_per_module.values()) or self.base_params != sum(params[n].numel()
                                                                                                 for n in params):
            raise UnsupportedModelError(
                f"the closed-form cost model does not reproduce the model's MACs / parameters ({self.base_macs} "
                f"vs {sum(self.base_macs_per_module.values())}, {self.base_params} vs "
                f"{sum(p.numel() for p in params.values())}); {_ALLOWED}")

    def _sole_group(self, target: str, axis: str) -> int | None:
        r = self._axis_rows.get((target, axis))
        if r is None or self._axis_const[r] != 0:
            return None
        nz = np.flatnonzero(self._axis_coef[r])
        return int(nz[0]) if len(nz) == 1 else None

    def output_group(self, module_name: str) -> int | None:
        """Index of the group that makes up all of ``module_name``'s output channels (conv / linear / BN /
        depthwise), or None (no group, or a concatenation of several)."""
        return self._out_group.get(module_name)

    def input_group(self, module_name: str) -> int | None:
        """Index of the group that makes up all of ``module_name``'s input channels, or None (the image, or a
        concatenation of several groups). A linear layer after a flatten reads each channel several times."""
        return self._in_group.get(module_name)

    def input_groups(self, module_name: str) -> list[int]:
        """Indices of every group whose channels ``module_name`` reads (several for a concatenation)."""
        r = self._axis_rows.get((module_name, "in"))
        return [] if r is None else [int(i) for i in np.flatnonzero(self._axis_coef[r])]

    def is_exact_reader(self, module_name: str, group: int) -> bool:
        """True if ``module_name``'s input channels are exactly group ``group``'s channels, in order."""
        r = self._axis_rows.get((module_name, "in"))
        return (r is not None and self._axis_const[r] == 0 and int(self._axis_coef[r].sum()) == 1
                and self._axis_coef[r][group] == 1)

    def width(self, module_name: str, kept: Sequence[float], axis: str = "in") -> float:
        """Channels of ``module_name`` along ``axis`` ("in" or "out") when group i keeps ``kept[i]`` channels."""
        r = self._axis_rows.get((module_name, axis))
        if r is None:
            m = self.model.get_submodule(module_name)
            return float(_width(m, axis))
        return float(self._axis_const[r] + self._axis_coef[r] @ np.asarray(kept, dtype=np.float64))

    def kept_positions(
        self, module_name: str, keep: Sequence[np.ndarray | Sequence[int]], axis: str = "in"
    ) -> np.ndarray:
        """Sorted indices, in the base model's coordinates, of ``module_name``'s channels along ``axis`` that
        survive pruning with keep sets ``keep`` (e.g. the base weight columns the pruned layer keeps)."""
        full = _width(self.model.get_submodule(module_name), axis)
        alive = np.ones(full, dtype=bool)
        for gi, group_deps in enumerate(self._deps):
            for d in group_deps:
                if d.target == module_name and d.axis == axis:
                    drop = np.ones(self.groups[gi].num_channels, dtype=bool)
                    drop[np.asarray(keep[gi], dtype=np.int64)] = False
                    alive[d.positions[drop].ravel()] = False
        return np.flatnonzero(alive)

    def _evaluate(self, terms: np.ndarray, counts: Sequence[float]) -> float:
        k = np.asarray(counts, dtype=np.float64)
        if k.shape != (len(self.groups),):
            raise ValueError(f"expected one count per group ({len(self.groups)}), got shape {k.shape}")
        axes = self._axis_const + self._axis_coef @ k
        return float(np.sum(terms[:, 0] * axes[terms[:, 1]] * axes[terms[:, 2]]))

    def macs(self, kept: Sequence[int], runtime_kept: Sequence[float] | None = None) -> int:
        """Exact MACs per example when group ``i`` keeps ``kept[i]`` channels.

        ``runtime_kept`` (optional) gives the channels each input actually computes (<= kept); used for runtime
        mode's effective MACs (producers compute only those outputs, consumers read only those inputs).
        """
        return int(round(self._evaluate(self._mac_terms, runtime_kept if runtime_kept is not None else kept)))

    def params(self, kept: Sequence[int]) -> int:
        """Exact parameter count when group ``i`` keeps ``kept[i]`` channels."""
        return int(round(self._evaluate(self._param_terms, kept)))

    # ---------------------------------------------------------------- pruning
    def _drop_ops(self, keep: Sequence[np.ndarray | Sequence[int]]) -> dict[tuple, np.ndarray]:
        """Per (target, handler): the union over groups of the indices to remove, in base coordinates."""
        if len(keep) != len(self.groups):
            raise ValueError(f"keep has {len(keep)} entries; expected one per group ({len(self.groups)})")
        ops: dict[tuple, list[np.ndarray]] = {}
        for g, group_deps, kept in zip(self.groups, self._deps, keep):
            kept = np.unique(np.asarray(kept, dtype=np.int64))
            if len(kept) == 0:
                raise ValueError(f"group {g.index} ({g.name}) must keep at least one channel")
            if kept[0] < 0 or kept[-1] >= g.num_channels:
                raise ValueError(f"group {g.index} ({g.name}) keeps channel indices {kept.tolist()}; allowed: "
                                 f"0..{g.num_channels - 1}")
            drop = np.ones(g.num_channels, dtype=bool)
            drop[kept] = False
            if not drop.any():
                continue
            for d in group_deps:
                key = (d.target, d.is_param, d.handler, d.pruning_dim)
                ops.setdefault(key, []).append(d.positions[drop].ravel())
        return {key: np.unique(np.concatenate(parts)) for key, parts in ops.items()}

    def prune_copy(self, keep: Sequence[np.ndarray | Sequence[int]], model: nn.Module | None = None) -> nn.Module:
        """A physically pruned deep copy of ``model`` (default: the base model) keeping ``keep[i]`` in group i."""
        src = self.model if model is None else model
        pruned = copy.deepcopy(src)
        for (target, is_param, handler, pruning_dim), idxs in self._drop_ops(keep).items():
            # what Torch-Pruning's Dependency.__call__ does, on the copy's module / parameter
            _set_pruning_dim(handler, pruning_dim)
            if is_param:
                parent, _, attr = target.rpartition(".")
                owner = pruned.get_submodule(parent) if parent else pruned
                setattr(owner, attr, handler(getattr(owner, attr), idxs.tolist()))
            else:
                handler(pruned.get_submodule(target), idxs.tolist())
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
        """Register hooks zeroing masked channels on every BN output carrying each group's channels (its own BNs
        and those over concatenations including it), or on its producers' outputs if it has no BN.

        ``masks``: one 0/1 tensor per group, or ``{group index: mask}`` for some groups. Returns the handles.
        """
        mods = dict(model.named_modules())
        hooks = []
        items = masks.items() if isinstance(masks, dict) else enumerate(masks)
        for gi, m in items:
            g = self.groups[gi]
            targets = set(g.bns + g.shared) or set(g.producers)
            for d in self._deps[gi]:
                if d.target not in targets or d.axis != "out":
                    continue
                mod = mods[d.target]
                # the multiplier over all of the layer's channels: the group's positions get its mask
                full = torch.ones(_width(mod, "out"), device=m.device, dtype=m.dtype)
                pos = torch.as_tensor(d.positions, device=m.device)
                full[pos.flatten()] = m.repeat_interleave(d.positions.shape[1])
                dim = channel_dim(mod)

                def hook(_mod, _inp, out, full=full, dim=dim):
                    shape = [1] * out.ndim
                    shape[dim] = -1
                    return out * full.to(out.device, out.dtype).view(shape)
                hooks.append(mod.register_forward_hook(hook))
        return hooks


def _positions(root: str, target: str, axis: str, idxs, root_idxs, n_ch: int) -> np.ndarray:
    """(n_ch, m) array of the target's indices carrying each group channel, from Torch-Pruning's index mapping.

    Every channel must reach the target the same number of times: otherwise the target's width would depend on
    *which* channels are kept, not on how many (a split / slice on the channel dimension)."""
    if any(r is None for r in root_idxs):
        raise UnsupportedModelError(f"layer {target!r}: Torch-Pruning's index mapping from the group rooted at "
                                    f"{root!r} loses track of channels; {_ALLOWED}")
    pos, roots = np.asarray(idxs, dtype=np.int64), np.asarray(root_idxs, dtype=np.int64)
    counts = np.bincount(roots, minlength=n_ch)
    if len(counts) != n_ch or counts.min() != counts.max() or counts.min() == 0:
        raise UnsupportedModelError(
            f"layer {target!r} reads the channels of the group rooted at {root!r} only in part ({counts.min()} to "
            f"{counts.max()} of its {axis} channels per group channel): a split or slice on the channel dimension "
            f"(torch.split / chunk / narrow / indexing) makes its width depend on which channels are kept, not "
            f"how many; not supported; {_ALLOWED}")
    return pos[np.lexsort((pos, roots))].reshape(n_ch, int(counts[0]))


def _width(m: nn.Module, axis: str) -> int:
    """A layer's channels along ``axis`` ("out" / "in"), read from the layer's own attributes."""
    if isinstance(m, nn.Conv2d):
        return int(m.out_channels if axis == "out" else m.in_channels)
    if isinstance(m, nn.Linear):
        return int(m.out_features if axis == "out" else m.in_features)
    if isinstance(m, _BN):
        return int(m.num_features)
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.GroupNorm):
        return int(m.num_channels)
    raise UnsupportedModelError(f"cannot read the {axis} channels of a {type(m).__name__} layer; {_ALLOWED}")


def _probe(d: _Dep, mods: dict[str, nn.Module], params: dict[str, nn.Parameter]):
    """Apply ``d``'s handler to a meta clone, removing one channel; yield (tensor name, shape before, after)."""
    _set_pruning_dim(d.handler, d.pruning_dim)
    if d.is_param:
        p = params[d.target]
        after = d.handler(nn.Parameter(torch.empty(p.shape, device="meta")), [0])
        yield d.target, tuple(p.shape), tuple(after.shape)
        return
    m = mods[d.target]
    clone = _meta_clone(m)
    d.handler(clone, [0])
    for pname, p in m.named_parameters(recurse=False):
        yield _tensor_name(d.target, pname), tuple(p.shape), tuple(getattr(clone, pname).shape)


def _layer(model: nn.Module, name: str) -> str:
    """How messages name a layer: its module name and type (the model's own forward has the empty name)."""
    if not name:
        return f"the model's own forward ({type(model).__name__})"
    return f"layer {name!r} ({type(model.get_submodule(name)).__name__})"


def _set_pruning_dim(handler: Callable, pruning_dim: int | None) -> None:
    """Torch-Pruning's handlers are methods of pruner objects that read the dimension to prune from the pruner."""
    if hasattr(handler, "__self__"):
        handler.__self__.pruning_dim = pruning_dim


def _tensor_name(module_name: str, pname: str) -> str:
    return f"{module_name}.{pname}" if module_name else pname


@torch.no_grad()
def _own_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """MACs per module name computed by the module itself, not by its children (FlopCounterMode's hierarchy)."""
    with FlopCounterMode(display=False) as fc:
        model(x)
    root = type(model).__name__
    counts = {}  # module name -> MACs of the module and everything it calls
    for key, ops in fc.get_flop_counts().items():
        if key == root or key.startswith(root + "."):
            counts[key[len(root) + 1:]] = int(sum(ops.values())) // 2
    own = dict(counts)
    for name, macs in counts.items():
        if not name:
            continue
        parent = name.rpartition(".")[0]
        while parent and parent not in counts:  # containers that are never called (ModuleList) have no entry
            parent = parent.rpartition(".")[0]
        if parent in own:
            own[parent] -= macs
    return own


def keep_count(ratio: float, channels: int, round_to: int = 1, min_channels: int = 1) -> int:
    """Number of channels kept for a keep ratio: rounded to a multiple of ``round_to``, at least
    ``min_channels``."""
    k = int(math.floor(ratio * channels / round_to + 0.5)) * round_to
    return int(min(channels, max(min_channels, round_to, k)))
