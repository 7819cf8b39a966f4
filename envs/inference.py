"""The evaluator's arithmetic: device, memory format and precision, as probed for this machine.

Every accuracy the env reports (reward, BN recalibration, the benchmark's test accuracy) goes through
``inference_context``, so all methods are ranked by the same arithmetic. ``envs.machine.backend`` decides, per
machine: channels-last where its forward is safe and measured faster, bfloat16 autocast where the CPU (AVX-512
BF16 / AMX) or GPU has fast bf16 kernels. On the 2-core AVX-512 development machine ``make bench`` measured the
unpruned ResNet-18 (28x28) at 175 images/s contiguous float32, 203 channels-last float32 and 459 channels-last
bfloat16; bfloat16 moved accuracies by about 0.1 point against float32 (ResNet-18, 50% FLOPs, 10k test images:
0.7419 vs 0.7405). ``eval_precision="fp32"`` gives exact float32 everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .machine import backend, cuda_numerics

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: str | torch.device = "auto") -> str:
    """'auto' -> 'bf16' where ``device`` has fast, safe bfloat16 kernels, else 'fp32'; checks the name."""
    if precision not in PRECISIONS:
        raise ValueError(f"eval_precision={precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if backend(device).bf16 else "fp32"
    return precision


@contextlib.contextmanager
def inference_context(model: nn.Module, precision: str = "auto", device: str | torch.device = "auto"
                      ) -> Iterator[torch.device]:
    """Run ``model`` on ``device`` in the probed memory format, under bf16 autocast for ``precision='bf16'``.

    Yields the device (move inputs there). On exit the model is contiguous again and back on the device it came
    on. Inputs may stay contiguous: a channels-last first convolution makes its output channels-last.
    """
    be = backend(device)
    precision = resolve_precision(precision, be.device)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    model.to(device=be.device, memory_format=be.memory_format(training=False))
    try:
        with torch.autocast(be.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
                cuda_numerics(be.device, tf32=precision != "fp32"):  # "fp32" is exact float32 on a GPU too
            yield be.device
    finally:
        model.to(device=home, memory_format=torch.contiguous_format)
