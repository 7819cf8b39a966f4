"""Latency look-up table: per-layer latency (on the env's device) as a function of kept input / output channels.

As in NetAdapt / AMC's latency variant, each conv / linear layer is timed alone (``measure_latency``) on a grid of
kept-channel fractions {1/4, 1/2, 3/4, 1} x {1/4, 1/2, 3/4, 1} at its real input size; a configuration's latency is
the sum of bilinear interpolations plus the time of everything else (the full net's measured latency minus its
layers'). Grid values are made monotone so that keeping more channels never predicts less time, which lets the
action wall search on it. The ``latency`` target budgets this prediction; ``envs.cost.measure_latency`` measures
(``torch.utils.benchmark.Timer``), on ``device``: the CPU by default, the env passes its own device, so on a GPU
the table predicts GPU latency.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .cost import measure_latency
from .machine import backend, resolve_device

GRID = np.array([0.25, 0.5, 0.75, 1.0])


class LatencyTable:
    """Per-layer latency tables of ``graph``'s network at ``batch_size``, measured on ``device`` ("cpu" by default;
    "auto", "cuda", "cuda:N" as in ``envs.machine.resolve_device``); ``machine`` names what was timed."""

    def __init__(self, graph, batch_size: int = 1, repeats: int = 5, threads: int | None = None,
                 device: str | torch.device = "cpu"):
        self.graph = graph
        self.device = resolve_device(device)
        self.machine = backend(self.device).machine
        model = graph.model
        mods = dict(model.named_modules())
        shapes: dict[str, tuple] = {}
        hooks = [m.register_forward_pre_hook(lambda m, inp, n=n: shapes.__setitem__(n, tuple(inp[0].shape[1:])))
                 for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            model(graph.example_input)
        for h in hooks:
            h.remove()
        # measure_latency times on the CPU by default; the device is named only when it is another one
        on = {} if self.device.type == "cpu" else {"device": self.device}
        self.terms = []  # (table (4,4) seconds, out_group, in_group, depthwise)
        layer_total = 0.0
        for name, shape in shapes.items():
            m = mods[name]
            og, ig = graph.output_group(name), graph.input_group(name)
            dw = isinstance(m, nn.Conv2d) and m.groups > 1
            table = np.zeros((len(GRID), len(GRID)))
            for a, fo in enumerate(GRID):
                for b, fi in enumerate(GRID):
                    if (og is None and a < len(GRID) - 1) or ((ig is None or dw) and b < len(GRID) - 1):
                        continue
                    layer, in_shape = _shrunk(m, shape, fo if og is not None else 1.0,
                                              fi if (ig is not None or dw) else 1.0, dw)
                    table[a, b] = measure_latency(layer, in_shape, batch_size, threads, repeats, warmup=1, **on)
            table = _fill(table, og is None, ig is None or dw)
            table = np.maximum.accumulate(np.maximum.accumulate(table, 0), 1)  # monotone in both fractions
            self.terms.append((table, og, None if dw else ig, dw))
            layer_total += table[-1, -1]
        full = measure_latency(model, tuple(graph.example_input.shape[1:]), batch_size, threads, repeats,
                               warmup=1, **on)
        self.other = max(0.0, full - layer_total)
        self.full_measured = full

    def predict(self, kept) -> float:
        total = self.other
        for table, og, ig, _dw in self.terms:
            fo = kept[og] / self.graph.groups[og].num_channels if og is not None else 1.0
            fi = kept[ig] / self.graph.groups[ig].num_channels if ig is not None else 1.0
            total += _bilinear(table, fo, fi)
        return float(total)


def _shrunk(m: nn.Module, shape: tuple, fo: float, fi: float, dw: bool):
    if isinstance(m, nn.Linear):
        i, o = max(1, round(m.in_features * fi)), max(1, round(m.out_features * fo))
        return nn.Linear(i, o, bias=m.bias is not None), (i,)
    o = max(1, round(m.out_channels * fo))
    i = o if dw else max(1, round(m.in_channels * fi))
    conv = nn.Conv2d(i, o, m.kernel_size, m.stride, m.padding, m.dilation, groups=o if dw else 1,
                     bias=m.bias is not None)
    return conv, (i, *shape[1:])


def _fill(table: np.ndarray, out_fixed: bool, in_fixed: bool) -> np.ndarray:
    if out_fixed:
        table[:] = table[-1:, :]
    if in_fixed:
        table[:] = table[:, -1:]
    return table


def _bilinear(table: np.ndarray, fo: float, fi: float) -> float:
    def axis(f):
        f = float(np.clip(f, 0.0, 1.0))
        if f <= GRID[0]:
            return 0, 0, 0.0, f / GRID[0]  # scale down linearly below the grid
        j = int(np.searchsorted(GRID, f)) - 1
        j = min(max(j, 0), len(GRID) - 2)
        return j, j + 1, (f - GRID[j]) / (GRID[j + 1] - GRID[j]), 1.0

    a0, a1, wa, sa = axis(fo)
    b0, b1, wb, sb = axis(fi)
    v = ((1 - wa) * (1 - wb) * table[a0, b0] + wa * (1 - wb) * table[a1, b0] + (1 - wa) * wb * table[a0, b1]
         + wa * wb * table[a1, b1])
    return float(v * sa * sb)
