"""Bounded, regularized fine-tuning of a copy of the env's base model, cached per checkpoint.

Methods that change the network before pruning (Polarization's regularizer, gRDA's optimizer) share this loop:
``finetune`` trains a deep copy of ``env.base_model`` (the base model is never touched) for a fixed number of
steps on ``env.data.train`` (never on the reward, calibration or test splits), with seeded batch sampling, an
optional extra penalty on the loss, an optional projection after every step, and optimizers of the method's
choice. ``cached_finetune`` stores the resulting state dict next to ``env.problem.checkpoint_file`` (keyed by
method and hyperparameters; loaded with ``weights_only=True``) or, for an env built on an in-memory model, in
memory.

Deviation shared by every method using it: no data augmentation (a few hundred steps from a converged network).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from envs.channel_prune import ChannelPruneEnv
from envs.paths import atomic_save
from envs.training import batch_indices, sgd, train_steps

# in-memory cache for envs without a checkpoint file: base model -> {key: state dict}
_MEMORY: "weakref.WeakKeyDictionary[nn.Module, dict[str, dict]]" = weakref.WeakKeyDictionary()


def env_progress(env: ChannelPruneEnv) -> bool:
    """Whether the env was built with progress bars on."""
    return env.problem.progress


def check_positive(name: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite positive (or non-negative) number."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} {kind}")


def merge_options(method: str, options: dict, defaults: dict) -> dict:
    """``defaults`` updated with ``options``; ValueError naming any option the method does not know."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{method}: unknown option(s) {unknown}; allowed: {', '.join(sorted(defaults))}")
    return {**defaults, **options}


def finetune(
    env: ChannelPruneEnv,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    optimizers: Callable[[nn.Module], list[torch.optim.Optimizer]] | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    before: Callable[[nn.Module], None] | None = None,
    lr: float = 0.01,
    desc: str = "fine-tune",
    progress: bool = True,
) -> nn.Module:
    """Train a deep copy of ``env.base_model`` for ``steps`` steps on ``env.device``; returns it in eval mode.

    The recipe, as arguments of the one training loop (``envs.training.train_steps``): batches sampled with
    replacement from ``env.data.train``, no augmentation, plain cross-entropy, float32.

    Args:
        optimizers: builds the optimizers from the copy (default: SGD, momentum 0.9, ``lr``, weight decay 5e-4
            on weights with >1 dimension); all of them step after every backward pass.
        penalty: extra loss term ``penalty(model)`` added to the cross-entropy.
        after_step: called after every optimizer step, under ``no_grad`` (a projection such as a clamp).
        before: called once on the copy before training, under ``no_grad``.
    """
    check_positive("steps", steps, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    model = copy.deepcopy(env.base_model).to(env.device)
    if before is not None:
        with torch.no_grad():
            before(model)
    opts = optimizers(model) if optimizers is not None else [sgd(model, lr, momentum=0.9)]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # for any randomness inside the model (none in the zoo; cheap insurance)
        train_steps(model, env.data.train, steps, opts, batch_indices(len(env.data.train), batch_size, gen,
                                                                      "replacement"),
                    penalty=penalty, after_step=after_step, device=env.device, progress=progress, desc=desc,
                    log_every=10)
    return model.cpu().eval()


def _key(method: str, hparams: dict) -> str:
    blob = json.dumps(hparams, sort_keys=True, default=str)
    return f"{method}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def cache_path(env: ChannelPruneEnv, method: str, hparams: dict) -> Path | None:
    """``<checkpoint>.<method>-<hash of hparams>.pt``, or None for an env without a checkpoint file."""
    if env.problem.checkpoint_file is None:
        return None
    return Path(f"{env.problem.checkpoint_file}.{_key(method, hparams)}.pt")


def cached_finetune(
    env: ChannelPruneEnv, method: str, hparams: dict, build: Callable[[], nn.Module], cache: bool = True
) -> nn.Module:
    """The fine-tuned copy for (checkpoint, method, hparams): loaded from the cache, or ``build()`` and stored.

    ``cache=False`` always rebuilds (and does not store).
    """
    key = _key(method, hparams)
    path = cache_path(env, method, hparams)
    if cache:
        state = None
        if path is not None and path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                print(f"rebuilding unreadable fine-tune cache {path}: {exc}", file=sys.stderr)
        elif path is None:
            state = _MEMORY.get(env.base_model, {}).get(key)
        if state is not None:
            model = copy.deepcopy(env.base_model)
            model.load_state_dict(state)
            return model.eval()
    model = build()
    if cache:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if path is not None:
            atomic_save(state, path)
        else:
            _MEMORY.setdefault(env.base_model, {})[key] = state
    return model


def bn_modules(model: nn.Module) -> Iterable[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
