"""ChannelPruneEnv: the Gymnasium / SB3 API contract, pickling and vectorization, determinism, the base model is
never modified, the budget wall, bad input, rendering and user models."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch import nn

import envs
import envs.latency
from envs.channel_prune import ChannelPruneEnv
from envs.cost import count_macs, count_params
from envs.data import DatasetSplits, Split
from envs.machine import backend

# ---------------------------------------------------------------------------------------------------- helpers


def _cut(split: Split, n: int) -> Split:
    return Split(split.x[:n], split.y[:n], None if split.indices is None else split.indices[:n])


def small_splits(data: DatasetSplits, train: int = 512, other: int = 64) -> DatasetSplits:
    """A copy of ``data`` with every split cut down (the fixture's object itself is shared and never mutated)."""
    return dataclasses.replace(data, train=_cut(data.train, train), reward=_cut(data.reward, other),
                               calib=_cut(data.calib, other), test=_cut(data.test, other))


def shrink_eval(env: ChannelPruneEnv, reward: int = 32, calib: int = 32) -> ChannelPruneEnv:
    """Evaluate episodes on a few images: give ``env`` its own DatasetSplits with short reward / calib splits."""
    env.problem.data = dataclasses.replace(env.data, reward=_cut(env.data.reward, reward),
                                   calib=_cut(env.data.calib, calib))
    return env


def skip_evaluation(monkeypatch, env: ChannelPruneEnv) -> None:
    """Budget tests only read the costs in the final info (computed from the kept counts, not from the pruned net,
    whose exact costs ``test_groups`` checks): skip building and evaluating the pruned network."""
    monkeypatch.setattr(env.problem, "build_pruned", lambda *a, **k: nn.Identity())
    monkeypatch.setattr(env.problem, "recalibrate_bn", lambda model: None)
    monkeypatch.setattr(env.problem, "evaluate_on", lambda model, data: (0.0, 0.0))


def run_episode(env, actions=None, seed: int = 0):
    """One episode; ``actions`` (a list) or seeded ``action_space`` samples. Returns [(obs, reward, info)], the
    reset observation first (reward None)."""
    obs, info = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = [(obs, None, info)]
    t = 0
    while True:
        a = env.action_space.sample() if actions is None else actions[t]
        obs, reward, terminated, truncated, info = env.step(a)
        out.append((obs, reward, info))
        t += 1
        if terminated or truncated:
            return out


def assert_same_trajectory(a, b) -> None:
    assert len(a) == len(b)
    for (oa, ra, ia), (ob, rb, ib) in zip(a, b):
        np.testing.assert_array_equal(oa, ob)
        assert ra == rb
        # eval_seconds is wall-clock time, the only field that may differ
        ia = {k: v for k, v in ia.items() if k != "eval_seconds"}
        ib = {k: v for k, v in ib.items() if k != "eval_seconds"}
        assert ia == ib


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"base model tensor {k} changed"


def run_checkers(make, render: bool = True) -> tuple[gym.Env, list[str]]:
    """Build an env with ``make()`` and run Gymnasium's and SB3's env checkers on it; returns the env and every
    warning raised on the way (construction included: the registered ids' PassiveEnvChecker checks there).
    Gymnasium's render check re-makes the env from its spec in every render mode, so it needs an env from
    ``gym.make`` (``render=False`` otherwise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = make()
        gym_check_env(env.unwrapped, skip_render_check=not render)
        sb3_check_env(env.unwrapped)
        sb3_check_env(env)  # through the registered wrappers (TimeLimit, OrderEnforcing, PassiveEnvChecker)
    return env, [f"{w.category.__name__}: {w.message}" for w in caught]


# ---------------------------------------------------------------------------------------------------- API checks


@pytest.mark.parametrize("mode", ["static", "runtime"])
def test_env_checkers_pass_without_warnings(tiny_gym_kwargs, mode):
    # With a spec, Gymnasium's checker also re-makes the env in every render mode and renders it.
    env, caught = run_checkers(lambda: gym.make("ChannelPrune-ResNet20-v0", mode=mode, **tiny_gym_kwargs))
    assert caught == []
    assert env.observation_space.contains(run_episode(shrink_eval(env.unwrapped))[-1][0])


@pytest.mark.parametrize("env_id", [
    "ChannelPrune-ResNet18-v0",
    "ChannelPrune-VGG16-v0",
    "ChannelPrune-ResNet56-v0",
    "ChannelPrune-MobileNetV2-v0",
])
def test_every_registered_id_passes_checkers(tiny_setup, env_id):
    # A width-0.25 checkpoint trained for one epoch on 512 images (seconds) and cut-down splits: the checks are
    # about the API, not the accuracy.
    data = small_splits(tiny_setup[1])
    kwargs = dict(width=0.25, pretrain_epochs=1, pretrain_max_train=512, data=data, progress=False)
    for mode in ("static", "runtime"):
        env, caught = run_checkers(lambda mode=mode: gym.make(env_id, mode=mode, **kwargs))
        assert caught == []
        u = env.unwrapped
        assert u.problem.model_name == envs.ENV_IDS[env_id]["model"]
        steps = run_episode(env)
        info = steps[-1][2]
        assert len(steps) - 1 == u.n_groups and env.spec.max_episode_steps is None
        assert info["flops_ratio"] <= 0.5 + 1e-9 and info["effective_flops_ratio"] <= 0.5 + 1e-9
        # the network the info describes: its measured MACs (runtime: the sparse executor, whose logits equal the
        # dense masked execution's) are the reported ones
        kept = info["kept_counts"]
        rt = [round(r * k) for r, k in zip(info["runtime_ratios"], kept)]
        x = u.data.reward.x[:8]
        sparse = u.build_pruned(kept, rt, sparse=True)
        assert count_macs(sparse, x) / count_macs(u.base_model, x) == pytest.approx(info["effective_flops_ratio"],
                                                                                      abs=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), u.build_pruned(kept, rt)(x), rtol=1e-4, atol=1e-5)


def test_generic_id_runs_a_longer_model_to_the_end_and_old_names_still_resolve(tiny_setup):
    # ChannelPrune-v0 takes any model; ResNet-56 has 30 groups, more than the default ResNet-18's 12: the episode
    # is never truncated (no TimeLimit), it terminates after the last group with the final reward.
    data = small_splits(tiny_setup[1])
    kwargs = dict(width=0.25, pretrain_epochs=1, pretrain_max_train=512, data=data, importance_samples=2,
                  progress=False, scorer="l1")
    env = gym.make("ChannelPrune-v0", model="resnet56", **kwargs)
    steps = run_episode(env)
    assert len(steps) - 1 == env.unwrapped.n_groups == 30
    _, reward, info = steps[-1]
    assert reward == info["accuracy"] > 0 and "TimeLimit" not in str(env)
    with pytest.warns(UserWarning, match="latest versioned"):  # Gymnasium's alias: the unversioned name -> v0
        old = gym.make("ChannelPrune-ResNet56", **kwargs)
    assert old.spec.id == "ChannelPrune-ResNet56-v0" and old.unwrapped.n_groups == 30
    assert envs.resolve_env_id("ChannelPrune-ResNet56") == "ChannelPrune-ResNet56-v0"
    with pytest.raises(ValueError, match="ChannelPrune-v0"):
        envs.resolve_env_id("CartPole-v1")


def test_resnet20_checkers_with_every_reward_and_penalty_mode(tiny_gym_kwargs):
    # (internal_only changes the groups, hence the learned predictor's cache key: the L1 scorer avoids a refit)
    for kwargs in (dict(reward="acc_flops"), dict(reward="relative_ce"), dict(budget_mode="penalty"),
                   dict(budget_mode="fill"),
                   dict(target="params"), dict(internal_only=True, scorer="l1"),
                   dict(mode="runtime", storage_budget=0.6)):
        env, caught = run_checkers(lambda kw=kwargs: gym.make("ChannelPrune-ResNet20-v0", **tiny_gym_kwargs, **kw),
                                   render=False)
        assert caught == [], kwargs


# ---------------------------------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("mode", ["static", "runtime"])
def test_pickle_roundtrip_reproduces_episode(make_env, mode):
    env = make_env(mode=mode)
    env2 = pickle.loads(pickle.dumps(env))
    assert isinstance(env2, ChannelPruneEnv) and env2.mode == mode and env2.n_groups == env.n_groups
    assert_state_equal(env2.base_model, state_snapshot(env.base_model))
    a = run_episode(shrink_eval(env), seed=3)
    b = run_episode(shrink_eval(env2), seed=3)
    assert_same_trajectory(a, b)


def test_pickle_mid_episode_restarts_cleanly(make_env):
    env = make_env()
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env2 = pickle.loads(pickle.dumps(env))
    with pytest.raises(RuntimeError, match="reset"):
        env2.step(env2.action_space.sample())
    assert_same_trajectory(run_episode(shrink_eval(env2)), run_episode(shrink_eval(make_env())))


@pytest.mark.parametrize("vectorization_mode", ["sync", "async"])
def test_make_vec_runs_episodes(tiny_gym_kwargs, vectorization_mode):
    # a forked worker cannot use CUDA once the parent has: with a GPU, async workers are spawned
    spawn = vectorization_mode == "async" and torch.cuda.is_available()
    venv = gym.make_vec("ChannelPrune-ResNet20-v0", num_envs=2, vectorization_mode=vectorization_mode,
                        vector_kwargs={"context": "spawn"} if spawn else None, **tiny_gym_kwargs)
    try:
        obs, _ = venv.reset(seed=0)
        assert obs.shape == (2, 23) and obs.dtype == np.float32
        venv.action_space.seed(0)
        n = venv.get_attr("n_groups")[0]
        for t in range(n):
            obs, reward, terminated, truncated, info = venv.step(venv.action_space.sample())
            assert obs.shape == (2, 23)
            if t < n - 1:
                assert not terminated.any() and np.all(reward == 0)
        assert terminated.all()
        assert np.all((reward > 0) & (reward <= 1))  # accuracy on the reward split
        assert np.all(info["flops_ratio"] <= 0.5 + 1e-9)
    finally:
        venv.close()


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", ["static", "runtime"])
def test_same_seed_same_trajectory(make_env, mode):
    env_a, env_b = shrink_eval(make_env(mode=mode)), shrink_eval(make_env(mode=mode))
    first = run_episode(env_a, seed=7)
    assert_same_trajectory(first, run_episode(env_b, seed=7))
    run_episode(env_a, seed=8)  # another episode in between changes nothing
    assert_same_trajectory(first, run_episode(env_a, seed=7))
    other = run_episode(env_a, seed=9)  # other actions: another trajectory (the comparison is not vacuous)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(first, other))


def test_base_model_bit_identical_after_many_episodes(make_env):
    calls = []

    def meddling_compensation(graph, base_model, pruned, keep_idx):
        # a compensation step may rewrite the pruned copy in place; the base model must not be affected
        calls.append(len(keep_idx))
        with torch.no_grad():
            for p in pruned.parameters():
                p.mul_(1.001)

    for kwargs, episodes in ((dict(), 20), (dict(mode="runtime"), 20),
                             (dict(compensate=None, mode="runtime", reward="relative_ce"), 8),
                             (dict(compensate=meddling_compensation), 8)):
        env = shrink_eval(make_env(**kwargs), reward=16, calib=16)
        snap = state_snapshot(env.base_model)
        for ep in range(episodes):
            run_episode(env, seed=ep)
        assert_state_equal(env.base_model, snap)
        assert not env.base_model.training
        assert all(p.grad is None for p in env.base_model.parameters())
    assert len(calls) == 8


# ---------------------------------------------------------------------------------------------------- budget wall

BUDGET_CASES = [
    dict(target="flops", budget=0.3, round_to=1),
    dict(target="flops", budget=0.5, round_to=4),
    dict(target="flops", budget=0.3, round_to=4, min_keep=0.2),
    dict(target="params", budget=0.3, round_to=1),
    dict(target="params", budget=0.5, round_to=4),
    dict(target="flops", budget=0.3, internal_only=True, scorer="l1"),
    dict(mode="runtime", budget=0.3, round_to=1),
    dict(mode="runtime", budget=0.5, round_to=4),
    dict(mode="runtime", budget=0.25, round_to=4),  # the runtime wall shrinks static counts: on the round_to grid
    dict(mode="runtime", budget=0.4, storage_budget=0.5),
]
RATIO_KEY = {"flops": "flops_ratio", "params": "params_ratio", "latency": "latency_ratio"}


@pytest.mark.parametrize("kwargs", BUDGET_CASES, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_wall_never_exceeds_budget(make_env, monkeypatch, kwargs):
    env = make_env(**kwargs)
    skip_evaluation(monkeypatch, env)
    runtime = env.mode == "runtime"
    key = "effective_flops_ratio" if runtime else RATIO_KEY[env.target]
    worst, spent = 0.0, []
    for ep in range(100):
        info = run_episode(env, seed=ep)[-1][2]
        worst = max(worst, info[key])
        spent.append(info[key])
        if runtime:
            assert info["effective_flops_ratio"] <= info["flops_ratio"] + 1e-12
            if env.storage_budget < 1:
                assert info["params_ratio"] <= env.storage_budget + 1e-9
        assert all(k % env.round_to == 0 or k == g.num_channels for k, g in zip(info["kept_counts"], env.groups))
    assert worst <= env.budget * (1 + 1e-9)
    assert max(spent) > 0.8 * env.budget  # random actions do reach the wall: the test is not vacuous


def _latency_episodes(env, monkeypatch, budget: float, episodes: int = 30) -> float:
    skip_evaluation(monkeypatch, env)
    full = env.cost.latency_table.predict(env.cost.k_full)
    worst = 0.0
    for ep in range(episodes):
        info = run_episode(env, seed=ep)[-1][2]
        assert info["latency_ratio"] == pytest.approx(env.cost.latency_table.predict(info["kept_counts"]) / full)
        worst = max(worst, info["latency_ratio"])
    assert worst <= budget * (1 + 1e-9)
    return worst


@pytest.mark.parametrize("budget,round_to", [(0.3, 1), (0.5, 4)])
def test_wall_never_exceeds_latency_budget(make_env, monkeypatch, budget, round_to):
    # The wall is tested on a deterministic look-up table: every timing is replaced by a fixed overhead plus a time
    # per MAC, so the table (grid, interpolation, monotone fill) is exercised without timing noise.
    def fake_latency(model, input_shape, batch_size=1, threads=None, repeats=20, warmup=3, device="cpu"):
        return 2e-5 + 1e-9 * batch_size * count_macs(model, torch.zeros(1, *input_shape))

    monkeypatch.setattr(envs.latency, "measure_latency", fake_latency)
    env = make_env(target="latency", budget=budget, round_to=round_to)
    assert _latency_episodes(env, monkeypatch, budget) > 0.8 * budget


def test_wall_never_exceeds_measured_latency_budget(make_env, monkeypatch):
    # Real timings. At batch 1 a tiny net's latency is mostly per-layer overhead (the table cannot go below ~90%),
    # so the table is measured at batch 64, where convolutions dominate (every group at min_keep: ~40%).
    _latency_episodes(make_env(target="latency", budget=0.6, latency_batch=64), monkeypatch, 0.6)


@pytest.mark.parametrize("mode", ["static", "runtime"])
def test_real_episodes_within_budget(make_env, mode):
    """The full path (physical pruning, BN recalibration, evaluation): the pruned network's measured MACs (static:
    the pruned net; runtime: the sparse executor, gates included) and parameters match the info and the budget."""
    env = shrink_eval(make_env(mode=mode, budget=0.4))
    x = env.problem.example_input
    base_macs, base_params = count_macs(env.base_model, x), count_params(env.base_model)
    for ep in range(4):
        info = run_episode(env, seed=ep)[-1][2]
        kept = info["kept_counts"]
        rt = [round(r * k) for r, k in zip(info["runtime_ratios"], kept)]
        # the runtime gates add no parameters to the network (their weights live in the predictors)
        assert count_params(env.build_pruned(kept, rt)) / base_params == pytest.approx(info["params_ratio"],
                                                                                       abs=1e-12)
        measured = count_macs(env.build_pruned(kept, rt, sparse=True), env.data.reward.x[:8]) / base_macs
        assert measured == pytest.approx(info["effective_flops_ratio"], abs=1e-12)
        assert measured <= 0.4 + 1e-9
        if mode == "static":
            assert info["effective_flops_ratio"] == info["flops_ratio"]
        else:
            assert info["effective_flops_ratio"] < info["flops_ratio"]
        assert 0.0 <= info["accuracy"] <= 1.0 and math.isfinite(info["loss"])


def test_penalty_mode_has_no_wall_and_penalizes_excess(make_env, monkeypatch):
    env = make_env(budget_mode="penalty", budget=0.3)
    skip_evaluation(monkeypatch, env)
    info = run_episode(env, actions=[np.ones(1, np.float32)] * env.n_groups)[-1][2]
    assert info["flops_ratio"] == pytest.approx(1.0) and info["clamp_total"] == 0
    assert info["budget_excess"] == pytest.approx(1 / 0.3 - 1)
    reward = run_episode(env, actions=[np.ones(1, np.float32)] * env.n_groups)[-1][1]
    assert reward == pytest.approx(0.0 - 5.0 * (math.exp(1 / 0.3 - 1) - 1))


def test_fill_mode_spends_the_budget_by_one_common_scale_up(make_env, monkeypatch):
    from envs.export import replay_counts

    walled, filled = make_env(budget=0.4), make_env(budget=0.4, budget_mode="fill")
    for env in (walled, filled):
        skip_evaluation(monkeypatch, env)
    low = [np.full(1, -0.8, np.float32)] * walled.n_groups  # asks for far less than the budget allows
    for actions in (low, None):
        for ep in range(10):
            w = run_episode(walled, actions=actions, seed=ep)[-1][2]
            f = run_episode(filled, actions=actions, seed=ep)[-1][2]
            assert f["flops_ratio"] <= 0.4 * (1 + 1e-9)
            assert all(a >= b for a, b in zip(f["kept_counts"], w["kept_counts"]))  # the fill only adds
            assert f["fill_total"] == pytest.approx(sum(f["keep_ratios"]) - sum(w["keep_ratios"]))
            assert filled.cost.fill(f["kept_counts"]) == f["kept_counts"]  # a fixed point: nothing more fits
            assert f["flops_ratio"] > 0.9 * 0.4, (w["flops_ratio"], f["flops_ratio"])  # the budget is spent
            if actions is low:
                assert w["flops_ratio"] < 0.3 and f["fill_total"] > 1.0
            assert replay_counts(filled, f["kept_counts"])["kept_counts"] == f["kept_counts"]  # replays exactly
    with pytest.raises(ValueError, match=r"budget_mode='fill'.*mode='runtime'"):
        make_env(budget_mode="fill", mode="runtime")


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_names_step_and_value(make_env, bad):
    env = make_env()
    env.reset(seed=0)
    env.step(np.zeros(1, np.float32))
    with pytest.raises(ValueError, match=r"step 1.*non-finite.*(nan|inf)"):
        env.step(np.array([bad], np.float32))


def test_out_of_range_actions_are_clipped(make_env, monkeypatch):
    env = make_env(mode="runtime")
    skip_evaluation(monkeypatch, env)
    rng = np.random.default_rng(0)
    raw = [rng.uniform(-5, 5, size=2).astype(np.float32) for _ in range(env.n_groups)]
    clipped = [np.clip(a, -1, 1) for a in raw]
    assert any(np.any(np.abs(a) > 1) for a in raw)
    assert_same_trajectory(run_episode(env, actions=raw), run_episode(env, actions=clipped))



def test_step_info_names_action_request_and_applied_ratio(make_env, monkeypatch):
    env = make_env(budget=0.3)
    skip_evaluation(monkeypatch, env)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([3.0], dtype=np.float32))  # clipped to 1: keep everything, if allowed
    assert info["action"] == [1.0]
    assert info["requested_keep_ratio"] == 1.0
    assert info["keep_ratio"] == pytest.approx(1.0 - info["clamped"], abs=1.0 / env.groups[0].num_channels)
    assert make_env(reward="paper7").reward_kind == "relative_ce"  # the old name stays an alias

@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=0), r"budget=0 .*\(0, 1\]"),
    (dict(budget=1.5), r"budget=1\.5 .*\(0, 1\]"),
    (dict(budget=float("nan")), r"budget=nan .*\(0, 1\]"),
    (dict(budget=0.01, min_keep=0.5), r"unreachable.*min_keep=0\.5"),
    (dict(target="energy"), r"target='energy'.*flops, params, latency"),
    (dict(mode="dynamic"), r"mode='dynamic'.*static, runtime"),
    (dict(reward="top5"), r"reward='top5'.*acc, acc_flops, relative_ce"),
    (dict(scorer="random"), r"scorer='random'.*learned, l1, bn, taylor"),
    (dict(budget_mode="soft"), r"budget_mode='soft'.*wall, penalty"),
    (dict(round_to=0), r"round_to=0 .*>= 1"),
    (dict(min_keep=0), r"min_keep=0 .*\(0, 1\]"),
    (dict(storage_budget=1.2, mode="runtime"), r"storage_budget=1\.2 .*\(0, 1\]"),
    (dict(render_mode="human"), r"render_mode='human'.*ansi"),
    (dict(mode="runtime", target="params"), r"target='params'.*runtime"),
    (dict(eval_precision="fp16"), r"eval_precision='fp16'.*auto, fp32, bf16"),
    (dict(importance_samples=1), r"importance_samples.*=1.*integer >= 2"),  # checked with a classic scorer too
])
def test_bad_kwargs_name_value_and_allowed(make_env, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(**kwargs)


def test_importance_samples_rejected_before_anything_is_built():
    from envs.kwargs import check_kwargs

    with pytest.raises(ValueError, match=r"importance_samples.*=1.*integer >= 2"):
        check_kwargs({"importance_samples": 1})
    check_kwargs({"importance_samples": 2})


def test_step_before_reset_and_after_end(make_env, monkeypatch):
    env = make_env()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, np.float32))
    skip_evaluation(monkeypatch, env)
    run_episode(env)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1, np.float32))


@pytest.mark.parametrize("mode,shape", [("static", (2,)), ("runtime", (1,)), ("runtime", (3,)), ("static", (0,))])
def test_wrong_action_shape(make_env, mode, shape):
    env = make_env(mode=mode)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"step 0.*components"):
        env.step(np.zeros(shape, np.float32))


# ---------------------------------------------------------------------------------------------------- render


def test_render_ansi_one_row_per_group(make_env):
    env = make_env(render_mode="ansi", mode="runtime")
    env.reset(seed=0)
    text = env.render()
    assert isinstance(text, str)
    lines = text.strip("\n").split("\n")
    assert len(lines) == 1 + env.n_groups  # header + one row per group
    for g, line in zip(env.groups, lines[1:]):
        assert g.name in line and g.kind in line
    shrink_eval(env)
    run_episode(env)
    done = env.render()
    assert done.count("\n") == 2 + env.n_groups and "accuracy" in done  # plus the final summary line


def test_render_rgb_array(make_env):
    env = make_env(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.zeros(1, np.float32))
    img = env.render()
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0  # a chart, not a blank canvas


# ---------------------------------------------------------------------------------------------------- user models


class SmallCNN(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_user_model_runs_an_episode(tiny_setup):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    snap = state_snapshot(model)
    data = small_splits(tiny_setup[1])
    env, caught = run_checkers(lambda: ChannelPruneEnv(model=model, example_input=torch.zeros(1, 1, 28, 28),
                                                       data=data, scorer="l1", budget=0.5, progress=False),
                               render=False)
    assert caught == []
    assert env.n_groups == 3 and [g.num_channels for g in env.groups] == [8, 16, 16]
    info = run_episode(env)[-1][2]
    assert info["flops_ratio"] <= 0.5 + 1e-9 and 0 <= info["accuracy"] <= 1
    assert_state_equal(model, snap)
    env2 = pickle.loads(pickle.dumps(env))
    assert_same_trajectory(run_episode(env, seed=1), run_episode(env2, seed=1))


def test_unsupported_grouped_conv_fails_at_construction(tiny_setup):
    from envs.groups import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"features\.3.*groups=2") as err:
        ChannelPruneEnv(model=SmallCNN(groups=2), example_input=torch.zeros(1, 1, 28, 28),
                        data=small_splits(tiny_setup[1]), scorer="l1", progress=False)
    assert isinstance(err.value, ValueError)


def test_derive_keeps_settings_and_swaps_the_model(make_env):
    env = make_env(budget=0.4, round_to=2)
    tuned = copy.deepcopy(env.base_model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(0.5)
    env2 = env.derive(model=tuned, scorer="l1")
    assert env2.budget == 0.4 and env2.round_to == 2 and env2.n_groups == env.n_groups
    assert env2.base_model is tuned and env2.problem.scorer.name == "l1"


@pytest.mark.skipif(not backend("cpu").bf16, reason="no fast, safe bf16 on this CPU")
def test_bf16_evaluation_tracks_fp32_and_leaves_the_model_contiguous(make_env):
    """The default evaluator (channels-last, bf16 autocast) ranks like exact fp32 and hands the model back as
    given."""
    fast, exact = make_env(eval_precision="auto"), make_env(eval_precision="fp32")
    assert fast.problem.eval_precision == "bf16" and exact.problem.eval_precision == "fp32"
    for ratio in (1.0, 0.6, 0.3):
        kept = [max(1, round(ratio * g.num_channels)) for g in exact.groups]
        net = exact.build_pruned(kept, kept)
        exact.recalibrate_bn(net)
        acc32, loss32 = exact.evaluate(net, "reward")
        acc16, loss16 = fast.evaluate(net, "reward")
        assert abs(acc16 - acc32) <= 0.01 and abs(loss16 - loss32) <= 0.02 * loss32
        assert all(p.is_contiguous() for p in net.parameters())
        assert not net.training
    # the episode reports which precision produced its accuracy
    fast.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, term, trunc, info = fast.step(np.array([0.0], dtype=np.float32))
        done = term or trunc
    assert info["eval_precision"] == "bf16"
