"""Shared fixtures: every test gets its own empty cache directory; Fashion-MNIST is loaded once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from envs.data import load_dataset
from envs.machine import MACHINE_CACHE_ENV
from envs.paths import CACHE_ENV

# The test models are tiny: one thread is faster than two, and far faster when another process (a pretraining
# run) is using the cores, where OpenMP threads contend.
torch.set_num_threads(1)

# The machine probe (envs.machine) is a fact about this CPU: one answer for the whole session, shared with the
# subprocesses tests start (vector-env workers, crash tests), instead of one probe per per-test cache.
os.environ.setdefault(MACHINE_CACHE_ENV, tempfile.mkdtemp(prefix="channelprune-machine-"))


def masked_forward(graph, model, keep, x):
    """``model(x)`` with every dropped channel zeroed by the graph's mask hooks (removed afterwards)."""
    hooks = graph.mask_hooks(model, graph.masks(keep))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Point ``$CHANNELPRUNE_CACHE`` at a fresh per-test directory so no test touches ``~/.cache/channelprune``."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A session-wide cache for the unpacked idx files (unpacking them again per test would cost seconds)."""
    return _session_dir(tmp_path_factory, "data-cache")


def _session_dir(tmp_path_factory, name: str):
    """A fresh session directory, or ``$CHANNELPRUNE_TEST_CACHE/<name>`` kept across sessions when that is set (a
    developer's faster reruns: the tiny checkpoint is then trained once, not per session; CI leaves it unset)."""
    keep = os.environ.get("CHANNELPRUNE_TEST_CACHE")
    if keep:
        path = Path(keep) / name
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp(name)


@pytest.fixture
def load(data_cache, monkeypatch):
    """``load_dataset`` with the session-wide data cache (the per-test cache is restored afterwards)."""

    def _load(*args, **kwargs):
        with monkeypatch.context() as mp:
            mp.setenv(CACHE_ENV, str(data_cache))
            return load_dataset(*args, **kwargs)

    return _load


@pytest.fixture(scope="session")
def fmnist(data_cache):
    """The default Fashion-MNIST splits (split_seed 0, reward 2000, calib 512), loaded once (~2 s)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(data_cache))
        return load_dataset()


# ---------------------------------------------------------------------------------------------- tiny env
TINY_MODEL = dict(model="resnet20", width=0.5)
TINY_RECIPE = dict(pretrain_epochs=2, pretrain_max_train=12000)


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory, data_cache):
    """A small pretrained ResNet-20 (width 0.5, ~79% test accuracy) with small splits, built once per session.

    Returns ``(checkpoint path, DatasetSplits)``; the importance predictors are cached next to the checkpoint.
    """
    from envs.channel_prune import ChannelPruneEnv

    cache = _session_dir(tmp_path_factory, "tiny-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(data_cache))
        data = load_dataset(reward_size=500, calib_size=256)
        mp.setenv(CACHE_ENV, str(cache))
        env = ChannelPruneEnv(**TINY_MODEL, **TINY_RECIPE, data=data, progress=False)
    return str(env.problem.checkpoint_file), data


@pytest.fixture
def make_env(tiny_setup):
    """``make_env(**overrides)`` -> a ChannelPruneEnv on the tiny model (budget 0.5, FLOPs, static by default)."""
    from envs.channel_prune import ChannelPruneEnv

    ckpt, data = tiny_setup

    def _make(**overrides):
        kwargs = dict(**TINY_MODEL, checkpoint=ckpt, data=data, progress=False)
        kwargs.update(overrides)
        return ChannelPruneEnv(**kwargs)

    return _make


@pytest.fixture
def tiny_gym_kwargs(tiny_setup):
    """kwargs for ``gym.make("ChannelPrune-ResNet20-v0", **kwargs)`` on the tiny model."""
    ckpt, data = tiny_setup
    return dict(width=0.5, checkpoint=ckpt, data=data, progress=False)


def assert_plan_follows(baseline, statistic) -> dict:
    """Check a baseline's *plan*, not the env's budget wall (which holds whatever the plan): played through its
    eval env, nothing is clamped and the applied channel counts are the plan's; and the plan is ``statistic``
    (clipped to [min_keep, 1]) times one common scale, entries clipped at min_keep or 1 aside. Returns the info."""
    import numpy as np

    from envs.episodes import run_episode

    env = baseline.setup().eval_env
    info = run_episode(env, baseline)[1]
    assert info["clamp_total"] == 0.0
    assert info["kept_counts"] == env.cost.plan_counts(baseline.ratios)[0]
    r = np.asarray(baseline.ratios, dtype=np.float64)
    stat = np.clip(np.asarray(statistic, dtype=np.float64), env.min_keep, 1.0)
    free = (r > env.min_keep + 1e-9) & (r < 1.0 - 1e-9)
    assert free.sum() >= 2, "too few unclipped groups for the common-scale check to mean anything"
    scale = r[free] / stat[free]
    np.testing.assert_allclose(scale, scale[0], rtol=1e-9)
    return info
