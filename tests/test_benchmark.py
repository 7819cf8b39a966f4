"""The benchmark end to end on the tiny env: two baselines and one agent, one budget; resume skips done rows."""

from __future__ import annotations

import csv

import pytest
import torch

from baselines.experiments import benchmark as bm


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_benchmark_writes_everything_and_resumes(tiny_gym_kwargs, tmp_path, monkeypatch):
    out = tmp_path / "results"
    kwargs = {**tiny_gym_kwargs, "importance_samples": 8}
    rows = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform", "random_search"], ["ppo"], episodes=4,
                        finetune_steps=3, out=out, env_kwargs=kwargs, seeds=(0, 1), progress=False, device="cpu")
    for name in ("results.csv", "results.md", "pareto.png", "keep_ratios.png", "reward_curves.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    runs = {(r["method"], int(r["seed"])): r for r in rows}
    methods = ("uniform", "random_search", "ppo", "ppo_best")
    assert set(runs) == {("unpruned", 0)} | {(m, s) for m in methods for s in (0, 1)}
    for r in (r for r in rows if r["kind"] != "reference"):
        assert r["status"] == "ok", r["error"]
        assert float(r["flops_ratio"]) <= 0.6 + 1e-9
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and float(r["speedup_b64"]) > 0
    assert float(runs["unpruned", 0]["flops_ratio"]) == 1.0
    # random search evaluates as many plans as the agent ran episodes
    for seed in (0, 1):
        assert float(runs["random_search", seed]["evaluations"]) == float(runs["ppo", seed]["evaluations"]) == 4
        # and its evaluations are a curve beside the agent's: the best of them is the plan it returned
        curve = _rows(out / "agents" / f"random_search-b0.6-s{seed}" / "episodes.csv")
        assert len(curve) == 4
        assert max(float(e["reward"]) for e in curve) == pytest.approx(
            float(runs["random_search", seed]["reward_acc_before_ft"]))
    # the reported accuracies are the test split's: the uniform plan, pruned and recalibrated, on the test split
    import gymnasium as gym

    from baselines import make_baseline

    env = gym.make("ChannelPrune-ResNet20-v0", budget=0.6, **kwargs, device="cpu").unwrapped
    plan = make_baseline("uniform", env).setup().ratios
    kept, rt = env.cost.plan_counts(plan)
    net = env.build_pruned(kept, rt)
    env.recalibrate_bn(net)
    assert float(runs["uniform", 0]["test_acc_before_ft"]) == pytest.approx(env.evaluate(net, "test")[0], abs=1e-9)
    assert float(runs["uniform", 0]["reward_acc_before_ft"]) == pytest.approx(env.evaluate(net, "reward")[0],
                                                                               abs=1e-9)
    # every row names the machines its timings come from; on the CPU there is no separate device latency
    from envs.machine import backend

    for r in rows:
        assert r["device"] == "cpu" and r["machine"] == backend("cpu").machine != ""
        assert r["cpu_machine"] == r["machine"]
        assert r["latency_b64_ms_device"] == "" and float(r["latency_b64_ms"]) > 0
    md = (out / "results.md").read_text()
    assert "| uniform | 0.60 | 2 |" in md and "| ppo_best | 0.60 | 2 |" in md
    summary = {s["method"]: s for s in bm.summarize(rows)}
    assert summary["ppo"]["vs_random_search"] in (">", "<", "tie")
    assert summary["ppo"]["vs_scripted"].endswith("uniform")  # random search is the control, not a scripted row
    assert f"CPU latency on: {backend('cpu').machine}." in md and "latency b64 device" not in md

    # a rerun does not redo finished rows: any attempt to evaluate a plan again would fail loudly
    def boom(*a, **k):
        raise AssertionError("finished row was recomputed")

    monkeypatch.setattr(bm, "evaluate_plan", boom)
    rows2 = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform", "random_search"], ["ppo"], episodes=4,
                         finetune_steps=3, out=out, env_kwargs=kwargs, seeds=(0, 1), progress=False)
    assert len(rows2) == len(rows)


def test_a_crashing_method_is_recorded_and_does_not_stop_the_others(tiny_gym_kwargs, tmp_path, monkeypatch):
    from baselines import base

    class Broken(base.Baseline):
        def plan(self):
            raise RuntimeError("planned failure")

    monkeypatch.setitem(base.REGISTRY, "broken", Broken)
    out = tmp_path / "r"
    rows = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["broken", "uniform"], [], episodes=1, finetune_steps=0,
                        out=out, env_kwargs=tiny_gym_kwargs, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["broken"]["status"] == "error" and "planned failure" in by["broken"]["error"]
    assert by["uniform"]["status"] == "ok"


def test_cli_rejects_unknown_baseline(tmp_path):
    with pytest.raises(SystemExit):
        bm.main(["--baselines", "nope", "--out", str(tmp_path)])


def _fake_row(method: str, kind: str, budget: float, seed: int, acc: float, status: str = "ok") -> dict:
    return {"method": method, "kind": kind, "budget": budget, "seed": seed, "status": status, "test_acc": acc,
            "test_acc_before_ft": acc - 0.1, "reward_acc_before_ft": acc - 0.1, "flops_ratio": budget,
            "effective_flops_ratio": budget, "params_ratio": budget, "speedup_b64": 1.5, "evaluations": 1,
            "keep_ratios": "[0.5, 0.5]"}


def test_agents_are_compared_with_every_search_and_searches_are_not_scripted_rows():
    rows = [_fake_row(m, kind, 0.5, seed, acc + 0.01 * seed) for seed in range(3) for m, kind, acc in (
        ("ppo", "agent", 0.80), ("random_search", "baseline", 0.70), ("random_search_anchored", "baseline", 0.85))]
    rows.append(_fake_row("uniform", "baseline", 0.5, 0, 0.60))
    summary = {s["method"]: s for s in bm.summarize(rows)}
    assert summary["ppo"]["vs_random_search"] == ">; < random_search_anchored"
    assert summary["ppo"]["vs_scripted"] == "n/a uniform"  # the searches are controls, not the best scripted row


def test_merge_gathers_split_runs_into_one_report(tmp_path):
    """Cells run apart (one process per budget and seed) become one report with intervals over the seeds."""
    a, b = tmp_path / "b0.5-s0", tmp_path / "b0.5-s1"
    for d, seed, acc in ((a, 0, 0.80), (b, 1, 0.84)):
        d.mkdir()
        bm.append_row(d / "results.csv", _fake_row("unpruned", "reference", 1.0, 0, 0.92))
        bm.append_row(d / "results.csv", _fake_row("l1", "baseline", 0.5, seed, acc))
    bm.append_row(b / "results.csv", _fake_row("l1", "baseline", 0.5, 0, 0.0, status="error"))  # a failed rerun
    (a / "agents" / "ppo-b0.5-s0").mkdir(parents=True)
    (a / "agents" / "ppo-b0.5-s0" / "episodes.csv").write_text("episode,reward\n1,0.5\n2,0.7\n")
    out = tmp_path / "merged"
    assert bm.main(["--merge", str(a), str(b), "--out", str(out), "--finetune-steps", "800"]) == 0
    rows = _rows(out / "results.csv")
    assert sorted((r["method"], r["seed"], r["status"]) for r in rows) == [
        ("l1", "0", "ok"), ("l1", "1", "ok"), ("unpruned", "0", "ok")]  # one unpruned row; ok beats error
    md = (out / "results.md").read_text()
    assert "fine-tune: 800 steps" in md and "| l1 | 0.50 | 2 | 0.8200 [" in md  # mean and interval of 2 seeds
    for name in ("pareto.png", "keep_ratios.png", "reward_curves.png"):
        assert (out / name).stat().st_size > 0, name
    with pytest.raises(SystemExit):
        bm.main(["--merge", str(tmp_path / "empty"), "--out", str(out)])


def test_a_grid_run_without_timing_is_retimed_serially_afterwards(tiny_gym_kwargs, tmp_path):
    """``--latency none`` then ``retime``: every pruned row gets its exported net's latency, equal plans (uniform
    over seeds) are timed once, and the unpruned reference is timed too."""
    out = tmp_path / "r"
    rows = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform", "random"], [], episodes=1, finetune_steps=0,
                        out=out, env_kwargs=tiny_gym_kwargs, seeds=(0, 1), progress=False, device="cpu",
                        latency="none")
    assert all(r["latency_b64_ms"] == r["speedup_b64"] == "" for r in rows)
    rows = bm.retime(out, "ChannelPrune-ResNet20-v0", 0, "cpu", tiny_gym_kwargs)
    by = {(r["method"], r["seed"]): r for r in rows}
    assert len(by) == 5 and all(float(r["latency_b64_ms"]) > 0 for r in rows)
    assert float(by["unpruned", "0"]["speedup_b64"]) == 1.0
    assert by["uniform", "0"]["latency_b64_ms"] == by["uniform", "1"]["latency_b64_ms"]  # one plan, timed once
    assert by["random", "0"]["keep_ratios"] != by["random", "1"]["keep_ratios"]
    assert by["random", "0"]["latency_b64_ms"] != by["random", "1"]["latency_b64_ms"]
    assert "speed-up CPU" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="retime"):
        bm.retime(out, "ChannelPrune-ResNet20-v0", 0, "none", tiny_gym_kwargs)


def test_an_older_results_csv_gets_the_new_columns(tmp_path):
    path = tmp_path / "results.csv"
    old_fields = [f for f in bm.FIELDS if f not in ("latency_b64_ms_device", "speedup_b64_device", "device",
                                                      "machine", "cpu_machine")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({"method": "l1", "kind": "baseline", "budget": 0.5, "status": "ok", "latency_b64_ms": 3.0})
    bm.append_row(path, {"method": "uniform", "kind": "baseline", "budget": 0.5, "status": "ok",
                          "machine": "some CPU", "latency_b64_ms": 2.0})
    rows = _rows(path)
    assert list(rows[0]) == bm.FIELDS
    assert [(r["method"], r["latency_b64_ms"], r["machine"]) for r in rows] == [("l1", "3.0", ""),
                                                                                ("uniform", "2.0", "some CPU")]


def test_device_conflicts_and_missing_gpus_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="differs"):
        bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform"], [], episodes=1, finetune_steps=0,
                     out=tmp_path / "a", env_kwargs={"device": "cpu"}, device="cuda")
    with pytest.raises(SystemExit):
        bm.main(["--baselines", "uniform", "--device", "cpu", "--env-kwargs", "device=cuda", "--out",
                 str(tmp_path / "b")])
    with pytest.raises(ValueError, match="latency='gpu' is not allowed"):
        bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform"], [], episodes=1, finetune_steps=0,
                     out=tmp_path / "e", device="cpu", latency="gpu")
    assert not (tmp_path / "e").exists()  # checked before anything is built or written
    with pytest.raises(ValueError, match="latency_rounds=0"):
        bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform"], [], episodes=1, finetune_steps=0,
                     out=tmp_path / "f", device="cpu", latency_rounds=0)
    assert not (tmp_path / "f").exists()
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="no CUDA GPU"):
        bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform"], [], episodes=1, finetune_steps=0,
                     out=tmp_path / "c", device="cuda")
    assert not (tmp_path / "c").exists()  # nothing written
    with pytest.raises(SystemExit):
        bm.main(["--baselines", "uniform", "--device", "cuda", "--out", str(tmp_path / "d")])


def test_latency_rounds_reach_the_timing_of_every_exported_net(tiny_gym_kwargs, tmp_path, monkeypatch):
    rounds = []
    real = bm.compare_latency

    def spy(*args, **kwargs):
        rounds.append(kwargs["rounds"])
        return real(*args, **{**kwargs, "repeats": 1})

    monkeypatch.setattr(bm, "compare_latency", spy)
    rows = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform", "l1"], [], episodes=1, finetune_steps=0,
                        out=tmp_path, env_kwargs=tiny_gym_kwargs, progress=False, device="cpu", latency_rounds=2)
    assert rounds == [2, 2] and all(float(r["speedup_b64"]) > 0 for r in rows)


def test_intervals_and_comparisons_over_seeds():
    from baselines.experiments.stats import compare, estimate

    e = estimate([1.0, 2.0, 3.0])  # mean 2, sem 1/sqrt(3), t(0.975, 2) = 4.3027
    assert e.mean == 2.0 and e.n == 3
    assert e.low == pytest.approx(2 - 4.302653 / 3 ** 0.5, abs=1e-5) and e.high == pytest.approx(4 - e.low)
    one = estimate([0.9])
    assert one.n == 1 and one.text() == "0.9000" and compare(one, e) == "n/a"
    assert compare(estimate([10.0, 10.1, 10.2]), e) == ">" and compare(e, estimate([10.0, 10.1, 10.2])) == "<"
    assert compare(estimate([2.5, 3.5, 1.5]), e) == "tie"  # overlapping intervals: a tie, whatever the means
    assert estimate([float("nan"), 1.0, 1.0]).text() == "1.0000 [1.0000, 1.0000]"


def test_fidelity_correlates_the_reward_with_test_accuracy_after_fine_tuning(tiny_gym_kwargs, tmp_path):
    import gymnasium as gym

    env = gym.make("ChannelPrune-ResNet20-v0", budget=0.5, **tiny_gym_kwargs).unwrapped
    res = bm.fidelity(env, 4, 2, tmp_path, seed=1, progress=False)
    lines = _rows(tmp_path / "fidelity.csv")
    assert res["plans"] == len(lines) == 4
    from scipy.stats import spearmanr

    rho = spearmanr([float(x["reward_acc_before_ft"]) for x in lines], [float(x["test_acc"]) for x in lines])
    assert res["spearman"] == pytest.approx(rho.statistic)
    # the scores are the env's own: a plan replayed through the env gets the same reward-split accuracy
    from baselines.random_search import RandomSearch

    first = RandomSearch(env, seed=1, samples=4).setup().history[0]
    assert float(lines[0]["reward_acc_before_ft"]) == pytest.approx(first["reward_accuracy"])
    with pytest.raises(ValueError, match="at least 3"):
        bm.fidelity(env, 2, 0, tmp_path)
