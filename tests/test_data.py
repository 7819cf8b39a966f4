"""envs.data.load_dataset: sizes, shapes, labels, disjoint seeded splits and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs import data as data_mod
from envs.data import HOLDOUT, REWARD_MAX, DatasetMissingError, load_dataset

N_TRAIN_OFFICIAL = 60_000
N_TEST = 10_000


def test_sizes_and_shapes(fmnist):
    d = fmnist
    assert d.name == "fashion-mnist"
    assert d.num_classes == 10
    assert d.in_channels == 1 and d.image_size == 28
    assert len(d.train) == 55_000 == N_TRAIN_OFFICIAL - HOLDOUT
    assert len(d.reward) == 2000
    assert len(d.calib) == 512
    assert len(d.test) == N_TEST
    for split in (d.train, d.reward, d.calib, d.test):
        assert split.x.shape == (len(split), 1, 28, 28)
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.y.shape == (len(split),)
        assert int(split.y.min()) >= 0 and int(split.y.max()) <= 9
    assert d.example_input(2).shape == (2, 1, 28, 28)


def test_label_balance(fmnist):
    # The official test set has exactly 1,000 images per class; the training split is close to balanced.
    assert torch.bincount(fmnist.test.y, minlength=10).tolist() == [1000] * 10
    counts = torch.bincount(fmnist.train.y, minlength=10)
    assert int(counts.sum()) == 55_000
    assert int(counts.min()) > 5000 and int(counts.max()) < 6000


def test_normalized(fmnist):
    x = fmnist.train.x
    assert abs(float(x.mean())) < 0.05
    assert abs(float(x.std()) - 1.0) < 0.05


def test_indices_disjoint_and_cover_training_set(fmnist):
    d = fmnist
    tr, rw, ca = (set(s.indices.tolist()) for s in (d.train, d.reward, d.calib))
    assert len(tr) == len(d.train) and len(rw) == len(d.reward) and len(ca) == len(d.calib)  # no duplicates
    assert not tr & rw and not tr & ca and not rw & ca
    union = tr | rw | ca
    assert min(union) >= 0 and max(union) < N_TRAIN_OFFICIAL
    # train + the whole reserved slice (reward pool, calibration pool, unused rest) is the full training set.
    assert len(tr) + HOLDOUT == N_TRAIN_OFFICIAL
    assert len(set(range(N_TRAIN_OFFICIAL)) - tr) == HOLDOUT
    # The reward / calib pools come from the permutation's reserved prefix, train is everything after it.
    perm = np.random.default_rng(d.split_seed).permutation(N_TRAIN_OFFICIAL)
    np.testing.assert_array_equal(d.reward.indices, perm[: len(d.reward)])
    np.testing.assert_array_equal(d.calib.indices, perm[REWARD_MAX : REWARD_MAX + len(d.calib)])
    np.testing.assert_array_equal(d.train.indices, np.sort(perm[HOLDOUT:]))


def test_same_seed_same_split_and_train_independent_of_reward_size(fmnist, load):
    # A different cache key (reward_size, test_size) with the same split seed: recomputed, not a cache hit.
    d = load(reward_size=1000, calib_size=256, test_size=100)
    assert d is not fmnist
    np.testing.assert_array_equal(d.train.indices, fmnist.train.indices)
    assert torch.equal(d.train.x, fmnist.train.x) and torch.equal(d.train.y, fmnist.train.y)
    np.testing.assert_array_equal(d.reward.indices, fmnist.reward.indices[:1000])
    np.testing.assert_array_equal(d.calib.indices, fmnist.calib.indices[:256])
    assert torch.equal(d.reward.x, fmnist.reward.x[:1000])
    assert len(d.test) == 100 and torch.equal(d.test.x, fmnist.test.x[:100])
    # The pretrained checkpoint's data fingerprint depends on the training data only.
    assert d.fingerprint == fmnist.fingerprint


def test_different_seed_different_split(fmnist, load):
    d = load(split_seed=1)
    assert load(split_seed=1) is d  # the module cache holds the last dataset
    assert len(data_mod._CACHE) == 1
    assert d.split_seed == 1
    assert len(d.train) == 55_000 and len(d.reward) == 2000 and len(d.calib) == 512
    assert not np.array_equal(d.reward.indices, fmnist.reward.indices)
    assert not np.array_equal(d.train.indices, fmnist.train.indices)
    # Reward images of seed 1 mostly fall into seed 0's training split.
    assert len(set(d.reward.indices.tolist()) & set(fmnist.train.indices.tolist())) > 1500
    assert d.fingerprint != fmnist.fingerprint
    assert torch.equal(d.test.y, fmnist.test.y)  # the test set does not depend on the seed


def test_unknown_dataset():
    with pytest.raises(ValueError) as exc:
        load_dataset("mnist-nope")
    msg = str(exc.value)
    assert "mnist-nope" in msg
    for known in data_mod.DATASETS:
        assert known in msg


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetMissingError) as exc:
        load_dataset("fashion-mnist", data_dir=missing)
    msg = str(exc.value)
    assert str(missing) in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_data_dir_without_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetMissingError) as exc:
        load_dataset("fashion-mnist", data_dir=empty)
    msg = str(exc.value)
    assert str(empty) in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_data_dir_env_var(tmp_path, monkeypatch):
    missing = tmp_path / "env-nope"
    monkeypatch.setenv(data_mod.FASHION_MNIST_ENV, str(missing))
    with pytest.raises(DatasetMissingError, match="env-nope"):
        load_dataset("fashion-mnist", reward_size=7)


@pytest.mark.parametrize("reward_size", [0, -1, REWARD_MAX + 1, 100_000])
def test_reward_size_out_of_range(reward_size):
    with pytest.raises(ValueError, match="reward_size"):
        load_dataset("fashion-mnist", reward_size=reward_size)


@pytest.mark.parametrize("calib_size", [0, HOLDOUT - REWARD_MAX + 1])
def test_calib_size_out_of_range(calib_size):
    with pytest.raises(ValueError, match="calib_size"):
        load_dataset("fashion-mnist", calib_size=calib_size)


def test_cifar10_needs_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("cifar10")
    with pytest.raises(DatasetMissingError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_batches(fmnist):
    batches = list(fmnist.calib.batches(200))
    assert [len(y) for _, y in batches] == [200, 200, 112]
    assert torch.equal(torch.cat([x for x, _ in batches]), fmnist.calib.x)


def _load_in_fresh_cache(cache: str) -> int:
    import os

    os.environ["CHANNELPRUNE_CACHE"] = cache
    return len(load_dataset("fashion-mnist", reward_size=10, calib_size=10, test_size=10).test)


def test_processes_unpacking_into_one_cache_at_once_all_succeed(tmp_path):
    # --n-envs workers, Ray tasks and parallel runs unpack the Debian files into the same cache on first use; each
    # writes its own temporary file (a shared ".tmp" name made one process's rename fail on the other's file).
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(3) as pool:
        assert pool.map(_load_in_fresh_cache, [str(tmp_path)] * 3) == [10] * 3
    raw = next(tmp_path.glob("data/fashion-mnist-*/FashionMNIST/raw"))
    assert len([p for p in raw.iterdir() if p.name.endswith("-ubyte")]) == 4 == len(list(raw.iterdir()))
