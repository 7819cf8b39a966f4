"""Cost model: MACs / FLOPs, parameters and latency (CPU by default, or on a GPU).

One definition is used everywhere in the project: **MACs are counted by torch's ``FlopCounterMode``** (multiply-
accumulates of convolutions, linear layers and matrix products; ``FLOPs = 2 * MACs``). Element-wise ops
(BatchNorm, ReLU, additions, pooling) are not counted, as in the pruning literature (AMC, Torch-Pruning's
``count_ops_and_params`` MACs for convs/linears). ``flops_ratio`` in the env is a ratio of these MACs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import timeit
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .machine import resolve_device


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


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` itself when its parameters are on ``dev`` (or it has none), else a copy moved there."""
    first = next(model.parameters(), None)
    if first is None or first.device == dev:
        return model
    return copy.deepcopy(model).to(dev)


def _check_latency_args(batch_size: int, repeats: int, warmup: int, threads: int | None) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1) or not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"batch_size={batch_size!r} and repeats={repeats!r} must be integers >= 1")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup={warmup!r} must be an integer >= 0")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads={threads!r} must be None (torch's current number) or an integer >= 1")


@contextlib.contextmanager
def _timing_mode(models: list[nn.Module], dev: torch.device) -> Iterator[None]:
    """Eval mode and no autograd for the timing, CUDA's current device = ``dev``; training modes restored."""
    modes = [m.training for m in models]
    cuda = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    try:
        for m in models:
            m.eval()
        with torch.no_grad(), cuda:
            yield
    finally:
        for m, was in zip(models, modes):
            m.train(was)


def _timer_class():
    """``torch.utils.benchmark.Timer``, imported on first use.

    Its import loads ``torch.utils.cpp_extension``, which logs "No CUDA runtime is found, using CUDA_HOME=..." on
    CPU machines that have a CUDA toolkit; that says nothing about the timing, so it is held back here.
    """
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


def _seconds_per_pass(model: nn.Module, x: torch.Tensor, threads: int, repeats: int, warmup: int) -> float:
    """Median seconds per forward pass of ``model(x)`` by ``torch.utils.benchmark.Timer`` (``measure_latency``).

    ``model`` and ``x`` are on the device already; call inside ``_timing_mode``.
    """
    # On the CPU a plain clock (no accelerator synchronisation to pay for); on CUDA Timer's default clock, which
    # synchronises the device before every reading, so queued kernels are inside the measurement.
    clock = {"timer": timeit.default_timer} if x.device.type == "cpu" else {}
    t = _timer_class()(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads, **clock)
    est = t.timeit(number=max(warmup, 1))  # Timer's own 2 warm-up passes, then ``warmup`` passes (the estimate)
    return float(t.blocked_autorange(min_run_time=repeats * est.mean).median)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
    *,
    device: str | torch.device = "cpu",
) -> float:
    """Seconds per forward pass of ``batch_size`` random inputs of ``input_shape`` (C, H, W) on ``device``.

    Timed by ``torch.utils.benchmark.Timer``: with ``threads`` torch threads (default: the current number; restored
    afterwards), after Timer's warm-up passes plus ``warmup`` more (which estimate the time of one pass), then
    ``blocked_autorange`` for about ``repeats`` passes' worth of time; returns the median, over its blocks, of the
    seconds per pass. Timer picks the block size so that reading the clock (and, on CUDA, synchronising the
    device before each reading) is negligible: slow passes are timed one by one, fast ones in blocks.

    ``device`` defaults to ``"cpu"``, not ``"auto"``: CPU latency is what the README reports, on whatever machine.
    ``"cuda"`` / ``"cuda:N"`` time on that GPU (a copy of the model is moved there; the model itself is left where
    it is); ``"auto"`` is CUDA when available. The model runs in eval mode, float32, in the memory format it is in,
    without autograd; its training mode is restored.
    """
    _check_latency_args(batch_size, repeats, warmup, threads)
    dev = resolve_device(device)
    n_threads = int(threads) if threads is not None else torch.get_num_threads()
    with _timing_mode([model], dev):
        net = _on_device(model, dev)
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
        return _seconds_per_pass(net, x, n_threads, repeats, warmup)


def compare_latency(
    model: nn.Module,
    reference: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    threads: int | None = None,
    rounds: int = 3,
    repeats: int = 5,
    *,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Seconds per forward pass of ``model`` and of ``reference`` on ``device``: the smallest of ``rounds``
    measurements (``measure_latency`` with ``repeats`` and 3 warm-up passes) each, the two networks measured
    alternately.

    Other processes on the CPU inflate single medians by several times; alternating spreads that noise over both
    networks, and the best round is the least disturbed one. ``device`` defaults to ``"cpu"`` (the README's CPU
    latency); both networks are moved there once (copies, for a device they are not on) and share one input.
    """
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"rounds={rounds!r} must be an integer >= 1")
    warmup = 3
    _check_latency_args(batch_size, repeats, warmup, threads)
    dev = resolve_device(device)
    n_threads = int(threads) if threads is not None else torch.get_num_threads()
    t_model, t_ref = float("inf"), float("inf")
    with _timing_mode([model, reference], dev):
        net, ref = _on_device(model, dev), _on_device(reference, dev)
        x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(dev)
        for _ in range(rounds):
            t_model = min(t_model, _seconds_per_pass(net, x, n_threads, repeats, warmup))
            t_ref = min(t_ref, _seconds_per_pass(ref, x, n_threads, repeats, warmup))
    return t_model, t_ref
