"""The speed bench (baselines/experiments/speed.py) end to end on the tiny env: every number it reports exists
and is consistent (timings are not asserted: a test is not a benchmark)."""

from __future__ import annotations

import json

import pytest

from baselines.experiments import speed


def test_speed_bench_reports_every_measure(tiny_gym_kwargs):
    res = speed.run("ChannelPrune-ResNet20-v0", 0.5, 1, 3, {**tiny_gym_kwargs, "device": "cpu"})
    assert res["flops_ratio"] <= 0.5 + 1e-9 and 0 < res["accuracy"] <= 1
    for key in ("episode_s", "pruned_forward_recal_s", "pruned_build_forward_recal_s", "mask_based_s"):
        assert res[key] > 0, key
    assert res["episode_over_pruned_forward"] == res["episode_s"] / res["pruned_forward_recal_s"]
    assert set(res["eval_images_per_s"]) >= {"plain_fp32", "fp32"}
    assert res["memory_episodes"] == 3 and res["rss_mb_end"] > 0
    assert res["rss_growth_mb_10_to_end"] == res["rss_mb_end"] - res["rss_mb_after_10"]
    json.dumps(res)  # the --out file is plain JSON


def test_runtime_batch1_latency_reports_the_gated_net_at_its_effective_flops(tiny_gym_kwargs):
    kwargs = {**tiny_gym_kwargs, "device": "cpu"}
    native, larger = speed.runtime_latency("ChannelPrune-ResNet20-v0", 0.5, kwargs, image_sizes=[None, 40])
    assert native["image_size"] == 28 and larger["image_size"] == 40  # the env's own size, then the one asked
    for r in (native, larger):
        assert r["batch_size"] == 1 and r["gated_groups"] > 0
        assert r["effective_flops_ratio"] <= 0.5 + 1e-9 and r["static_flops_ratio"] <= 0.5 + 1e-9
        assert r["effective_flops_ratio"] > 0.4  # fitted to the budget, not far below it
        assert 0 < r["runtime_ratio"] < 1
        for key in ("unpruned_ms", "gated_ms", "static_ms", "mixed_ms"):
            assert r[key] > 0, key
        assert r["gated_over_unpruned"] == r["gated_ms"] / r["unpruned_ms"]
        # the accuracy comparison's runtime plan: static cuts outside the gates, per-input shares inside
        assert 0.4 < r["mixed_effective_flops_ratio"] <= 0.5 + 1e-9
        assert 0 < r["mixed_static_keep"] < 1 and 0 < r["mixed_runtime_ratio"] < 1
    # the same networks at both sizes: the plans do not depend on the input size
    assert larger["effective_flops_ratio"] == native["effective_flops_ratio"]
    with pytest.raises(ValueError, match="image_sizes"):
        speed.runtime_latency("ChannelPrune-ResNet20-v0", 0.5, kwargs, image_sizes=[4])
