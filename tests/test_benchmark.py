"""The benchmark end to end on the tiny env: two baselines and one agent, one budget; resume skips done rows."""

from __future__ import annotations

import csv

import pytest

from baselines import benchmark as bm


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_benchmark_writes_everything_and_resumes(tiny_gym_kwargs, tmp_path, monkeypatch):
    out = tmp_path / "results"
    kwargs = {**tiny_gym_kwargs, "importance_samples": 8}
    rows = bm.benchmark("ChannelPrune-ResNet20", [0.6], ["uniform", "l1"], ["ppo"], episodes=6, finetune_steps=3,
                        out=out, env_kwargs=kwargs, progress=False)
    for name in ("results.csv", "results.md", "pareto.png", "keep_ratios.png", "reward_curves.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    by = {r["method"]: r for r in rows}
    assert set(by) == {"unpruned", "uniform", "l1", "ppo"}
    for name in ("uniform", "l1", "ppo"):
        r = by[name]
        assert r["status"] == "ok", r["error"]
        assert float(r["flops_ratio"]) <= 0.6 + 1e-9
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and float(r["speedup_b64"]) > 0
    assert float(by["unpruned"]["flops_ratio"]) == 1.0
    md = (out / "results.md").read_text()
    assert "| uniform |" in md and "| ppo |" in md

    # a rerun does not redo finished rows: any attempt to evaluate a plan again would fail loudly
    def boom(*a, **k):
        raise AssertionError("finished row was recomputed")

    monkeypatch.setattr(bm, "evaluate_plan", boom)
    rows2 = bm.benchmark("ChannelPrune-ResNet20", [0.6], ["uniform", "l1"], ["ppo"], episodes=6, finetune_steps=3,
                         out=out, env_kwargs=kwargs, progress=False)
    assert len(rows2) == len(rows)


def test_a_crashing_method_is_recorded_and_does_not_stop_the_others(tiny_gym_kwargs, tmp_path, monkeypatch):
    from baselines import base

    class Broken(base.Baseline):
        def plan(self):
            raise RuntimeError("planned failure")

    monkeypatch.setitem(base.REGISTRY, "broken", Broken)
    out = tmp_path / "r"
    rows = bm.benchmark("ChannelPrune-ResNet20", [0.6], ["broken", "uniform"], [], episodes=1, finetune_steps=0,
                        out=out, env_kwargs=tiny_gym_kwargs, progress=False)
    by = {r["method"]: r for r in rows}
    assert by["broken"]["status"] == "error" and "planned failure" in by["broken"]["error"]
    assert by["uniform"]["status"] == "ok"


def test_cli_rejects_unknown_baseline(tmp_path):
    with pytest.raises(SystemExit):
        bm.main(["--baselines", "nope", "--out", str(tmp_path)])
