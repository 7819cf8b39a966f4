"""Runtime (per-input) channel gating of a pruned network: the top-k of the runtime importance predictor.

For a gated group (a block-internal conv ``P`` -> BN -> activation -> conv ``C``), each input computes only the
``k`` channels its gate ranks highest among the statically kept ones. Two executions give identical outputs:

* ``install_gates(..., sparse=False)``: the dense convs run and the other channels are zeroed after the BN (what
  FBS does on GPUs; fast on CPU for measuring accuracy);
* ``install_gates(..., sparse=True)``: ``P`` computes only the selected output channels of each input, its BN
  normalises only those, and ``C`` reads only those (at batch 1 plain convolutions with sliced weights, the
  deployment case; larger batches one grouped convolution of per-input weights), so the multiply-accumulates
  really performed are the effective MACs the env reports. The time does not follow them on a CPU: at batch 1
  the per-input weight gathers cost about what the skipped MACs save (ResNet-18 at 50% effective FLOPs, 1.02x
  the unpruned latency; ``make bench``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GateSpec:
    producer: str  # conv computing the group's channels
    bn: str  # its BatchNorm (the gate acts after it)
    consumer: str  # the conv reading the group's channels
    weight: torch.Tensor  # (C_out_kept, C_in_kept) gate weights, already sliced to the pruned net
    bias: torch.Tensor  # (C_out_kept,)
    k: int  # channels computed per input


class _State:
    def __init__(self):
        self.idx: torch.Tensor | None = None  # (B, k) selected channels of the current batch


def _topk(spec: GateSpec, x: torch.Tensor) -> torch.Tensor:
    return _topk_pooled(spec, x.mean((2, 3)))


def _topk_pooled(spec: GateSpec, pooled: torch.Tensor) -> torch.Tensor:
    # the gate's weights follow the activations: the gated copy may have been moved to another device
    sal = F.linear(pooled, spec.weight.to(pooled.device, pooled.dtype), spec.bias.to(pooled.device, pooled.dtype))
    return sal.topk(spec.k, dim=1).indices.sort(dim=1).values


class _SparseConv(nn.Module):
    """A conv that, per input, computes only its gate's selected output channels (``out_spec``) and/or reads only
    the channels the previous gate selected (``in_state``). One module holds both roles, because in a plain chain
    (VGG) a conv is the consumer of one gated group and the producer of the next.

    Between a producer and its consumer the activations stay *compact*: (B, k, H, W), channel j of input b being
    kept channel ``idx[b, j]``; the BN between them is a ``_SparseBN``, activations and pooling are per channel.
    At batch 1 both convs are plain convolutions with sliced weights (the deployment case of per-input pruning);
    larger batches run one grouped convolution with each input's own weights."""

    def __init__(self, conv: nn.Conv2d, in_state: _State | None, out_spec: GateSpec | None,
                 out_state: _State | None):
        super().__init__()
        self.conv, self.in_state, self.out_spec, self.out_state = conv, in_state, out_spec, out_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        w = self.conv.weight  # (C_out, C_in, kh, kw)
        idx_in = self.in_state.idx if self.in_state is not None else None  # x is compact: (B, k_in, H, W)
        idx_out = None
        if self.out_spec is not None:
            pooled = x.mean((2, 3))
            if idx_in is not None:  # the gate reads the kept-width pooled input, zeros where not computed
                pooled = pooled.new_zeros(b, self.conv.in_channels).scatter_(1, idx_in, pooled)
            idx_out = _topk_pooled(self.out_spec, pooled)
            self.out_state.idx = idx_out
        if b == 1:  # sliced weights, one plain convolution
            if idx_out is not None:
                w = w.index_select(0, idx_out[0])
            if idx_in is not None:
                w = w.index_select(1, idx_in[0])
            bias = self.conv.bias
            if bias is not None and idx_out is not None:
                bias = bias.index_select(0, idx_out[0])
            return F.conv2d(x, w, bias, self.conv.stride, self.conv.padding, self.conv.dilation)
        if idx_out is not None:
            w = w[idx_out]  # (B, k_out, C_in, kh, kw): each input's own filters
        else:
            w = w.unsqueeze(0).expand(b, *w.shape)  # (B, C_out, C_in, kh, kw) view
        if idx_in is not None:
            w = w.gather(2, idx_in[:, None, :, None, None].expand(b, w.shape[1], idx_in.shape[1], *w.shape[3:]))
        k_out, k_in = w.shape[1], w.shape[2]
        out = F.conv2d(x.reshape(1, b * k_in, *x.shape[2:]), w.reshape(b * k_out, k_in, *w.shape[3:]), None,
                       self.conv.stride, self.conv.padding, self.conv.dilation, groups=b)
        out = out.reshape(b, k_out, *out.shape[2:])
        if self.conv.bias is not None:
            bias = self.conv.bias[idx_out] if idx_out is not None else self.conv.bias[None, :]
            out = out + bias[:, :, None, None]
        return out


class _SparseBN(nn.Module):
    """The BatchNorm of a gated group on compact activations: each input's selected channels, their own
    statistics and affine parameters. In training mode the batch statistics need whole channels, so the compact
    activations are spread to the full width (zeros where not computed), normalised, and gathered back."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, state: _State):
        super().__init__()
        self.bn, self.state = bn, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.state.idx  # (B, k)
        bn = self.bn
        if bn.training or bn.running_mean is None:
            where = idx[:, :, None, None].expand_as(x)
            full = x.new_zeros(x.shape[0], bn.num_features, *x.shape[2:]).scatter_(1, where, x)
            return bn(full).gather(1, where)
        scale = bn.running_var.add(bn.eps).rsqrt()
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        if idx.shape[0] == 1:
            idx0 = idx[0]
            scale, shift = scale.index_select(0, idx0)[None], shift.index_select(0, idx0)[None]
            return x * scale[:, :, None, None] + shift[:, :, None, None]
        return x * scale[idx][:, :, None, None] + shift[idx][:, :, None, None]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def install_gates(model: nn.Module, specs: list[GateSpec], sparse: bool = False) -> list:
    """Gate ``model`` in place; returns hook handles (dense) or an empty list (sparse modules swapped in)."""
    handles = []
    mods = dict(model.named_modules())
    active = [spec for spec in specs if spec.k < spec.weight.shape[0]]  # k == all channels: no gate runs
    if sparse:
        roles: dict[str, dict] = {}  # conv name -> its output gate (spec, state) and / or its input gate's state
        for spec in active:
            state = _State()
            roles.setdefault(spec.producer, {})["out"] = (spec, state)
            roles.setdefault(spec.consumer, {})["in"] = state
            _set(model, spec.bn, _SparseBN(mods[spec.bn], state))
        for name, role in roles.items():
            out_spec, out_state = role.get("out", (None, None))
            _set(model, name, _SparseConv(mods[name], role.get("in"), out_spec, out_state))
        return handles
    for spec in active:
        state = _State()

        def pre(_m, inp, spec=spec, state=state):
            state.idx = _topk(spec, inp[0])

        def post(_m, _inp, out, state=state):
            mask = torch.zeros(out.shape[0], out.shape[1], dtype=out.dtype, device=out.device)
            mask.scatter_(1, state.idx, 1.0)
            return out * mask[:, :, None, None]

        handles.append(mods[spec.producer].register_forward_pre_hook(pre))
        handles.append(mods[spec.bn].register_forward_hook(post))
    return handles
