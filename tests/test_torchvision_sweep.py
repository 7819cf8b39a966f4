"""Any CNN torchvision ships, or a clear refusal.

Each model, adapted to the data (1 input channel, 10 classes: the ``tv:<name>`` adapter of ``envs.models``), either
runs one static and one runtime episode whose analytic MACs equal ``FlopCounterMode``'s count on the physically
pruned network (and, in runtime mode, the effective MACs equal the count on the sparse executor), or is refused
at construction with an ``UnsupportedModelError`` naming the layer. Anything else fails: a crash mid-episode, a
MAC mismatch, a refusal without a layer.

The sweep is slow (``pytest -m slow tests/test_torchvision_sweep.py -s`` prints the README table); the fast tests
run the same checks on a tiny DenseNet-style concatenating CNN and on tiny channel-shuffle / channel-split nets.
``CHANNELPRUNE_SWEEP=all`` sweeps every model of ``torchvision.models.list_models`` instead of the representative
set (the giants take minutes each to build).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision
from conftest import masked_forward
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from envs.channel_prune import ChannelPruneEnv
from envs.cost import count_macs
from envs.data import DatasetSplits, Split
from envs.groups import GroupGraph, UnsupportedModelError
from envs.models import build_model


# --------------------------------------------------------------------------------------------------- tiny models
class DenseNetLike(nn.Module):
    """Two DenseNet layers (BN -> ReLU -> conv over the concatenation of every earlier map) and a transition."""

    def __init__(self, growth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        c = 8
        for _ in range(2):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1, bias=False),
                                             nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, growth, 3, padding=1)))
            c += growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 12, 1), nn.AvgPool2d(2))
        self.norm = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        x = torch.relu(self.norm(self.transition(torch.cat(feats, 1))))
        return self.fc(x.mean((2, 3)))


class ShuffleUnit(nn.Module):
    """A ShuffleNet-style unit: a conv, then the channel shuffle (its grouped 1x1 convs made plain)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.unit = ShuffleUnit(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.unit(torch.relu(self.stem(x))).mean((2, 3)))


class ChannelSplit(nn.Module):
    """Half of a conv's channels go to another conv, half around it (ShuffleNet V2's stride-1 split)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.conv1(x)).chunk(2, dim=1)
        return self.fc(torch.cat([a, torch.relu(self.branch(b))], 1).mean((2, 3)))


# --------------------------------------------------------------------------------------------------- helpers
def synthetic_data(size: int, n: int = 32, seed: int = 0) -> DatasetSplits:
    """Random images and labels: the episode's mechanics, not its accuracy, are under test."""
    gen = torch.Generator().manual_seed(seed)

    def split(k: int) -> Split:
        return Split(torch.randn(k, 1, size, size, generator=gen), torch.randint(0, 10, (k,), generator=gen))

    return DatasetSplits("synthetic", split(n), split(n), split(n), split(8), 10, (0.0,), (1.0,), 0)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like BN statistics (BN(0) != 0), so a wrongly kept or dropped channel changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def per_example_macs(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2 / len(x)


def run_episode(model: nn.Module, size: int, mode: str, seed: int = 0) -> tuple[ChannelPruneEnv, dict]:
    """One episode of seeded random actions; checks the analytic MACs against FlopCounterMode."""
    env = ChannelPruneEnv(model=model, example_input=torch.zeros(1, 1, size, size), data=synthetic_data(size),
                          scorer="l1", mode=mode, budget=0.5, importance_samples=2, eval_precision="fp32",
                          runtime_gates="ridge", device="cpu", progress=False)  # counting MACs: any gates do
    env.reset(seed=seed)
    env.action_space.seed(seed)
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(env.action_space.sample())
    assert np.isfinite(reward) and 0.0 <= info["accuracy"] <= 1.0
    kept = info["kept_counts"]
    x1 = torch.zeros(1, 1, size, size)
    pruned = env.graph.prune_copy(env.kept_channels(kept))
    assert count_macs(pruned, x1) == env.graph.macs(kept) == round(info["flops_ratio"] * env.graph.base_macs)
    assert info["flops_ratio"] <= 0.5 + 1e-9 or mode == "runtime"
    if mode == "runtime":
        rt = [round(r * k) for r, k in zip(info["runtime_ratios"], kept)]
        sparse = env.build_pruned(kept, rt, sparse=True)
        x = env.data.reward.x[:4]
        effective = info["effective_flops_ratio"] * env.graph.base_macs
        assert per_example_macs(sparse, x) == pytest.approx(effective, rel=1e-9)
        assert info["effective_flops_ratio"] <= 0.5 + 1e-9
    return env, info


# --------------------------------------------------------------------------------------------------- fast tests
X32 = torch.zeros(1, 1, 32, 32)


def test_concatenation_groups_prune_cost_and_mask_exactly():
    """Each group's kept channels are mapped into every reader's offsets in the concatenation; the shared BNs over
    the concatenation shrink with it, and their masks zero exactly the group's positions."""
    torch.manual_seed(0)
    model = randomize_bn(DenseNetLike())
    graph = GroupGraph(model, X32)
    by_name = {g.name: g for g in graph.groups}
    stem = by_name["stem"]
    assert stem.consumers == ["layers.0.2", "layers.1.2", "transition.2"]  # every reader of the concatenations
    # the first layer's BN normalizes the stem alone (a one-map concatenation); the later ones are shared
    assert stem.bns == ["layers.0.0"] and stem.shared == ["layers.1.0", "transition.0"]
    assert graph.input_group("layers.1.2") is None  # a concatenation of several groups
    assert sorted(graph.input_groups("transition.2")) == sorted(
        by_name[n].index for n in ("stem", "layers.0.5", "layers.1.5"))
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep = [np.sort(rng.choice(g.num_channels, int(rng.integers(1, g.num_channels + 1)), replace=False))
                for g in graph.groups]
        kept = [len(k) for k in keep]
        pruned = graph.prune_copy(keep)
        assert graph.macs(kept) == count_macs(pruned, X32)
        assert graph.params(kept) == sum(p.numel() for p in pruned.parameters())
        assert pruned.get_submodule("transition.2").in_channels == graph.width("transition.2", kept)
        # the pruned layer's weight is the base one at the kept positions (rows: its own group; columns: the
        # concatenation of three groups)
        rows = torch.as_tensor(graph.kept_positions("transition.2", keep, axis="out"))
        cols = torch.as_tensor(graph.kept_positions("transition.2", keep, axis="in"))
        torch.testing.assert_close(pruned.get_submodule("transition.2").weight,
                                   model.get_submodule("transition.2").weight[rows][:, cols])
        masked = masked_forward(graph, model, keep, x)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)


def test_concatenating_cnn_runs_static_and_runtime_episodes():
    torch.manual_seed(0)
    model = randomize_bn(DenseNetLike())
    _, info = run_episode(model, 32, "static")
    assert info["flops_ratio"] <= 0.5 + 1e-9
    env, info = run_episode(model, 32, "runtime")
    # gated: conv -> BN -> conv chains whose producer reads the image or exactly one group. The first layer's
    # bottleneck reads the stem alone; the second's reads a concatenation, whose offsets its gate would need.
    assert [g.producers[0] for g, on in zip(env.groups, env.gated) if on] == ["layers.0.2"]


@pytest.mark.parametrize("net,pattern", [
    (ChannelShuffle, r"layer 'unit' \(ShuffleUnit\) reshapes its channels .* channel shuffle"),
    (ChannelSplit, r"layer '(conv1|branch)' .*only in part.*split"),
])
def test_channel_regrouping_is_refused_at_construction(net, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        ChannelPruneEnv(model=net(), example_input=X32, data=synthetic_data(32), scorer="l1", progress=False,
                        device="cpu")


def test_training_only_layers_are_refused_by_name():
    model = build_model("tv:googlenet", num_classes=10, in_channels=1)
    pattern = r"layer 'aux1\.conv\.conv'.*only in training mode.*aux_logits"
    with pytest.raises(UnsupportedModelError, match=pattern):
        GroupGraph(model, X32)


# --------------------------------------------------------------------------------------------------- the sweep
def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: build_model(f"tv:{name}", num_classes=10, in_channels=1)


def _no_aux(name: str) -> Callable[[], nn.Module]:
    """googlenet / inception_v3 as torchvision builds them with aux_logits=False (the adapter keeps the heads)."""

    def build() -> nn.Module:
        model = build_model(f"tv:{name}", num_classes=10, in_channels=1)
        model.aux_logits = False
        if name == "googlenet":
            model.aux1 = model.aux2 = None
        else:
            model.AuxLogits = None
        return model

    return build


@dataclass
class Case:
    label: str
    build: Callable[[], nn.Module]
    size: int = 32  # the smallest input (of 32, 64, 75, 224) the model accepts


_SIZES = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, **{n: 224 for n in (
    "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32")}}
REPRESENTATIVE = (
    "resnet18", "resnet50", "wide_resnet50_2", "vgg11_bn", "alexnet", "densenet121", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x0_5", "squeezenet1_0", "squeezenet1_1",
    "efficientnet_b0", "efficientnet_v2_s", "mnasnet0_5", "regnet_x_400mf", "regnet_y_400mf", "googlenet",
    "inception_v3", "resnext50_32x4d", "convnext_tiny", "swin_t", "vit_b_16", "maxvit_t",
)


def _cases() -> list[Case]:
    names = torchvision.models.list_models(module=torchvision.models)
    chosen = names if os.environ.get("CHANNELPRUNE_SWEEP") == "all" else [n for n in REPRESENTATIVE if n in names]
    cases = [Case(n, _tv(n), _SIZES.get(n, 32)) for n in chosen]
    cases += [Case(f"{n} (aux_logits=False)", _no_aux(n), _SIZES.get(n, 32))
              for n in ("googlenet", "inception_v3")]
    cases.append(Case("DenseNet-style concat net (tests)", DenseNetLike))
    return cases


ROWS: list[tuple[str, str, str, str, str]] = []


@pytest.fixture(scope="module")
def sweep_table():
    """Prints the README table when the module's tests are done (visible with ``pytest -s``)."""
    yield ROWS
    if ROWS:
        lines = ["| model | input | groups | static episode | runtime episode (gated groups) |",
                 "|---|---|---|---|---|"]
        lines += [f"| {' | '.join(r)} |" for r in ROWS]
        print("\n\n" + "\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.label)
def test_torchvision_model_runs_or_is_refused_at_construction(case: Case, sweep_table):
    torch.manual_seed(0)
    model = case.build()
    t0 = time.perf_counter()
    try:
        env, info = run_episode(model, case.size, "static")
    except UnsupportedModelError as exc:
        msg = str(exc)
        sweep_table.append((case.label, f"{case.size}", "-", f"refused: {msg.split('; allowed:')[0]}", "-"))
        assert "layer '" in msg, f"a refusal must name the layer: {msg}"
        return
    static = f"ok, flops {info['flops_ratio']:.2f} ({time.perf_counter() - t0:.0f} s)"
    t0 = time.perf_counter()
    renv, rinfo = run_episode(model, case.size, "runtime")
    runtime = (f"ok ({sum(renv.gated)} gated), effective flops {rinfo['effective_flops_ratio']:.2f} "
               f"({time.perf_counter() - t0:.0f} s)")
    sweep_table.append((case.label, f"{case.size}", f"{env.n_groups}", static, runtime))
