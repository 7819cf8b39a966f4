"""Cost model: MACs / FLOPs, parameters and CPU latency.

One definition is used everywhere in the project: **MACs are counted by torch's ``FlopCounterMode``** (multiply-
accumulates of convolutions, linear layers and matrix products; ``FLOPs = 2 * MACs``). Element-wise ops
(BatchNorm, ReLU, additions, pooling) are not counted, as in the pruning literature (AMC, Torch-Pruning's
``count_ops_and_params`` MACs for convs/linears). ``flops_ratio`` in the env is a ratio of these MACs.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of one forward pass per example (``example_input`` batch size is divided out)."""
    per_module = count_macs_per_module(model, example_input)
    return int(sum(per_module.values()))


@torch.no_grad()
def count_macs_per_module(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """MACs per leaf module name (``"layer1.0.conv1"``) for one example."""
    names = {m: n for n, m in model.named_modules()}
    batch = int(example_input.shape[0])
    counts: dict[str, int] = defaultdict(int)
    current: list[str] = []
    hooks = []

    def pre(mod, _inp):
        current.append(names[mod])

    def post(mod, _inp, _out):
        current.pop()

    for m in model.modules():
        if len(list(m.children())) == 0:
            hooks.append(m.register_forward_pre_hook(pre))
            hooks.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            model(example_input)
        flop_counts = fc.get_flop_counts()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # FlopCounterMode keys modules by their dotted path prefixed with the root's class name ("Global" holds all).
    for key, ops in flop_counts.items():
        if key == "Global":
            continue
        name = key.split(".", 1)[1] if "." in key else ""
        if name in names.values() and name and len(list(dict(model.named_modules())[name].children())) == 0:
            counts[name] += int(sum(ops.values())) // 2
    total = int(sum(flop_counts.get("Global", {}).values())) // 2
    leaf_sum = sum(counts.values())
    if total != leaf_sum:  # functional ops outside leaf modules (e.g. a matmul in forward): keep them visible
        counts["<functional>"] += total - leaf_sum
    return {k: v // batch for k, v in counts.items()}


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs = 2 * MACs (the convention of FlopCounterMode)."""
    return 2 * count_macs(model, example_input)


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers, not parameters)."""
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall-clock seconds of one forward pass of ``batch_size`` inputs of ``input_shape`` (C, H, W)."""
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size={batch_size!r} and repeats={repeats!r} must be >= 1")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape)
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
        model.train(was_training)
    return float(statistics.median(times))


def compare_latency(
    model: nn.Module,
    reference: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = None,
    rounds: int = 3,
    repeats: int = 5,
) -> tuple[float, float]:
    """Seconds per forward pass of ``model`` and of ``reference``: the smallest of ``rounds`` medians of
    ``repeats`` passes each, the two networks measured alternately.

    Other processes on the CPU inflate single medians by several times; alternating spreads that noise over both
    networks, and the best round is the least disturbed one.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be >= 1")
    t_model, t_ref = float("inf"), float("inf")
    for _ in range(rounds):
        t_model = min(t_model, measure_latency(model, input_shape, batch_size, threads, repeats))
        t_ref = min(t_ref, measure_latency(reference, input_shape, batch_size, threads, repeats))
    return t_model, t_ref
