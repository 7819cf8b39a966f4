"""Portability: the paths that crash native kernels on some CPUs run in a subprocess, so a crash fails one test.

torch 2.15's oneDNN AVX2 kernels abort ("double free or corruption"), segfault or hang in channels-last backward
of 1x1 stride-2 convolutions with a few input channels (AMD EPYC, AVX2 only). ``envs.machine`` probes for that and
trains contiguous there. These tests run pretraining's step, the common fine-tune and the evaluator on networks
with exactly such layers (tiny odd channel counts before stride-2 1x1 shortcuts), each in a fresh interpreter
with a timeout. ``.ci/run`` runs this file a second time with ``ONEDNN_MAX_CPU_ISA=AVX2``, so CI on an AVX-512
machine covers the AVX2 code path too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from envs.episodes import run_actions
from envs.machine import backend, resolve_device
from envs.paths import CACHE_ENV

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 420

# A ResNet-18 at width 1/16: a 4-channel stem feeding a 1x1 stride-2 shortcut to 8 channels (the crashing shape).
PRELUDE = """
import dataclasses, torch
from envs.data import load_dataset, Split
data = load_dataset(reward_size=256, calib_size=128)
data = dataclasses.replace(data, test=Split(data.test.x[:256], data.test.y[:256]),
                           train=Split(data.train.x[:512], data.train.y[:512]))
"""

SCRIPTS = {
    "pretraining step": """
from envs.pretrain import Recipe, train
model, meta = train("resnet18", data, width=0.0625, recipe=Recipe(epochs=1, batch_size=64), progress=False)
assert 0.0 <= meta["test_accuracy"] <= 1.0
print("memory format", meta["train_memory_format"])
""",
    "fine-tune and evaluator on a pruned net": """
import numpy as np
from envs.finetune import finetune
from envs.groups import GroupGraph
from envs.models import build_model
from envs.pretrain import evaluate
torch.manual_seed(0)
model = build_model("resnet18", 10, 1, width=0.125).eval()
graph = GroupGraph(model, data.example_input(1))
# odd counts: 3, 5, 7 ... channels left before every stride-2 1x1 shortcut
keep = [np.arange(max(1, (g.num_channels // 2) - 1) | 1) for g in graph.groups]
pruned = graph.prune_copy(keep)
acc0, _ = evaluate(pruned, data.reward)
finetune(pruned, data, steps=12, batch_size=32, progress=False)
acc1, loss1 = evaluate(pruned, data.reward)
assert np.isfinite(loss1) and 0.0 <= acc1 <= 1.0
acc2, _ = evaluate(pruned, data.reward, precision="fp32")
print("accuracy", acc0, acc1, acc2)
""",
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the subprocesses: the machine probe runs once, not once per script."""
    return tmp_path_factory.mktemp("portability-cache")


def run_isolated(code: str, cache: Path, threads: int) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path, **{CACHE_ENV: str(cache)})
    script = PRELUDE + f"torch.set_num_threads({threads})\n" + textwrap.dedent(code) + "print('ok')\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=ROOT)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_risky_paths_survive_in_a_subprocess(name, threads, shared_cache):
    try:
        proc = run_isolated(SCRIPTS[name], shared_cache, threads)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} ({threads} thread(s)) hung for more than {TIMEOUT_S} s on "
                    f"{backend('cpu').machine}")
    died = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else \
        f"exit code {proc.returncode}"
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"{name} ({threads} thread(s)) failed natively on this CPU ({died}); the machine probe chose "
        f"{json.dumps(backend('cpu').probe)} (overrides: CHANNELPRUNE_TRAIN_FORMAT="
        f"{os.environ.get('CHANNELPRUNE_TRAIN_FORMAT', '')!r}); stderr tail:\n{proc.stderr[-2000:]}")


def test_probe_never_picks_what_crashed():
    be = backend("cpu")
    probe = be.probe
    assert probe["machine"] in be.machine
    # a path the probe saw crash is never chosen
    if not probe["train_channels_last_safe"]:
        assert not be.train_channels_last
    if not probe["eval_channels_last_safe"]:
        assert not be.eval_channels_last
    if be.bf16:
        assert probe.get("eval_bf16_safe") and probe.get("train_bf16_safe")
    # the choice is the faster of the safe candidates that were timed
    for tag, cl in (("eval", be.eval_channels_last), ("train", be.train_channels_last)):
        times = probe[f"{tag}_seconds_per_batch"]
        chosen = "channels_last/fp32" if cl else "contiguous/fp32"
        assert times[chosen] == min(v for k, v in times.items() if k.endswith("fp32"))


def test_format_override(monkeypatch):
    monkeypatch.setenv("CHANNELPRUNE_TRAIN_FORMAT", "contiguous")
    monkeypatch.setenv("CHANNELPRUNE_EVAL_FORMAT", "channels_last")
    be = backend("cpu")
    assert not be.train_channels_last and be.eval_channels_last
    assert be.memory_format(training=True) == torch.contiguous_format
    monkeypatch.setenv("CHANNELPRUNE_TRAIN_FORMAT", "nhwc")
    with pytest.raises(ValueError, match="CHANNELPRUNE_TRAIN_FORMAT.*nhwc.*channels_last, contiguous"):
        backend("cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='tpu'.*allowed"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device=3"):
        resolve_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:0")


_episode = run_actions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["static", "runtime"])
def test_cuda_episode_matches_cpu(make_env, mode):
    """The same episode on CPU and GPU: the same keep sets, accuracies within 0.2 points (float32 evaluators on
    both: the tiny model is near chance, so bf16 rounding flips near-tied logits; fp32 on CUDA turns TF32 off)."""
    cpu = make_env(device="cpu", mode=mode, scorer="l1", eval_precision="fp32")
    gpu = make_env(device="cuda", mode=mode, scorer="l1", eval_precision="fp32")
    assert gpu.device.type == "cuda" and cpu.device.type == "cpu"
    rng = np.random.default_rng(0)
    for _ in range(3):
        actions = [rng.uniform(-1, 1, cpu.action_space.shape).astype(np.float32) for _ in range(cpu.n_groups)]
        a, b = _episode(cpu, actions), _episode(gpu, actions)
        assert a["kept_channels"] == b["kept_channels"] and a["runtime_ratios"] == b["runtime_ratios"]
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.002
    # the base model stays on the CPU, untouched
    assert all(p.device.type == "cpu" for p in gpu.base_model.parameters())
