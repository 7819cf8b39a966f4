"""The one training loop: pretraining, the benchmark's common fine-tune and the baselines' regularised fine-tunes.

Each caller states its recipe as arguments instead of carrying its own loop: how batches are drawn
(``batch_indices``: seeded passes over the split, with or without the partial last batch, or sampling with
replacement), augmentation (random crop + horizontal flip), label smoothing, bfloat16 autocast, the optimizers
and schedulers, an extra loss term and a projection after every step.

Where and how it runs comes from ``envs.machine.backend(device)``: the device, and the memory format that was
probed safe and faster for *training* on this machine (channels-last backward crashes in oneDNN's AVX2 kernels
for some small convolutions, so AVX2-only CPUs train contiguous). The model is handed back on the device and in
the memory format it came in.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Split
from .machine import Backend, backend, cuda_numerics

SAMPLERS = ("epoch", "epoch_drop_last", "replacement")


def batch_indices(n: int, batch_size: int, generator: torch.Generator, sampler: str = "epoch"
                  ) -> Iterator[torch.Tensor]:
    """Endless seeded batches of indices into a split of ``n`` items.

    ``"epoch"``: passes over a fresh permutation each, the last batch of a pass may be smaller;
    ``"epoch_drop_last"``: the same without the partial last batch (a split smaller than a batch is one batch);
    ``"replacement"``: uniform with replacement.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n={n!r} and batch_size={batch_size!r} must be >= 1")
    while True:
        if sampler == "replacement":
            yield torch.randint(0, n, (batch_size,), generator=generator)
            continue
        perm = torch.randperm(n, generator=generator)
        stop = max(n - n % batch_size, 1) if sampler == "epoch_drop_last" else n  # a split < batch: all of it
        for i in range(0, stop, batch_size):
            yield perm[i : i + batch_size]


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (padding with the batch's background value) and horizontal flip."""
    b, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (oy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, c, h, w)
        cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, c, h, w)
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False
        ) -> torch.optim.SGD:
    """SGD with weight decay on conv / linear weights only (not on BatchNorm scales and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": float(weight_decay)},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=float(lr), momentum=float(momentum), nesterov=nesterov)


def train_steps(
    model: nn.Module,
    split: Split,
    steps: int,
    optimizers: Sequence[torch.optim.Optimizer],
    batches: Iterator[torch.Tensor],
    *,
    schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler] = (),
    generator: torch.Generator | None = None,
    pad: int = 0,
    flip: bool = False,
    label_smoothing: float = 0.0,
    bf16: bool = False,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    device: str | torch.device | Backend = "auto",
    progress: bool = True,
    desc: str = "train",
    log_every: int = 20,
) -> float:
    """Train ``model`` in place for ``steps`` steps on ``split``; returns the last step's cross-entropy.

    ``batches`` yields index tensors (``batch_indices``); ``generator`` drives augmentation (needed when ``pad``
    or ``flip``). Every optimizer and scheduler steps once per step. ``penalty(model)`` is added to the loss;
    ``after_step(model)`` runs under ``no_grad`` after the optimizer step (a projection such as a clamp).
    ``bf16`` asks for bfloat16 autocast, used only where the backend has fast, safe bf16 kernels.
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    if (pad or flip) and generator is None:
        raise ValueError("augmentation (pad / flip) needs a seeded generator=")
    be = device if isinstance(device, Backend) else backend(device)
    first = next(model.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    mf = be.memory_format(training=True)
    model.to(device=be.device, memory_format=mf)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", mininterval=2.0, file=sys.stderr)
    with cuda_numerics(be.device):  # deterministic cuDNN kernels (atomics in some backward ops remain)
        for i in bar:
            idx = next(batches)
            x, y = split.x[idx], split.y[idx]
            if pad or flip:
                x = augment(x, pad, flip, generator)
            x = x.to(be.device, non_blocking=True).contiguous(memory_format=mf)
            y = y.to(be.device, non_blocking=True)
            with be.autocast(bf16):
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            total = loss + penalty(model) if penalty is not None else loss
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            total.backward()
            for o in optimizers:
                o.step()
            for s in schedulers:
                s.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            if progress and (i % log_every == 0 or i == steps - 1):  # a short run shows its last loss too
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.3f}", total=f"{total.item():.3f}")
    if steps:
        loss_value = loss.item()
    model.to(device=home, memory_format=torch.contiguous_format)
    return loss_value
