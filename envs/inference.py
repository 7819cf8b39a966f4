"""Fast, consistent inference for the env's evaluator: channels-last memory format and optional bfloat16 autocast.

On the 2-core AVX-512 development machine, ``make bench`` measured the unpruned ResNet-18 on 28x28 Fashion-MNIST
at 175 images/s in a plain contiguous float32 loop, 203 in channels-last float32 and 459 in channels-last
bfloat16 (batch 250; README, "Speed"). Every accuracy the env reports (reward, BN recalibration, the benchmark's test accuracy) goes through this one
context, so all methods are ranked by the same arithmetic. bfloat16 moves accuracies by about 0.1 point against
float32 (ResNet-18, 50% FLOPs, 10k test images: 0.7419 vs 0.7405); pass ``eval_precision="fp32"`` for exact
float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_supported() -> bool:
    """Whether oneDNN has fast bfloat16 kernels on this CPU (AVX-512 BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older builds lack the probe
        return False


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where the CPU has fast bfloat16 kernels, else 'fp32'; checks the name."""
    if precision not in PRECISIONS:
        raise ValueError(f"eval_precision={precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


@contextlib.contextmanager
def inference_context(model: nn.Module, precision: str) -> Iterator[None]:
    """Run ``model`` channels-last (restored to contiguous on exit) under bf16 autocast when ``precision='bf16'``.

    Inputs may stay contiguous: the first convolution's channels-last weight makes its output channels-last.
    """
    model.to(memory_format=torch.channels_last)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        model.to(memory_format=torch.contiguous_format)
