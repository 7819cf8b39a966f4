"""Train zoo models on a dataset and cache the checkpoints (resumable per epoch).

    python -m envs.pretrain --model resnet18 --dataset fashion-mnist

Checkpoints live in ``<cache>/checkpoints/<key>.pt`` (state dict only, loaded with ``weights_only=True``) with a
JSON sidecar ``<key>.json``: test accuracy, recipe, library versions and the data fingerprint. The base model is
trained on the training split only (the reward and calibration splits are held out; see ``envs.data``), so the
environment's reward measures generalization.

Default recipe (chosen to reach >= 92% on Fashion-MNIST with ResNet-18 in <= 25 minutes on 2 CPU cores): SGD with
Nesterov momentum 0.9, batch 128, one-cycle learning rate peaking at 0.1, weight decay 5e-4 (not on BN / biases),
label smoothing 0.1, random-crop (pad 2) + horizontal flip, 3 epochs, bfloat16 autocast on CPUs that support it
(float32 master weights), channels-last memory format.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import DatasetSplits, Split, load_dataset
from .inference import inference_context
from .machine import backend
from .models import build_model
from .paths import atomic_save, atomic_write_text, cache_dir
from .training import batch_indices, sgd, train_steps


class CheckpointError(RuntimeError):
    """A cached checkpoint is corrupt, missing or does not match the requested architecture."""


@dataclass(frozen=True)
class Recipe:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    pad: int = 2
    flip: bool = True
    bf16: bool = True
    seed: int = 0
    max_train: int | None = None  # cap on training images (tests)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def checkpoint_key(model: str, dataset: str, width: float, split_seed: int, recipe: Recipe) -> str:
    safe = model.replace(":", "-")
    return f"{safe}-{dataset}-w{width:g}-s{split_seed}-{recipe.key()}"


def checkpoint_path(
    model: str, dataset: str, width: float = 1.0, split_seed: int = 0, recipe: Recipe = Recipe()
) -> Path:
    return cache_dir() / "checkpoints" / f"{checkpoint_key(model, dataset, width, split_seed, recipe)}.pt"


def pretrain_command(model: str, dataset: str, width: float = 1.0, data_dir=None, recipe: Recipe = Recipe(),
                     split_seed: int = 0) -> str:
    cmd = f"python -m envs.pretrain --model {model} --dataset {dataset}"
    if width != 1.0:
        cmd += f" --width {width:g}"
    if data_dir is not None:
        cmd += f" --data-dir {data_dir}"
    if split_seed != 0:
        cmd += f" --split-seed {split_seed}"
    if recipe.epochs != Recipe().epochs:
        cmd += f" --epochs {recipe.epochs}"
    if recipe.batch_size != Recipe().batch_size:
        cmd += f" --batch-size {recipe.batch_size}"
    if recipe.lr != Recipe().lr:
        cmd += f" --lr {recipe.lr!r}"
    return cmd


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 250, precision: str = "auto",
             device: str | torch.device = "auto") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``split`` in eval mode, restoring its mode afterwards.

    ``precision``: "auto", "fp32" or "bf16", as in ``envs.inference``; runs on ``device`` (the model is handed
    back where it was).
    """
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with inference_context(model, precision, device) as dev:
        for x, y in split.batches(batch_size):
            y = y.to(dev)
            out = model(x.to(dev)).float()
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
    model.train(was)
    return correct / max(n, 1), loss / max(n, 1)


def _versions() -> dict:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version()}


def train(
    model_name: str,
    data: DatasetSplits,
    width: float = 1.0,
    recipe: Recipe = Recipe(),
    path: Path | None = None,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> tuple[nn.Module, dict]:
    """Train ``model_name`` on ``data.train`` on ``device``; saves/resumes ``<path>.partial`` after every epoch."""
    be = backend(device)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = build_model(model_name, data.num_classes, data.in_channels, width).to(be.device)
    opt = sgd(model, recipe.lr, recipe.momentum, recipe.weight_decay, nesterov=True)
    train_split = data.train
    if recipe.max_train is not None:
        train_split = Split(data.train.x[: recipe.max_train], data.train.y[: recipe.max_train])
    n = len(train_split.y)
    steps_per_epoch = (n + recipe.batch_size - 1) // recipe.batch_size
    total_steps = recipe.epochs * steps_per_epoch
    # OneCycleLR divides by zero when pct_start * total_steps == 1 (4 steps at 0.25): tiny runs warm up 1.5 steps.
    pct_start = 0.25 if total_steps >= 6 else 1.5 / max(total_steps, 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=total_steps, pct_start=pct_start, div_factor=10,
        final_div_factor=100,
    )
    start_epoch, elapsed = 0, 0.0
    partial = Path(str(path) + ".partial") if path is not None else None
    if partial is not None and partial.exists():
        try:
            state = torch.load(partial, map_location=be.device, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"].cpu())
            start_epoch, elapsed = int(state["epoch"]), float(state["elapsed"])
            print(f"resuming {path.name} from epoch {start_epoch}/{recipe.epochs}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a broken partial file restarts training
            print(f"ignoring unreadable partial checkpoint {partial}: {exc}", file=sys.stderr)
    use_bf16 = recipe.bf16 and be.bf16
    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        batches = batch_indices(n, recipe.batch_size, gen, "epoch")
        run = dict(schedulers=[sched], generator=gen, pad=recipe.pad, flip=recipe.flip,
                   label_smoothing=recipe.label_smoothing, bf16=use_bf16, device=be, progress=progress,
                   desc=f"pretrain {model_name} epoch {epoch + 1}/{recipe.epochs}")
        first = min(3, steps_per_epoch) if epoch == start_epoch else 0
        if first:  # time a few steps to say how long the whole run takes on this machine
            train_steps(model, train_split, first, [opt], batches, **run)
            left = (recipe.epochs - epoch) * steps_per_epoch - first
            per_step = (time.perf_counter() - t0) / first
            print(f"pretraining {model_name}: {left} more steps of {recipe.batch_size} images, about "
                  f"{left * per_step / 60:.0f} min on {be.machine} ({per_step:.2f} s per step)", file=sys.stderr)
        train_steps(model, train_split, steps_per_epoch - first, [opt], batches, **run)
        elapsed += time.perf_counter() - t0
        if partial is not None:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "generator": gen.get_state(), "epoch": epoch + 1,
                         "elapsed": elapsed}, partial)
    model = model.cpu().eval()
    t0 = time.perf_counter()
    test_acc, test_loss = evaluate(model, data.test, device=be.device)
    reward_acc, _ = evaluate(model, data.reward, device=be.device)
    meta = {
        "model": model_name,
        "dataset": data.name,
        "width": width,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "split_seed": data.split_seed,
        "data_fingerprint": data.fingerprint,
        "train_images": int(n),
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "reward_accuracy": reward_acc,
        "train_seconds": round(elapsed, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
        "bf16": use_bf16,
        "threads": torch.get_num_threads(),
        "machine": be.machine,
        "train_memory_format": "channels_last" if be.train_channels_last else "contiguous",
        "recipe": dataclasses.asdict(recipe),
        "versions": _versions(),
    }
    return model, meta


def save_checkpoint(model: nn.Module, meta: dict, path: Path) -> None:
    atomic_save(model.state_dict(), path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2))
    partial = Path(str(path) + ".partial")
    if partial.exists():
        partial.unlink()


SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_shipped(path: Path) -> bool:
    """Install the checkpoint shipped in ``envs/checkpoints/`` for this cache ``path``, if there is one.

    The shipped file is half precision (to stay small in the repository); its sha256 is checked against the
    sidecar, it is loaded with ``weights_only=True`` and written to the cache in float32 with the sidecar.
    """
    shipped = SHIPPED_DIR / path.name
    sidecar = shipped.with_suffix(".json")
    if not (shipped.exists() and sidecar.exists()):
        return False
    meta = json.loads(sidecar.read_text())
    digest = sha256_of(shipped)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"shipped checkpoint {str(shipped)!r} has sha256 {digest}, but its sidecar says "
                              f"{meta.get('sha256')}; the file is damaged (reinstall the package, or train it "
                              f"with `python -m envs.pretrain`)")
    state = torch.load(shipped, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    atomic_save(state, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps({**meta, "source": f"shipped: {shipped.name}"},
                                                            indent=2))
    print(f"installed the shipped checkpoint {shipped.name} into {path.parent}", file=sys.stderr)
    return True


def ship_checkpoint(path: Path, data: DatasetSplits, device: str | torch.device = "auto") -> Path:
    """Write the half-precision copy of cached checkpoint ``path`` into ``envs/checkpoints/`` with a sidecar
    holding its sha256 and its accuracies *as shipped* (re-measured after the float16 rounding)."""
    meta = json.loads(path.with_suffix(".json").read_text())
    state = torch.load(path, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out = SHIPPED_DIR / path.name
    atomic_save(half, out)
    model = build_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["width"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    model.eval()
    meta["trained_accuracy"] = {"test": meta["test_accuracy"], "reward": meta["reward_accuracy"]}
    meta["test_accuracy"], meta["test_loss"] = evaluate(model, data.test, precision="fp32", device=device)
    meta["reward_accuracy"], _ = evaluate(model, data.reward, precision="fp32", device=device)
    meta["sha256"] = sha256_of(out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2))
    return out


def load_checkpoint(
    path: str | os.PathLike, model_name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> tuple[nn.Module, dict]:
    """Build ``model_name`` and load ``path`` into it (``weights_only=True``); clear errors when it cannot."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    sidecar = path.with_suffix(".json")
    meta = {}
    if sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint sidecar {str(sidecar)!r} is not valid JSON ({exc}); delete it "
                                  f"and the checkpoint and retrain") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a weights-only state dict "
                              f"({type(exc).__name__}: {str(exc)[:200]}); delete it and retrain") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a state dict of tensors")
    model = build_model(model_name, num_classes, in_channels, width)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        saved = f"{meta.get('model')} (width {meta.get('width')}, {meta.get('in_channels')} input channels, " \
                f"{meta.get('num_classes')} classes)" if meta else "unknown (no sidecar)"
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match model {model_name!r} (width {width}, {in_channels} input "
            f"channels, {num_classes} classes); it was saved for {saved}. First difference: "
            f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)[:200]}"
        ) from exc
    return model.eval(), meta


def get_pretrained(
    model_name: str = "resnet18",
    dataset: str = "fashion-mnist",
    data_dir=None,
    width: float = 1.0,
    split_seed: int = 0,
    recipe: Recipe = Recipe(),
    checkpoint: str | os.PathLike | None = None,
    train_if_missing: bool = True,
    data: DatasetSplits | None = None,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> tuple[nn.Module, dict]:
    """Return a pretrained model and its metadata: the cache, else the checkpoint shipped with the package (the
    default ResNet-18 on Fashion-MNIST, checked against its sha256), else trained on ``device`` and cached.

    ``checkpoint`` loads a given file instead of the cache. With ``train_if_missing=False`` a missing checkpoint
    raises ``CheckpointError`` with the exact command that creates it.
    """
    if data is None:
        data = load_dataset(dataset, data_dir, split_seed=split_seed)
    if checkpoint is not None:
        return load_checkpoint(checkpoint, model_name, data.num_classes, data.in_channels, width)
    path = checkpoint_path(model_name, dataset, width, split_seed, recipe)
    if not path.exists():
        install_shipped(path)
    if path.exists():
        model, meta = load_checkpoint(path, model_name, data.num_classes, data.in_channels, width)
        if meta.get("data_fingerprint") not in (None, data.fingerprint):
            raise CheckpointError(f"checkpoint {str(path)!r} was trained on different data (fingerprint "
                                  f"{meta.get('data_fingerprint')} != {data.fingerprint}); delete it and retrain")
        return model, meta
    if not train_if_missing:
        raise CheckpointError(f"no cached checkpoint for {model_name} on {dataset} at {str(path)!r}; "
                              "create it with "
                              f"`{pretrain_command(model_name, dataset, width, data_dir, recipe, split_seed)}`")
    print(f"training {model_name} on {dataset} (cached at {path}) ...", file=sys.stderr)
    model, meta = train(model_name, data, width, recipe, path, progress, device)
    save_checkpoint(model, meta, path)
    return model, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--force", action="store_true", help="retrain even if a checkpoint is cached")
    p.add_argument("--ship", action="store_true",
                   help="also write the half-precision copy shipped in envs/checkpoints/ (maintainers)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    path = checkpoint_path(args.model, args.dataset, args.width, args.split_seed, recipe)
    t0 = time.perf_counter()
    data = load_dataset(args.dataset, args.data_dir, split_seed=args.split_seed)
    if args.force:
        _, meta = train(args.model, data, args.width, recipe, path, device=args.device)
        save_checkpoint(_, meta, path)
    else:
        _, meta = get_pretrained(args.model, args.dataset, args.data_dir, args.width, args.split_seed, recipe,
                                 data=data, device=args.device)
    if args.ship:
        print(f"shipped: {ship_checkpoint(path, data, args.device)}", file=sys.stderr)
    print(json.dumps({"checkpoint": str(path), "test_accuracy": meta["test_accuracy"],
                      "train_seconds": meta["train_seconds"], "wall_seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
