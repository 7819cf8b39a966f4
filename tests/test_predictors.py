"""The scorer comparison (``baselines.experiments.predictors``): what it measures and how it judges the goal."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.stats import spearmanr

from envs import importance

from baselines.experiments import predictors as pr


def test_report_measures_each_scorer_as_a_pruner(tiny_gym_kwargs, tmp_path):
    out = tmp_path / "p"
    summary = pr.report("ChannelPrune-ResNet20-v0", [0.5], ["learned", "l1", "fpgm"], [0, 1], out,
                        {**tiny_gym_kwargs, "device": "cpu"}, progress=False)
    with open(out / "predictors.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    # the learned predictor is trained per seed; the deterministic criteria run once
    assert sorted((r["scorer"], r["seed"]) for r in lines) == [("fpgm", "0"), ("l1", "0"), ("learned", "0"),
                                                                ("learned", "1")]
    # the accuracy is that of the uniformly pruned, recalibrated net on the test split
    import gymnasium as gym

    env = gym.make("ChannelPrune-ResNet20-v0", scorer="l1", **tiny_gym_kwargs, device="cpu").unwrapped
    kept, rt = env.cost.plan_counts([0.5] * env.n_groups)
    net = env.build_pruned(kept, rt)
    env.recalibrate_bn(net)
    l1 = next(r for r in lines if r["scorer"] == "l1")
    assert float(l1["test_acc"]) == pytest.approx(env.evaluate(net, "test")[0], abs=1e-9)
    assert float(l1["flops_ratio"]) == pytest.approx(env.cost.ratios(kept, rt)["flops"])
    assert summary["verdict"]["best_classic"] in ("l1", "fpgm")
    md = (out / "predictors.md").read_text()
    assert "| learned |" in md and "| fpgm |" in md and "Goal" in md
    with pytest.raises(ValueError, match="scorers"):
        pr.report("ChannelPrune-ResNet20-v0", [0.5], ["magic"], [0], out, tiny_gym_kwargs)


def _lines(learned: list[float], classic: dict[str, float], ratios=(0.3, 0.5)) -> list[dict]:
    lines = [{"scorer": "learned", "seed": i, "ratio": r, "test_acc": a + (0.1 if r == 0.5 else 0.0)}
             for i, a in enumerate(learned) for r in ratios]
    lines += [{"scorer": s, "seed": 0, "ratio": r, "test_acc": a} for s, a in classic.items() for r in ratios]
    return lines


def test_the_goal_needs_the_whole_learned_interval_a_point_above_the_best_classic():
    met = pr.summarize(_lines([0.810, 0.812, 0.814], {"l1": 0.75, "fpgm": 0.78}), [0.3, 0.5])["verdict"]
    assert met["best_classic"] == "fpgm" and met["learned_meets_goal"]
    assert met["learned_minus_best"]["0.3"] == pytest.approx(0.032)
    # a mean above the goal with an interval reaching below it is not enough
    noisy = pr.summarize(_lines([0.70, 0.81, 0.92], {"l1": 0.78}), [0.3, 0.5])["verdict"]
    assert noisy["learned_minus_best"]["0.3"] > pr.GOAL_POINTS and not noisy["learned_meets_goal"]
    below = pr.summarize(_lines([0.70, 0.71, 0.72], {"bn": 0.78}), [0.3, 0.5])["verdict"]
    assert below["best_classic"] == "bn" and not below["learned_meets_goal"]


def test_static_predictor_learns_which_keep_sets_lose_least(make_env, monkeypatch):
    """Trained on measured keep sets, not single channels: with a planted ground truth (a keep set's loss falls
    with the mean activation of what it keeps), the predictor orders held-out keep sets as that truth does, better
    than Taylor's or L1's ranks, and ranks each group's channels by activation, though it has five other
    criteria among its features."""
    env = make_env()
    ctx = importance.ImportanceContext(env.base_model, env.graph, env.data.calib, env.data.train)
    act = importance.taylor_and_activation(ctx)[1]
    rank = [a.argsort().argsort() / (len(a) - 1) for a in act]
    measured = []

    def planted(_ctx, subsets, images, progress):
        measured.extend(subsets)
        return np.array([1.0 - rank[g][keep].mean() for g, keep in subsets])

    monkeypatch.setattr(importance, "measure_subset_losses", planted)
    state, rep = importance.train_static_predictor(ctx, per_group=4, seed=0, progress=False)
    # every group at every training ratio, keep sets of the ratio's size
    assert len(measured) == rep["subsets_measured"] == env.n_groups * len(importance.SUBSET_RATIOS) * 4
    sizes = {(g, len(keep)) for g, keep in measured}
    for g in env.groups:
        for ratio in importance.SUBSET_RATIOS:
            assert (g.index, min(g.num_channels, max(1, round(ratio * g.num_channels)))) in sizes
    assert rep["static_pair_accuracy_heldout"] >= 0.9
    assert rep["static_pair_accuracy_heldout"] > max(rep["taylor_pair_accuracy_heldout"],
                                                     rep["l1_pair_accuracy_heldout"])
    rhos = [spearmanr(s.numpy(), a).statistic for s, a in zip(state["scores"], act)]
    assert np.mean(rhos) > 0.8


def test_static_predictor_starts_from_taylor_and_moves_only_where_measured(make_env, monkeypatch):
    """The predictor learns a correction to Taylor's rank: when every measured keep set loses the same (nothing
    to learn), each group's channels rank exactly as Taylor ranks them."""
    env = make_env()
    ctx = importance.ImportanceContext(env.base_model, env.graph, env.data.calib, env.data.train)
    # Taylor's within-group rank as the predictor sees it (ties in the raw scores broken as channel_features does)
    taylor = [f[:, importance.FEATURES.index("taylor")] for f in importance.channel_features(ctx)]
    monkeypatch.setattr(importance, "measure_subset_losses",
                        lambda _ctx, subsets, images, progress: np.ones(len(subsets)))
    state, _ = importance.train_static_predictor(ctx, per_group=2, seed=0, progress=False)
    for s, t in zip(state["scores"], taylor):
        assert spearmanr(s.numpy(), t).statistic == pytest.approx(1.0)
