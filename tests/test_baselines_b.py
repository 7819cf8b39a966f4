"""Polarization, gRDA and Channel Gating baselines on the tiny env (small step budgets)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_plan_follows
from stable_baselines3.common.evaluation import evaluate_policy

from baselines import make_baseline
from baselines.channel_gating import calibrate_gates, evaluate_channel_gating, fit_threshold
from baselines.finetune import bn_modules
from baselines.grda import GRDA, channel_density, grda_finetune, weight_sparsity
from baselines.polarization import first_valley, group_bn_scales, otsu_separation, polarize

FAST = dict(steps=10, batch_size=16, progress=False)


def _episode(b):
    """One full episode with SB3's evaluator; returns the final info."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Monitor.*")
        evaluate_policy(b, b.setup().eval_env, n_eval_episodes=1)
    return b.eval_env.last_info


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ polarization
def test_first_valley_splits_two_clusters_and_rejects_one():
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.uniform(0.0, 0.05, 20), rng.uniform(0.7, 0.9, 44)])
    th = first_valley(two, 1.0)
    assert th is not None and 0.05 < th < 0.7
    one = rng.normal(0.6, 0.05, 64)
    assert first_valley(one, 1.0) is None


def test_polarization_pushes_scales_to_two_clusters_unlike_l1(make_env):
    env = make_env(scorer="l1")
    before = _state(env.base_model)
    kw = dict(lam=0.2, steps=30, batch_size=32, cache=False, progress=False)
    g_pol = torch.cat([m.weight.detach() for m in bn_modules(polarize(env, reg="polar", **kw))]).numpy()
    g_l1 = torch.cat([m.weight.detach() for m in bn_modules(polarize(env, reg="l1", **kw))]).numpy()
    low_pol, low_l1 = (g_pol < 0.1).mean(), (g_l1 < 0.1).mean()
    assert g_pol.min() >= 0.0 and g_pol.max() <= 1.0  # clamped to [0, a]
    assert low_pol > low_l1 + 0.2  # a cluster at 0 that L1 does not make
    assert low_pol + (g_pol > 0.5).mean() > 0.95  # and almost nothing in between
    assert otsu_separation(g_pol) > otsu_separation(g_l1) + 0.2
    assert _same_state(before, env.base_model.state_dict())  # the base model is never modified


def test_polarization_episode_budget_and_determinism(make_env):
    env = make_env(scorer="l1")
    b1 = make_baseline("polarization", env, lam=0.2, cache=False, steps=30, batch_size=32, progress=False)
    # the plan is the valley split of each group's |gamma| at one common scale
    assert_plan_follows(b1, b1.setup().raw_ratios)
    scales = group_bn_scales(b1.eval_env, b1.finetuned)
    for s, th, raw in zip(scales, b1.thresholds, b1.raw_ratios):
        if th is not None:
            assert th == first_valley(s, b1.a) and raw == pytest.approx(max((s > th).mean(), 1e-3))
    assert any(th is not None for th in b1.thresholds)  # at least one group was split at a valley
    b2 = make_baseline("polarization", env, lam=0.2, cache=False, steps=30, batch_size=32, progress=False).setup()
    np.testing.assert_array_equal(b1.ratios, b2.ratios)
    assert b1.eval_env.problem.scorer.name == "bn" and b1.eval_env.base_model is b1.finetuned


def test_polarization_caches_per_hyperparameters(make_env):
    env = make_env(scorer="l1")

    def cached() -> list[Path]:
        return list(Path(env.problem.checkpoint_file).parent.glob("*.polarization-*.pt"))

    def n_cached() -> int:
        return len(cached())

    for f in cached():  # a cache kept from an earlier session (CHANNELPRUNE_TEST_CACHE) would be loaded instead
        f.unlink()
    n0 = n_cached()
    a = polarize(env, lam=0.1, **FAST)
    assert n_cached() == n0 + 1
    b = polarize(env, lam=0.1, **FAST)  # loaded, not retrained
    assert n_cached() == n0 + 1 and _same_state(a.state_dict(), b.state_dict())
    polarize(env, lam=0.11, **FAST)
    assert n_cached() == n0 + 2


def test_unknown_option_is_named(make_env):
    env = make_env(scorer="l1")
    with pytest.raises(ValueError, match="lamda"):
        make_baseline("polarization", env, lamda=0.1).setup()
    with pytest.raises(ValueError, match="reg="):
        polarize(env, reg="l2")


# ------------------------------------------------------------------------------------------ gRDA
def test_grda_update_is_soft_threshold_of_the_accumulator():
    w = torch.nn.Parameter(torch.tensor([0.5, -0.02, 0.01, -0.8]))
    opt = GRDA([w], lr=0.1, c=0.5, mu=0.6)
    acc = w.detach().clone()
    for n in range(1, 4):
        grad = torch.tensor([0.1, -0.2, 0.05, 0.3]) * n
        w.grad = grad.clone()
        opt.step()
        acc -= 0.1 * grad
        g = 0.5 * 0.1 ** 0.5 * (n * 0.1) ** 0.6
        torch.testing.assert_close(w.detach(), acc.sign() * (acc.abs() - g).clamp_min(0))
    assert (w.detach() == 0).sum() >= 1  # small coordinates are exactly zero
    with pytest.raises(ValueError, match="mu="):
        GRDA([w], mu=1.5)


def test_grda_makes_exact_zeros_growing_with_c(make_env):
    env = make_env(scorer="l1")
    kw = dict(steps=20, batch_size=16, cache=False, progress=False)
    low = weight_sparsity(grda_finetune(env, c=0.1, **kw))
    high = weight_sparsity(grda_finetune(env, c=0.5, **kw))
    assert low > 0.0  # exact zeros
    assert high > low + 0.1


def test_grda_episode_budget_and_determinism(make_env):
    env = make_env(scorer="l1", device="cpu")  # bitwise equal runs: CUDA's backward kernels use atomics
    b1 = make_baseline("grda", env, cache=False, **FAST)
    # the plan is each group's weight density after the gRDA fine-tune, at one common scale
    assert_plan_follows(b1, np.maximum(b1.setup().density, 1e-3))
    np.testing.assert_array_equal(b1.density, channel_density(b1.eval_env, b1.finetuned, "weights"))
    assert b1.sparsity > 0.0 and b1.density.min() < 1.0  # the fine-tune made exact zeros the plan follows
    b2 = make_baseline("grda", env, cache=False, **FAST).setup()
    np.testing.assert_array_equal(b1.ratios, b2.ratios)


# ------------------------------------------------------------------------------------------ channel gating
def test_channel_gating_flops_fall_and_accuracy_degrades_gracefully(make_env):
    env = make_env(mode="runtime")
    base_acc, _ = env.evaluate(env.base_model)
    cal = calibrate_gates(env)
    deltas = [-1.5, -0.5, 0.0, 0.5]
    res = [evaluate_channel_gating(env, d, calibration=cal) for d in deltas]
    flops = [r["effective_flops_ratio"] for r in res]
    accs = [r["accuracy"] for r in res]
    assert all(a > b for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] < 0.9
    assert accs[0] >= base_acc - 0.03
    assert all(b <= a + 0.02 for a, b in zip(accs, accs[1:])), accs  # no gain beyond noise as FLOPs fall


def test_channel_gating_threshold_fits_a_flops_target(make_env, monkeypatch):
    import baselines.channel_gating as cg

    env = make_env(mode="runtime")
    cal = calibrate_gates(env, all_convs=True)  # the paper's setting: every conv but the first
    assert len(cal.layers) > sum(env.gated)
    calls = []
    measure = cg.evaluate_channel_gating
    monkeypatch.setattr(cg, "evaluate_channel_gating", lambda *a, **k: calls.append(a[1]) or measure(*a, **k))
    d = fit_threshold(env, 0.85, calibration=cal, iters=6)
    ratio = measure(env, d, split="calib", calibration=cal)["effective_flops_ratio"]
    assert 0.8 < ratio <= 0.85
    # the tables' prediction brackets delta, so the real gated net is built far fewer times than bisection's 12
    assert len(calls) <= 8, calls
    assert abs(cg.predicted_ratio(env, cal, d) - ratio) < 0.05  # the tables predict the measured ratio closely


def test_channel_gating_counts_macs_exactly(make_env):
    env = make_env(mode="runtime")
    cal = calibrate_gates(env, p=4)
    assert evaluate_channel_gating(env, -1e9, calibration=cal)["effective_flops_ratio"] == 1.0
    # every gate shut: each gated conv computes only its base path
    mods = dict(env.base_model.named_modules())
    sizes = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-2] * o.shape[-1]))
             for n in cal.layers]
    with torch.no_grad():
        env.base_model(env.problem.example_input)
    for h in hooks:
        h.remove()
    saved = sum(mods[n].out_channels * sizes[n] * (mods[n].in_channels - mods[n].in_channels // 4)
                * mods[n].kernel_size[0] * mods[n].kernel_size[1] for n in cal.layers)
    out = evaluate_channel_gating(env, 1e9, calibration=cal)
    assert out["effective_flops_ratio"] == pytest.approx(1 - saved / env.graph.base_macs, abs=1e-12)
    assert all(v == 0 for v in out["open_fraction"].values())


def test_channel_gating_episode_in_runtime_env(make_env):
    env = make_env(mode="runtime", budget=0.6)
    b1 = make_baseline("channel_gating", env)
    info = _episode(b1)
    assert info["effective_flops_ratio"] <= env.budget + 1e-9
    gated = np.array(env.gated)
    assert np.all(b1.runtime_ratios[gated] < 1) and np.all(b1.runtime_ratios[~gated] == 1)
    b2 = make_baseline("channel_gating", env).setup()
    np.testing.assert_array_equal(b1.ratios, b2.ratios)
    np.testing.assert_array_equal(b1.runtime_ratios, b2.runtime_ratios)


def test_channel_gating_on_a_static_env_runs_in_runtime_mode(make_env):
    env = make_env(budget=0.6)
    b = make_baseline("channel_gating", env).setup()
    assert b.eval_env.mode == "runtime" and env.mode == "static"
    evaluate_policy(b, b.eval_env, n_eval_episodes=1)
    assert b.eval_env.last_info["effective_flops_ratio"] <= 0.6 + 1e-9


# ------------------------------------------------------------------------------------------ full ResNet-18
@pytest.mark.slow
@pytest.mark.parametrize("name", ["polarization", "grda"])
def test_default_step_budget_on_full_resnet18(tiny_setup, name):
    # The default fine-tune (150 steps of batch 64) on a full-width ResNet-18 (random weights: the cost does not
    # depend on them) must finish in minutes and give a plan within the budget.
    import time

    from envs.channel_prune import ChannelPruneEnv
    from envs.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, 1, 1.0).eval()
    env = ChannelPruneEnv(model=model, data=tiny_setup[1], scorer="l1", progress=False)
    t0 = time.perf_counter()
    b = make_baseline(name, env, progress=False)
    info = _episode(b)
    assert time.perf_counter() - t0 < 600
    assert info["flops_ratio"] <= env.budget + 1e-9


# ------------------------------------------------------------------------------------------ devices
def test_channel_gating_calibration_returns_cpu_tables_and_leaves_the_base_model(make_env):
    env = make_env(mode="runtime", device="cpu")
    before = {k: v.clone() for k, v in env.base_model.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) for m in env.base_model.modules())
    cal = calibrate_gates(env)
    for n in cal.layers:
        for t in (cal.base_idx[n], cal.mean[n], cal.std[n], cal.open_at[n]):
            assert t.device.type == "cpu"
        assert cal.mean[n].dtype == cal.std[n].dtype == cal.open_at[n].dtype == torch.float32
    assert sum(len(m._forward_hooks) for m in env.base_model.modules()) == hooks_before
    assert all(torch.equal(v, env.base_model.state_dict()[k]) for k, v in before.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_channel_gating_calibration_on_cuda_agrees_with_the_cpu(make_env):
    cpu = calibrate_gates(make_env(mode="runtime", device="cpu"))
    gpu = calibrate_gates(make_env(mode="runtime", device="cuda"))
    assert cpu.layers == gpu.layers
    for n in cpu.layers:  # cuDNN may use TF32 convolutions: close, not equal
        torch.testing.assert_close(gpu.mean[n], cpu.mean[n], rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(gpu.std[n], cpu.std[n], rtol=2e-2, atol=2e-3)
        assert (gpu.open_at[n] - cpu.open_at[n]).abs().max() < 0.02


def test_channel_gating_row_is_the_real_gated_network_not_the_topk_transfer(make_env):
    from baselines.channel_gating import GatedConv
    from baselines.experiments.benchmark import own_network_row

    env = make_env(budget=0.7)
    b = make_baseline("channel_gating", env)  # no setup(): its own network is not an env plan
    assert make_baseline("channel_gating_topk", env).own_network() is None  # the transfer is an env plan
    net, measure = b.own_network()
    gated = [m for m in net.modules() if isinstance(m, GatedConv)]
    assert len(gated) >= 2
    calib = measure(net, "calib")  # delta was fitted on the calibration split to the budget
    assert 0.6 < calib["effective_flops_ratio"] <= 0.7 + 1e-9
    row = own_network_row("channel_gating", 0.7, env, net, measure, 0, False, 0)
    test = measure(net, "test")
    assert row["test_acc"] == row["test_acc_before_ft"] == test["accuracy"]
    assert row["effective_flops_ratio"] == test["effective_flops_ratio"] < 1.0
