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
    rows = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform", "l1"], ["ppo"], episodes=6, finetune_steps=3,
                        out=out, env_kwargs=kwargs, progress=False, device="cpu")
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
    # every row names the machines its timings come from; on the CPU there is no separate device latency
    from envs.machine import backend

    for r in rows:
        assert r["device"] == "cpu" and r["machine"] == backend("cpu").machine != ""
        assert r["cpu_machine"] == r["machine"]
        assert r["latency_b64_ms_device"] == "" and float(r["latency_b64_ms"]) > 0
    md = (out / "results.md").read_text()
    assert "| uniform |" in md and "| ppo |" in md
    assert f"CPU latency on: {backend('cpu').machine}." in md and "latency b64 device" not in md

    # a rerun does not redo finished rows: any attempt to evaluate a plan again would fail loudly
    def boom(*a, **k):
        raise AssertionError("finished row was recomputed")

    monkeypatch.setattr(bm, "evaluate_plan", boom)
    rows2 = bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform", "l1"], ["ppo"], episodes=6, finetune_steps=3,
                         out=out, env_kwargs=kwargs, progress=False)
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


def test_an_older_results_csv_gets_the_new_columns(tmp_path):
    path = tmp_path / "results.csv"
    old_fields = [f for f in bm.FIELDS if f not in ("latency_b64_ms_device", "speedup_b64_device", "device",
                                                      "machine", "cpu_machine")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({"method": "l1", "kind": "baseline", "budget": 0.5, "status": "ok", "latency_b64_ms": 3.0})
    bm._append_row(path, {"method": "uniform", "kind": "baseline", "budget": 0.5, "status": "ok",
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
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="no CUDA GPU"):
        bm.benchmark("ChannelPrune-ResNet20-v0", [0.6], ["uniform"], [], episodes=1, finetune_steps=0,
                     out=tmp_path / "c", device="cuda")
    assert not (tmp_path / "c").exists()  # nothing written
    with pytest.raises(SystemExit):
        bm.main(["--baselines", "uniform", "--device", "cuda", "--out", str(tmp_path / "d")])
