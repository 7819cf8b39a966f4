"""Runtime gates trained end to end (``envs.gates``, ``runtime_gates="trained"``) and the comparison of runtime
gating with static pruning at equal effective FLOPs (``baselines.experiments.runtime_gating``)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch

import envs.importance as importance
from envs.gates import finetune_with_gates, relaxed_topk, train_gates_end_to_end

from baselines.experiments import runtime_gating as rg


def test_relaxed_topk_is_the_hard_topk_forward_with_a_gradient_backward():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 10, generator=gen, requires_grad=True)
    mask = relaxed_topk(scores, 3)
    hard = torch.zeros(4, 10).scatter_(1, scores.detach().topk(3, dim=1).indices, 1.0)
    assert torch.equal(mask.detach(), hard)
    weights = torch.randn(4, 10, generator=gen)
    (mask * weights).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    # the channel whose inclusion lowers the loss most gets its score pushed up (gradient descent: -grad > 0)
    i, j = divmod(int(weights.argmin()), 10)
    assert scores.grad[i, j] < 0
    assert torch.equal(relaxed_topk(scores, 10), torch.ones(4, 10))  # k = C keeps everything


def test_trained_gates_keep_more_accuracy_than_ridge_gates(make_env):
    """The same plan (nothing pruned statically, a share of every gated group computed per input), BN
    recalibrated as the env does: gates trained through the network beat gates regressed onto activations."""
    env = make_env(mode="runtime", budget=1.0, runtime_gates="ridge")
    problem = env.problem
    ridge = problem.predictors.gates
    trained, report = train_gates_end_to_end(problem.base_model, problem.graph, ridge, problem.data.train,
                                             steps=80, seed=0, device="cpu", progress=False)
    assert set(trained) == set(ridge) and report["gate_train_steps"] == 80
    assert any(not torch.equal(trained[k], ridge[k]) for k in ridge)
    better = problem.with_gates(trained)
    kept = list(problem.cost.k_full)
    for ratio in (0.3, 0.5):
        rt = [max(1, round(ratio * k)) if problem.gated[i] else k for i, k in enumerate(kept)]
        acc_ridge = problem.evaluate_plan(kept, rt)["accuracy"]
        acc_trained = better.evaluate_plan(kept, rt)["accuracy"]
        assert acc_trained > acc_ridge + 0.02, (ratio, acc_trained, acc_ridge)
    assert problem.predictors.gates is ridge  # with_gates left the original problem alone


def test_runtime_gates_trained_kwarg_trains_once_and_caches(tiny_setup, tmp_path, monkeypatch):
    from envs.channel_prune import ChannelPruneEnv

    ckpt = tmp_path / "copy.pt"
    shutil.copy(tiny_setup[0], ckpt)
    kwargs = dict(model="resnet20", width=0.5, checkpoint=str(ckpt), data=tiny_setup[1], progress=False,
                  mode="runtime")
    ridge = ChannelPruneEnv(**kwargs, runtime_gates="ridge").predictors.gates
    first = ChannelPruneEnv(**kwargs, gate_steps=5)  # trained gates are the default
    assert list(tmp_path.glob("copy.pt.runtime-gates-trained-*-5.pt"))
    assert first.predictors.report["gate_train_steps"] == 5
    assert any(not torch.equal(first.predictors.gates[k], ridge[k]) for k in ridge)

    def refuse(*args, **kwargs):
        raise AssertionError("the trained gates were retrained instead of loaded from the cache")

    monkeypatch.setattr(importance, "train_gates_end_to_end", refuse)
    second = ChannelPruneEnv(**kwargs, runtime_gates="trained", gate_steps=5)  # the same, named
    for k in ridge:
        assert torch.equal(first.predictors.gates[k], second.predictors.gates[k])


@pytest.mark.parametrize("bad, match", [(dict(runtime_gates="magic"), "runtime_gates='magic'.*ridge, trained"),
                                        (dict(gate_steps=0), "gate_steps=0")])
def test_bad_gate_training_settings_are_refused_before_building(bad, match):
    import gymnasium as gym

    with pytest.raises(ValueError, match=match):
        gym.make("ChannelPrune-ResNet18-v0", mode="runtime", **bad)


def test_with_gates_needs_runtime_mode_and_the_same_gated_groups(make_env):
    with pytest.raises(ValueError, match="mode='runtime'"):
        make_env().problem.with_gates({})
    problem = make_env(mode="runtime").problem
    with pytest.raises(ValueError, match="expected this problem's"):
        problem.with_gates({"gate0.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------- the comparison
def test_equal_flops_plans_differ_only_in_how_the_gated_groups_are_cut(make_env):
    problem = make_env(mode="runtime", budget=0.5).problem
    plans = rg.equal_flops_plans(problem)
    (ks, rs, u, _), (kr, rr, u2, q) = plans["static"], plans["runtime"]
    assert u == u2 and 0.1 < q < 1
    for i, g in enumerate(problem.gated):
        if g:  # whole in storage, a share per input
            assert kr[i] == problem.cost.k_full[i] and rr[i] < kr[i]
        else:  # the same static cut in both plans
            assert kr[i] == ks[i] == rr[i]
    for kept, rt in ((ks, rs), (kr, rr)):
        assert problem.cost.ratios(kept, rt)["effective"] <= 0.5 + 1e-6
    # both spend most of the budget (the tiny net's few channels round it down)
    assert problem.cost.ratios(ks, rs)["effective"] > 0.4 and problem.cost.ratios(kr, rr)["effective"] > 0.4
    # "whole": the ungated groups stored and computed whole; the gated ones pay for it per input
    kw, rw, uw, qw = rg.equal_flops_plans(problem, "whole")["runtime"]
    assert kw == problem.cost.k_full and uw == 1.0 and qw < q
    assert all(rw[i] == kw[i] for i, g in enumerate(problem.gated) if not g)
    assert 0.4 < problem.cost.ratios(kw, rw)["effective"] <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="runtime_plan='half'"):
        rg.equal_flops_plans(problem, "half")


def test_compare_writes_every_arm_and_judges_the_goal(tiny_gym_kwargs, tmp_path):
    out = tmp_path / "rg"
    summary = rg.compare("ChannelPrune-ResNet20-v0", [0.5], [0, 1], out, arms=("static", "trained", "joint"),
                         gate_steps=3, finetune_steps=2, env_kwargs={**tiny_gym_kwargs, "device": "cpu"},
                         progress=False)
    with open(out / "runtime-gating.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    got = sorted((r["arm"], r["seed"], r["phase"]) for r in lines)
    after = [(arm, seed, phase) for arm in ("static", "trained") for seed in ("0", "1")
             for phase in ("after", "after_regated")]
    joint = [("joint", seed, "after") for seed in ("0", "1")]  # fine-tuned with its gates: one row
    assert got == sorted([("static", "", "before"), ("ridge", "", "before"), ("trained", "0", "before"),
                          ("trained", "1", "before"), *after, *joint])
    for r in lines:
        assert float(r["effective_flops"]) <= 0.5 + 1e-6 and 0 <= float(r["test_acc"]) <= 1
    static = next(r for r in lines if r["arm"] == "static")
    trained = next(r for r in lines if r["arm"] == "trained")
    assert float(trained["params_ratio"]) > float(static["params_ratio"])  # gated groups stay whole in storage
    assert {(0.5, "trained", "after"), (0.5, "joint", "after")} <= set(summary["differences"])
    # the "ridge" arm runs the ridge gates (the env's default are the trained ones)
    import gymnasium as gym

    ridge_env = gym.make("ChannelPrune-ResNet20-v0", mode="runtime", runtime_gates="ridge", budget=0.5,
                         **tiny_gym_kwargs, device="cpu").unwrapped
    kept, rt, _, _ = rg.equal_flops_plans(ridge_env.problem)["runtime"]
    net = ridge_env.build_pruned(kept, rt)
    ridge_env.recalibrate_bn(net)
    ridge_row = next(r for r in lines if r["arm"] == "ridge")
    assert float(ridge_row["test_acc"]) == pytest.approx(ridge_env.evaluate(net, "test")[0], abs=1e-9)
    assert "| 0.5 | trained |" in (out / "runtime-gating.md").read_text()
    with pytest.raises(ValueError, match="arms"):
        rg.compare("ChannelPrune-ResNet20-v0", [0.5], [0], out, arms=("magic",), env_kwargs=tiny_gym_kwargs)


def _lines(diffs: list[float], budget: float = 0.3) -> list[dict]:
    lines = [{"budget": budget, "arm": "static", "seed": s, "phase": "after", "test_acc": 0.8} for s in range(3)]
    lines += [{"budget": budget, "arm": "trained", "seed": s, "phase": "after", "test_acc": 0.8 + d}
              for s, d in enumerate(diffs)]
    return lines


def test_the_goal_needs_the_whole_paired_interval_a_point_above_static():
    met = {("trained", "after"): True}
    assert rg.summarize(_lines([0.030, 0.032, 0.031]))["goal_met"] == met
    assert rg.summarize(_lines([0.030, 0.0, 0.06]))["goal_met"] == {("trained", "after"): False}  # mean 3, wide
    assert rg.summarize(_lines([0.008, 0.009, 0.0085]))["goal_met"] == {("trained", "after"): False}  # < 1 point
    assert rg.summarize(_lines([0.05, 0.05, 0.05], budget=0.5))["goal_met"] == {}  # the goal is at 0.3


def test_merge_counts_deterministic_rows_once(tmp_path):
    def write(d, rows):
        d.mkdir()
        with open(d / "runtime-gating.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=rg.FIELDS)
            w.writeheader()
            for arm, seed, phase, acc in rows:
                w.writerow({"budget": 0.3, "arm": arm, "seed": "" if seed is None else seed, "phase": phase,
                            "test_acc": acc, "effective_flops": 0.3, "params_ratio": 0.5, "keep_static": 0.55,
                            "runtime_ratio": 0.55, "seconds": 1.0})

    write(tmp_path / "a", [("static", None, "before", 0.67), ("static", 0, "after", 0.90),
                           ("trained", 0, "after", 0.93), ("static", 1, "after", 0.91),
                           ("trained", 1, "after", 0.94)])
    write(tmp_path / "b", [("static", None, "before", 0.67), ("static", 2, "after", 0.92),
                           ("trained", 2, "after", 0.95)])
    summary = rg.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m", "ChannelPrune-ResNet18-v0", "all", "x",
                       100, 200)
    assert summary["estimates"][0.3, "static", "before"].n == 1
    assert summary["estimates"][0.3, "trained", "after"].n == 3
    assert summary["differences"][0.3, "trained", "after"].mean == pytest.approx(0.03)
    assert summary["goal_met"] == {("trained", "after"): True}
    assert "**met**" in (tmp_path / "m" / "runtime-gating.md").read_text()


def test_joint_finetune_trains_network_and_gates_and_hands_back_a_plain_network(make_env):
    """FBS-style joint fine-tune: both the network and its gates move, the caller's network is left alone, the
    result carries no training masks, and a seed fixes the outcome."""
    problem = make_env(mode="runtime", budget=0.5, runtime_gates="ridge").problem
    plan = rg.equal_flops_plans(problem)["runtime"]
    specs = problem.gate_specs(*plan[:2])
    net = problem.build_pruned(*plan[:2], gates=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    gates = {f"gate{i}.{k}": getattr(s, k) for i, s in specs.items() for k in ("weight", "bias")}
    runs = [finetune_with_gates(net, problem.graph, gates, problem.data, 3, plan[3], seed=1, device="cpu",
                                progress=False) for _ in range(2)]
    (tuned, trained), (tuned2, trained2) = runs
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # a copy was trained
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items() if v.is_floating_point())
    assert any(not torch.equal(trained[k], gates[k]) for k in gates)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tuned.modules())
    assert not tuned.training
    assert all(torch.equal(v, tuned2.state_dict()[k]) for k, v in tuned.state_dict().items())
    assert all(torch.equal(trained[k], trained2[k]) for k in trained)
    with pytest.raises(ValueError, match="runtime_ratio=1.5"):
        finetune_with_gates(net, problem.graph, gates, problem.data, 1, 1.5, device="cpu", progress=False)


def test_runtime_features_measure_the_activation_mass_the_gates_pick(make_env):
    """Observation features 18-20 read the gates' rankings only: the ridge gates' top quarter holds more of each
    input's activation mass than a quarter of the channels, gates that rank at random hold about a quarter, and
    rescaling a gate (trained gates have no scale of their own) changes nothing."""
    from envs.observation import runtime_summaries

    problem = make_env(mode="runtime", runtime_gates="ridge").problem
    model, graph, x = problem.base_model, problem.graph, problem.data.calib.x[:128]
    ridge = runtime_summaries(problem.predictors, model, graph, x)
    gated = [i for i in range(problem.n_groups) if problem.predictors.has_gate(i)]
    assert gated and not ridge[[i for i in range(problem.n_groups) if i not in gated]].any()
    assert (ridge[gated, 0] > 0.3).all() and (ridge[gated, 1] > ridge[gated, 0]).all()
    assert (ridge[gated, 1] <= 1 + 1e-6).all()

    gen = torch.Generator().manual_seed(0)
    gates = problem.predictors.gates
    rescaled = problem.with_gates({k: 7.0 * v for k, v in gates.items()}).predictors
    assert np.allclose(runtime_summaries(rescaled, model, graph, x), ridge, atol=1e-6)
    noise = problem.with_gates({k: torch.randn(v.shape, generator=gen) for k, v in gates.items()})
    random = runtime_summaries(noise.predictors, model, graph, x)
    assert random[gated, 0].mean() < ridge[gated, 0].mean() - 0.05
