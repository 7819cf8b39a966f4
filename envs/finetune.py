"""The one fine-tuning recipe applied after pruning, identical for every method in the benchmark.

Pruning papers each fine-tune with their own schedule (AMC: 30 epochs; PFP: the original schedule; SCOP: 300
epochs on CIFAR), which makes their published numbers incomparable. The benchmark instead gives every method the
same short recipe, so differences come from *which* channels were kept, not from the training budget:

* SGD with Nesterov momentum 0.9, learning rate 0.01 decayed to 0 by a cosine schedule over ``steps``
  (``torch.optim.lr_scheduler.CosineAnnealingLR``, one scheduler step per optimizer step; no warm restarts);
* weight decay 5e-4 on conv / linear weights only (not on BatchNorm scales and biases, as in ``envs.pretrain``);
* batches of 64 drawn from ``data.train`` by seeded permutations (a new permutation per pass), with the
  pretraining augmentation (random crop with 2 pixels of padding + horizontal flip, ``envs.training.augment``);
* cross-entropy with label smoothing 0.1 (the pretraining loss);
* bfloat16 autocast where the machine has fast bf16 kernels (float32 master weights), in the memory format the
  machine was probed safe and faster with for training (``envs.machine``), on ``device``.

Deviation from a plain SGD loop: BatchNorms whose ``momentum`` is ``None`` (the env's BN recalibration sets a
cumulative average) get the default momentum 0.1 back, because a cumulative average over training steps would
mix statistics of weights that no longer exist. The model keeps that momentum afterwards.

The model is trained **in place** (on ``device``; handed back on the device it came on) and returned in eval
mode; pass a copy to keep the original. Gated (runtime-mode) models work unchanged: the gates are forward hooks
or wrapper modules whose gate weights are plain tensors, so only the network's own parameters are trained
(``envs.gates.finetune_with_gates`` trains gates and network together, through ``sgd_module`` and
``extra_optimizers``). Runs are deterministic for a seed (the global torch RNG is forked, so the caller's random
state is untouched; dropout draws from the seeded fork).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .data import DatasetSplits
from .machine import backend
from .training import batch_indices, sgd, train_steps

LABEL_SMOOTHING = 0.1
PAD = 2
FLIP = True


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; expected {allowed}")


def finetune(
    model: nn.Module,
    data: DatasetSplits,
    steps: int,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "auto",
    sgd_module: nn.Module | None = None,
    extra_optimizers: Sequence[torch.optim.Optimizer] = (),
) -> nn.Module:
    """Fine-tune ``model`` in place for ``steps`` SGD steps on ``data.train``; returns it in eval mode.

    ``steps=0`` returns the model unchanged (in eval mode). See the module docstring for the recipe. The SGD
    recipe trains ``sgd_module``'s parameters (default: ``model``'s, a submodule such as a wrapped network
    otherwise); ``extra_optimizers`` (built by the caller for parameters outside it) step once per step too.
    """
    _check("steps", steps, isinstance(steps, int) and steps >= 0, "an integer >= 0")
    _check("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an integer >= 1")
    _check("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "a finite number > 0")
    _check("momentum", momentum, isinstance(momentum, (int, float)) and 0 < momentum < 1,
           "a number in (0, 1) (Nesterov needs momentum > 0)")
    _check("weight_decay", weight_decay, isinstance(weight_decay, (int, float)) and weight_decay >= 0,
           "a number >= 0")
    if steps == 0:
        return model.eval()
    n = len(data.train)
    _check("data.train", f"<{n} images>", n > 0, "a non-empty training split")
    trained = model if sgd_module is None else sgd_module
    _check("model", type(trained).__name__, any(p.requires_grad for p in trained.parameters()),
           "a model with trainable parameters")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None:
            m.momentum = 0.1
    opt = sgd(trained, lr, momentum, weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    be = backend(device)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        batches = batch_indices(n, batch_size, gen, "epoch_drop_last")
        train_steps(model, data.train, steps, [opt, *extra_optimizers], batches,
                    schedulers=[sched], generator=gen, pad=PAD, flip=FLIP, label_smoothing=LABEL_SMOOTHING,
                    bf16=True, device=be, progress=progress, desc="finetune")
    return model.eval()
