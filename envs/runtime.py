"""Runtime (per-input) channel gating of a pruned network: the top-k of the runtime importance predictor.

For a gated group (a block-internal conv ``P`` -> BN -> activation -> conv ``C``), each input computes only the
``k`` channels its gate ranks highest among the statically kept ones. Two executions give identical outputs:

* ``install_gates(..., sparse=False)``: the dense convs run and the other channels are zeroed after the BN (what
  FBS does on GPUs; fast on CPU for measuring accuracy);
* ``install_gates(..., sparse=True)``: ``P`` computes only the selected output channels of each input and ``C``
  reads only those input channels (per-sample weight gathers run as one grouped convolution), so the multiply-
  accumulates really performed are the effective MACs the env reports.
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
    sal = F.linear(x.mean((2, 3)), spec.weight, spec.bias)
    return sal.topk(spec.k, dim=1).indices.sort(dim=1).values


class _SparseProducer(nn.Module):
    def __init__(self, conv: nn.Conv2d, spec: GateSpec, state: _State):
        super().__init__()
        self.conv, self.spec, self.state = conv, spec, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = _topk(self.spec, x)
        self.state.idx = idx
        b, k = idx.shape
        w = self.conv.weight[idx.reshape(-1)]  # (B*k, C_in, kh, kw): each input's own filters
        out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w, None, self.conv.stride, self.conv.padding,
                       self.conv.dilation, groups=b)
        out = out.reshape(b, k, *out.shape[2:])
        if self.conv.bias is not None:
            out = out + self.conv.bias[idx][:, :, None, None]
        full = out.new_zeros(b, self.conv.out_channels, *out.shape[2:])
        return full.scatter_(1, idx[:, :, None, None].expand_as(out), out)


class _SparseConsumer(nn.Module):
    def __init__(self, conv: nn.Conv2d, state: _State):
        super().__init__()
        self.conv, self.state = conv, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.state.idx
        b, k = idx.shape
        xs = x.gather(1, idx[:, :, None, None].expand(b, k, *x.shape[2:]))  # only the computed channels
        w = self.conv.weight.unsqueeze(0).expand(b, -1, -1, -1, -1)  # (B, C_out, C_in, kh, kw) view
        w = w.gather(2, idx[:, None, :, None, None].expand(b, w.shape[1], k, *w.shape[3:]))
        out = F.conv2d(xs.reshape(1, -1, *xs.shape[2:]), w.reshape(-1, k, *w.shape[3:]), None, self.conv.stride,
                       self.conv.padding, self.conv.dilation, groups=b)
        out = out.reshape(b, self.conv.out_channels, *out.shape[2:])
        if self.conv.bias is not None:
            out = out + self.conv.bias[None, :, None, None]
        return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def install_gates(model: nn.Module, specs: list[GateSpec], sparse: bool = False) -> list:
    """Gate ``model`` in place; returns hook handles (dense) or an empty list (sparse modules swapped in)."""
    handles = []
    mods = dict(model.named_modules())
    for spec in specs:
        if spec.k >= spec.weight.shape[0]:
            continue  # every channel computed: no gate runs
        if sparse:
            state = _State()
            _set(model, spec.producer, _SparseProducer(mods[spec.producer], spec, state))
            _set(model, spec.consumer, _SparseConsumer(mods[spec.consumer], state))
            continue
        state = _State()

        def pre(_m, inp, spec=spec, state=state):
            state.idx = _topk(spec, inp[0])

        def post(_m, _inp, out, state=state):
            mask = torch.zeros(out.shape[0], out.shape[1], dtype=out.dtype)
            mask.scatter_(1, state.idx, 1.0)
            return out * mask[:, :, None, None]

        handles.append(mods[spec.producer].register_forward_pre_hook(pre))
        handles.append(mods[spec.bn].register_forward_hook(post))
    return handles
