"""envs.export (physical export of a plan), its CLI baselines.experiments.export and envs.finetune (the common
fine-tuning recipe), on the tiny env."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from baselines.experiments.export import export_baseline, main
from envs.channel_prune import ChannelPruneEnv
from envs.data import Split
from envs.export import (
    CONFIG_FILE,
    ONNX_FILE,
    REPORT_FILE,
    WEIGHTS_FILE,
    channel_config,
    export_policy,
    export_pruned,
    load_exported,
    load_policy,
    rebuild,
    replay,
)
from envs.finetune import finetune
from envs.models import build_model

FAST = dict(test_accuracy=False, latency_repeats=0, onnx=False)
PLAN = [1.0, 0.5, 0.8, 0.4, 0.9, 0.6, 0.7, 0.3, 1.0, 0.5, 0.6, 0.4]  # keep ratios for the 12 groups


def _plain_json(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain_json(v) for v in obj)
    return isinstance(obj, (str, int, float, bool, type(None)))


def _train_loss(model, data, n=512) -> float:
    with torch.no_grad():
        model.eval()
        return F.cross_entropy(model(data.train.x[:n]), data.train.y[:n]).item()


# ---------------------------------------------------------------------------------------------- export
def test_export_roundtrip_matches_env(make_env, tiny_setup, tmp_path):
    data = copy.copy(tiny_setup[1])
    data.test = Split(data.test.x[:1000], data.test.y[:1000])  # the test accuracy on a tenth of the test set
    env = make_env(budget=0.5, data=data)
    info = replay(env, PLAN)
    kept = info["kept_counts"]
    out = tmp_path / "model"
    report = export_pruned(env, kept, out, test_accuracy=True, latency_repeats=2, onnx=False)
    assert {CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE} <= {p.name for p in out.iterdir()}

    # rebuilt from config + weights == the env's pruned network after BN recalibration
    ref = env.build_pruned(kept)
    env.recalibrate_bn(ref)
    model = load_exported(out)
    x = env.data.reward.x[:64]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    # the exported model's reward accuracy is the env's for this plan
    assert report["reward_accuracy"] == info["accuracy"] == report["env_accuracy"]
    assert env.evaluate(model)[0] == info["accuracy"]
    assert report["accuracy_matches_env"] is True

    # costs: the exported net's measured MACs are the env's cost model; it is smaller and (here) faster per batch
    assert report["macs_match_env_cost_model"] is True
    assert report["flops_ratio"] == pytest.approx(info["flops_ratio"], rel=1e-9)
    assert report["flops_ratio"] <= 0.5 + 1e-9
    assert report["flops_reduction"] == pytest.approx(1.0 / report["flops_ratio"])
    assert report["params"] < report["base_params"]
    assert 0.0 <= report["test_accuracy"] <= 1.0 and 0.0 <= report["base_test_accuracy"] <= 1.0
    for b in ("batch1", "batch64"):
        lat = report["latency"][b]
        assert lat["exported_s"] > 0 and lat["base_s"] > 0
        assert lat["speedup"] == pytest.approx(lat["base_s"] / lat["exported_s"])
    # every timing names its machine: the env's device, and the CPU (and threads) that timed the latency
    from envs.machine import backend

    assert report["device"] == str(env.device) and report["machine"] == backend(env.device).machine
    assert report["latency"]["device"] == "cpu" and report["latency"]["machine"] == backend("cpu").machine
    assert report["latency"]["threads"] == torch.get_num_threads()
    assert ("latency_device" in report) == (env.device.type == "cuda")  # a second latency block only for a GPU

    # config.json is plain JSON (no pickle) that records every conv / bn / linear's channels; weights are tensors
    raw = (out / CONFIG_FILE).read_bytes()
    assert raw.lstrip().startswith(b"{")
    config = json.loads(raw)
    assert _plain_json(config)
    assert config["modules"]["conv1"] == {"type": "Conv2d", "in": 1, "out": kept[0], "groups": 1}
    assert config["modules"]["fc"]["out"] == 10
    state = torch.load(out / WEIGHTS_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["kept_counts"] == kept and saved["reward_accuracy"] == report["reward_accuracy"]


def test_onnx_matches_torch(make_env, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    env = make_env(budget=0.4)
    info = replay(env, PLAN)
    report = export_pruned(env, info["kept_counts"], tmp_path, test_accuracy=False, latency_repeats=0, onnx=True)
    assert report["onnx"]["file"] == ONNX_FILE
    assert report["onnx"]["max_abs_diff_vs_torch"] < 1e-3
    model = load_exported(tmp_path)
    sess = ort.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch axis
        x = env.data.test.x[:batch]
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_export_policy_file_ratios_and_counts(make_env, tmp_path):
    env = make_env(budget=0.5)
    policy = {"env_id": "ChannelPrune-ResNet20-v0", "env_kwargs": {"width": 0.5, "budget": 0.5},
              "keep_ratios": PLAN, "min_keep": env.min_keep}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(policy))
    assert load_policy(path)["keep_ratios"] == PLAN
    rep = export_policy(path, tmp_path / "a", env=env, **FAST)
    info = replay(env, PLAN)  # what the env reports for the same plan
    assert rep["kept_counts"] == info["kept_counts"]
    assert rep["reward_accuracy"] == info["accuracy"]
    assert rep["source"]["file"] == str(path) and rep["onnx"]["file"] is None

    # exact counts: the same plan, fine-tuned for a few steps afterwards
    policy2 = dict(policy, kept_counts=info["kept_counts"])
    rep2 = export_policy(policy2, tmp_path / "b", env=env, finetune_steps=3, **FAST)
    assert rep2["pruned_reward_accuracy"] == info["accuracy"] == rep2["finetune"]["reward_accuracy_before"]
    assert rep2["finetune"]["reward_accuracy_after"] == rep2["reward_accuracy"]
    assert rep2["roundtrip_max_abs_diff"] < 1e-5

    # counts the env's budget wall would change are rejected, naming the plan
    with pytest.raises(ValueError, match="not a plan this env produces"):
        full = [g.num_channels for g in env.groups]
        export_policy(dict(policy, kept_counts=full), tmp_path / "c", env=env, **FAST)
    with pytest.raises(ValueError, match="kept_counts"):
        export_pruned(env, [4] * (env.n_groups - 1), tmp_path / "d", **FAST)


def test_cli_policy_builds_env_from_id(tiny_setup, tmp_path, capsys):
    ckpt, _ = tiny_setup
    policy = {"env_id": "ChannelPrune-ResNet20-v0", "env_kwargs": {"width": 0.5, "budget": 0.5, "reward_size": 500,
                                                                "calib_size": 256}, "keep_ratios": PLAN}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(policy))
    out = tmp_path / "m"
    rc = main(["--policy", str(path), "--out", str(out), "--env-kwargs", f"checkpoint={ckpt}", "--no-test",
               "--no-onnx", "--latency-repeats", "0", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / REPORT_FILE).read_text())
    assert summary["reward_accuracy"] == report["reward_accuracy"] == report["env_accuracy"]
    assert report["source"]["env_kwargs"]["checkpoint"] == ckpt
    assert report["source"]["env_kwargs"]["device"] == "auto"  # --device's default


def test_cli_device_errors(tiny_setup, tmp_path, capsys):
    ckpt, _ = tiny_setup
    args = ["--baseline", "uniform", "--env", "ChannelPrune-ResNet20-v0", "--out", str(tmp_path / "m"),
            "--no-test", "--no-onnx", "--latency-repeats", "0", "--quiet"]
    assert main(args + ["--device", "cpu", "--env-kwargs", "device=cuda"]) == 2
    assert "differs" in capsys.readouterr().err
    assert main(args + ["--device", "tpu"]) == 2
    assert "device='tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda", "--env-kwargs", f"checkpoint={ckpt}"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_export_baseline_plan(make_env, tmp_path):
    env = make_env(budget=0.5)
    rep = export_baseline("uniform", "ChannelPrune-ResNet20-v0", tmp_path, env=env, **FAST)
    assert rep["source"]["baseline"] == "uniform"
    assert rep["reward_accuracy"] == rep["env_accuracy"]
    assert rep["flops_ratio"] <= 0.5 + 1e-9
    ratios = np.array(rep["keep_ratios"])
    assert ratios.max() - ratios.min() < 0.2  # uniform: every group about the same fraction


def test_runtime_env_exports_static_network(make_env, tmp_path):
    env = make_env(mode="runtime", budget=0.6)
    rr = [0.6] * env.n_groups
    info = replay(env, PLAN, rr)
    rep = export_pruned(env, info["kept_counts"], tmp_path, runtime_ratios=rr, **FAST)
    assert "runtime" in rep["note"] and rep["env_effective_flops_ratio"] == info["effective_flops_ratio"]
    static = make_env(budget=1.0)  # the same static network: no gates
    ref = static.build_pruned(info["kept_counts"])
    static.recalibrate_bn(ref)
    assert rep["reward_accuracy"] == static.evaluate(ref)[0]
    assert rep["macs"] == env.graph.macs(info["kept_counts"])


def test_depthwise_model_roundtrip(tiny_setup, tmp_path):
    data = copy.copy(tiny_setup[1])  # small splits: MobileNetV2 keeps 28x28 maps in its first stages
    data.reward = Split(data.reward.x[:128], data.reward.y[:128])
    data.calib = Split(data.calib.x[:128], data.calib.y[:128])
    torch.manual_seed(0)
    net = build_model("mobilenetv2", data.num_classes, data.in_channels, width=0.25).eval()
    env = ChannelPruneEnv(model=net, data=data, scorer="l1", budget=0.6, progress=False)
    with pytest.raises(ValueError, match="zoo"):
        export_pruned(env, [g.num_channels for g in env.groups], tmp_path / "x", **FAST)
    info = replay(env, np.linspace(0.5, 1.0, env.n_groups))
    arch = {"model": "mobilenetv2", "width": 0.25}
    rep = export_pruned(env, info["kept_counts"], tmp_path / "m", arch=arch, **FAST)
    assert rep["reward_accuracy"] == info["accuracy"]
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    dw = {n: s for n, s in config["modules"].items() if s["type"] == "Conv2d" and s["groups"] > 1}
    assert dw and all(s["groups"] == s["in"] == s["out"] for s in dw.values())
    full = channel_config(build_model("mobilenetv2", data.num_classes, data.in_channels, width=0.25))
    assert any(s["out"] < full[n]["out"] for n, s in dw.items())  # some depthwise convs were pruned
    ref = env.build_pruned(info["kept_counts"])
    env.recalibrate_bn(ref)
    with torch.no_grad():
        x = data.reward.x[:8]
        torch.testing.assert_close(load_exported(tmp_path / "m")(x), ref(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs_give_clear_errors(make_env, tmp_path, capsys):
    # missing policy file
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope.json")
    assert main(["--policy", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # malformed policies
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(bad)
    bad.write_text(json.dumps({"env_id": "ChannelPrune-ResNet20-v0"}))
    with pytest.raises(ValueError, match="kept_counts' or 'keep_ratios"):
        load_policy(bad)
    bad.write_text(json.dumps({"keep_ratios": PLAN}))
    with pytest.raises(ValueError, match="env_id"):
        load_policy(bad)
    with pytest.raises(ValueError, match="env_id='NoSuchEnv-v0'"):
        export_policy({"env_id": "NoSuchEnv-v0", "keep_ratios": PLAN}, tmp_path / "o")
    # unknown baseline (checked before any env is built)
    assert main(["--baseline", "no-such-method", "--env", "ChannelPrune-ResNet20-v0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown baseline 'no-such-method'" in err and "uniform" in err
    assert main(["--baseline", "uniform", "--out", str(tmp_path)]) == 2
    assert "--env" in capsys.readouterr().err
    assert main(["--baseline", "uniform", "--env", "X", "--env-kwargs", "budget", "--out", str(tmp_path)]) == 2
    assert "key=value" in capsys.readouterr().err
    # bad ratios, counts, missing export files, tampered config
    env = make_env()
    for ratios in ([1.5] * env.n_groups, "abc", [0.5] * (env.n_groups + 1)):
        with pytest.raises(ValueError, match="keep_ratios"):
            replay(env, ratios)
    for counts in (None, ["a"] * env.n_groups, [2.5] * env.n_groups):
        with pytest.raises(ValueError, match="kept_counts"):
            export_pruned(env, counts, tmp_path / "z", **FAST)
    with pytest.raises(ValueError, match=r"kept_counts\[0\]"):
        export_pruned(env, [0] + [4] * (env.n_groups - 1), tmp_path / "z", **FAST)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_exported(tmp_path / "empty")
    out = tmp_path / "ok"
    export_pruned(env, replay(env, PLAN)["kept_counts"], out, **FAST)
    config = json.loads((out / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="format"):
        rebuild({**config, "format": "other"})
    wrong = copy.deepcopy(config)
    wrong["modules"]["conv1"]["type"] = "Linear"
    with pytest.raises(ValueError, match="conv1"):
        rebuild(wrong)
    wrong = copy.deepcopy(config)
    wrong["modules"]["conv1"]["out"] += 1  # shapes that do not fit the weights
    (out / CONFIG_FILE).write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="do not fit"):
        load_exported(out)


# ---------------------------------------------------------------------------------------------- finetune
def test_finetune_reduces_loss_and_is_deterministic(make_env):
    env = make_env(budget=0.5)
    info = replay(env, PLAN)
    pruned = env.build_pruned(info["kept_counts"])
    env.recalibrate_bn(pruned)
    small = copy.copy(env.data)
    small.train = Split(env.data.train.x[:4096], env.data.train.y[:4096])
    before = _train_loss(pruned, small)
    a = finetune(copy.deepcopy(pruned), small, steps=12, seed=0, progress=False)
    b = finetune(copy.deepcopy(pruned), small, steps=12, seed=0, progress=False)
    c = finetune(copy.deepcopy(pruned), small, steps=12, seed=1, progress=False)
    assert not a.training
    assert _train_loss(a, small) < before
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # the caller's RNG is untouched
    torch.manual_seed(123)
    r1 = torch.rand(3)
    torch.manual_seed(123)
    finetune(copy.deepcopy(pruned), small, steps=1, progress=False)
    assert torch.equal(torch.rand(3), r1)


@pytest.mark.parametrize("sparse", [False, True])
def test_finetune_gated_model(make_env, sparse):
    env = make_env(mode="runtime", budget=0.6)
    info = replay(env, [0.8] * env.n_groups, [0.5] * env.n_groups)
    rt = [round(r * k) for r, k in zip(info["runtime_ratios"], info["kept_counts"])]
    gated = env.build_pruned(info["kept_counts"], rt, sparse=sparse)
    env.recalibrate_bn(gated)
    w0 = {k: v.clone() for k, v in gated.state_dict().items()}
    out = finetune(gated, env.data, steps=2, batch_size=16, progress=False)
    assert out is gated and not out.training
    assert any(not torch.equal(w0[k], v) for k, v in out.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(out(env.data.reward.x[:8])).all()


def test_finetune_argument_errors(make_env):
    env = make_env()
    model = copy.deepcopy(env.base_model)
    bad = [({"steps": -1}, "steps"), ({"steps": 2, "lr": 0.0}, "lr"), ({"steps": 2, "momentum": 0.0}, "momentum"),
           ({"steps": 2, "batch_size": 0}, "batch_size")]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            finetune(model, env.data, progress=False, **kwargs)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    assert finetune(model, env.data, steps=0) is model
    assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items())
