"""Datasets, preloaded as tensors, with seeded train / reward / calibration / test splits.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
CIFAR-10 and ImageNet-style folders come from a local directory the user gives. Everything goes through
torchvision's dataset classes with ``download=False``: nothing is ever fetched at run time.

Splits (indices into the official training set, from one seeded permutation):

* ``reward``: the first ``reward_size`` images of the permutation (default 2,000), held out from pretraining;
  the environment's accuracy is measured here.
* ``calib``: ``calib_size`` images from a second reserved slice (default 512), used for BN recalibration and
  for importance statistics.
* ``train``: everything after the reserved slice (``HOLDOUT`` images), so the pretrained checkpoint does not
  depend on the reward / calibration sizes the user picks, only on the split seed.
* ``test``: the official test set, used only for final reporting.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .paths import atomic_copy, cache_dir

FASHION_MNIST_ENV = "CHANNELPRUNE_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
# Reserved slice of the permuted training set: [0, REWARD_MAX) reward pool, [REWARD_MAX, HOLDOUT) calibration pool.
REWARD_MAX = 4000
HOLDOUT = 5000
_FMNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetMissingError(FileNotFoundError):
    """A dataset is not where we looked; the message names what is missing and the command that fixes it."""


@dataclass
class Split:
    """Normalized images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def part(self, start: int, stop: int | None = None) -> "Split":
        """Images ``start:stop`` (views, no copy)."""
        idx = self.indices[start:stop] if self.indices is not None else None
        return Split(self.x[start:stop], self.y[start:stop], idx)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]


@dataclass
class DatasetSplits:
    name: str
    train: Split
    reward: Split
    calib: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split_seed: int
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.image_size, self.image_size)


def _fashion_mnist_root(data_dir: str | os.PathLike | None) -> Path:
    """Return a torchvision-style root (``<root>/FashionMNIST/raw/*-ubyte``) built from the Debian files."""
    src = Path(data_dir or os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEFAULT))
    if not src.is_dir():
        raise DatasetMissingError(
            f"Fashion-MNIST directory {str(src)!r} does not exist (data_dir={data_dir!r}, "
            f"${FASHION_MNIST_ENV}={os.environ.get(FASHION_MNIST_ENV)!r}). Fix: `sudo apt-get install -y "
            f"dataset-fashion-mnist` (or `make setup`), or pass data_dir= a directory holding "
            f"{_FMNIST_FILES[0]}.gz"
        )
    root = cache_dir() / "data" / ("fashion-mnist-" + hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:8])
    raw = root / "FashionMNIST" / "raw"
    for name in _FMNIST_FILES:
        dst = raw / name
        if dst.exists():
            continue
        if (src / name).exists():
            atomic_copy(src / name, dst)
        elif (src / f"{name}.gz").exists():
            atomic_copy(src / f"{name}.gz", dst, opener=gzip.open)
        else:
            raise DatasetMissingError(
                f"Fashion-MNIST file {name}(.gz) is missing from {str(src)!r}. Fix: `sudo apt-get install -y "
                "dataset-fashion-mnist` (or `make setup`), or pass data_dir= a directory with the four idx files."
            )
    return root


def _to_float(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = images.float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous()


def _load_raw(name: str, data_dir, image_size: int | None, max_images: int | None):
    """Return (train_uint8 NCHW, train_y, test_uint8, test_y, num_classes)."""
    import torchvision

    if name == "fashion-mnist":
        root = _fashion_mnist_root(data_dir)
        tr = torchvision.datasets.FashionMNIST(str(root), train=True, download=False)
        te = torchvision.datasets.FashionMNIST(str(root), train=False, download=False)
        return tr.data.unsqueeze(1), tr.targets.long(), te.data.unsqueeze(1), te.targets.long(), 10
    if name == "cifar10":
        if data_dir is None:
            raise ValueError(
                "dataset='cifar10' needs data_dir=<directory holding cifar-10-batches-py>; it is never downloaded"
            )
        path = Path(data_dir)
        if not (path / "cifar-10-batches-py").is_dir():
            raise DatasetMissingError(
                f"CIFAR-10 not found: {str(path / 'cifar-10-batches-py')!r} does not exist. Fix: extract "
                "cifar-10-python.tar.gz into that directory (`tar xzf cifar-10-python.tar.gz -C DATA_DIR`)."
            )
        tr = torchvision.datasets.CIFAR10(str(path), train=True, download=False)
        te = torchvision.datasets.CIFAR10(str(path), train=False, download=False)

        def conv(a):
            return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()

        return conv(tr.data), torch.tensor(tr.targets), conv(te.data), torch.tensor(te.targets), 10
    if name == "imagefolder":
        if data_dir is None:
            raise ValueError("dataset='imagefolder' needs data_dir=<root with train/ and val/ class folders>")
        path = Path(data_dir)
        for sub in ("train", "val"):
            if not (path / sub).is_dir():
                raise DatasetMissingError(
                    f"ImageFolder split {str(path / sub)!r} does not exist; expected {path}/train/<class>/*.jpg "
                    f"and {path}/val/<class>/*.jpg"
                )
        size = image_size or 224
        tf = torchvision.transforms.Compose(
            [
                torchvision.transforms.Resize(int(size * 1.14)),
                torchvision.transforms.CenterCrop(size),
                torchvision.transforms.PILToTensor(),
            ]
        )

        def load(sub):
            ds = torchvision.datasets.ImageFolder(str(path / sub), transform=tf)
            n = len(ds) if max_images is None else min(len(ds), max_images)
            rng = np.random.default_rng(0)
            idx = np.sort(rng.permutation(len(ds))[:n]) if n < len(ds) else np.arange(n)
            xs, ys = zip(*(ds[int(i)] for i in idx))
            return torch.stack(xs), torch.tensor(ys), len(ds.classes)

        trx, try_, nc = load("train")
        tex, tey, _ = load("val")
        return trx, try_, tex, tey, nc
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


_CACHE: dict = {}


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | os.PathLike | None = None,
    reward_size: int = 2000,
    calib_size: int = 512,
    split_seed: int = 0,
    test_size: int | None = None,
    image_size: int | None = None,
    max_images: int | None = None,
) -> DatasetSplits:
    """Load a dataset as preloaded, normalized tensors with seeded, disjoint splits.

    Args:
        name: one of ``fashion-mnist`` (default, Debian package), ``cifar10`` (local dir), ``imagefolder``.
        data_dir: overrides where the dataset lives (Fashion-MNIST: also ``$CHANNELPRUNE_FASHION_MNIST_DIR``).
        reward_size: images in the held-out reward split (1..4000).
        calib_size: images in the calibration split (1..1000).
        split_seed: seed of the permutation that carves reward / calibration out of the training set.
        test_size: use only the first ``test_size`` test images (None: all; a quicker, noisier test accuracy,
            e.g. the CPU demo's).
        image_size / max_images: ImageFolder only (resize / cap on preloaded images).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if not 1 <= int(reward_size) <= REWARD_MAX:
        raise ValueError(f"reward_size={reward_size!r} must be in [1, {REWARD_MAX}]")
    if not 1 <= int(calib_size) <= HOLDOUT - REWARD_MAX:
        raise ValueError(f"calib_size={calib_size!r} must be in [1, {HOLDOUT - REWARD_MAX}]")
    if test_size is not None and not (isinstance(test_size, int) and test_size >= 1):
        raise ValueError(f"test_size={test_size!r} must be None (the whole test split) or a positive integer")
    key = (name, str(data_dir), int(reward_size), int(calib_size), int(split_seed), test_size, image_size,
           max_images)
    if key in _CACHE:
        return _CACHE[key]
    trx, try_, tex, tey, num_classes = _load_raw(name, data_dir, image_size, max_images)
    if trx.shape[0] <= HOLDOUT:
        raise ValueError(f"dataset {name!r} has {trx.shape[0]} training images; need more than {HOLDOUT}")
    mean, std = (
        _STATS[name] if trx.shape[1] == len(_STATS[name][0]) else ((0.5,) * trx.shape[1], (0.25,) * trx.shape[1])
    )
    perm = np.random.default_rng(split_seed).permutation(trx.shape[0])
    idx_reward = perm[:reward_size]
    idx_calib = perm[REWARD_MAX : REWARD_MAX + calib_size]
    idx_train = np.sort(perm[HOLDOUT:])
    # The fingerprint identifies the training data only (a checkpoint does not depend on test_size).
    h = hashlib.sha1()
    h.update(f"{name}|{trx.shape}|{tex.shape}|{split_seed}".encode())
    h.update(trx[idx_train[:256]].numpy().tobytes())
    h.update(try_[idx_train].numpy().tobytes())
    if test_size is not None:
        tex, tey = tex[:test_size], tey[:test_size]
    splits = DatasetSplits(
        name=name,
        train=Split(_to_float(trx[idx_train], mean, std), try_[idx_train].clone(), idx_train),
        reward=Split(_to_float(trx[idx_reward], mean, std), try_[idx_reward].clone(), idx_reward),
        calib=Split(_to_float(trx[idx_calib], mean, std), try_[idx_calib].clone(), idx_calib),
        test=Split(_to_float(tex, mean, std), tey.clone()),
        num_classes=num_classes,
        mean=tuple(mean),
        std=tuple(std),
        split_seed=split_seed,
        fingerprint=h.hexdigest()[:16],
    )
    _CACHE.clear()  # keep at most one dataset resident
    _CACHE[key] = splits
    return splits
