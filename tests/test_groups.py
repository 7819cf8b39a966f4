"""envs.groups: the coupled channel groups, the exact analytic cost formulas, physical pruning vs. masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import masked_forward
from torch import nn

from envs.cost import count_macs, count_params
from envs.groups import GroupGraph, UnsupportedModelError, keep_count
from envs.models import build_model

X1 = torch.zeros(1, 1, 28, 28)


def randomized(name: str, width: float, seed: int = 0) -> nn.Module:
    """An untrained zoo model with random BN statistics and biases, so that every kept channel matters."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=1, width=width).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def random_keep(graph: GroupGraph, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(rng.choice(g.num_channels, int(rng.integers(1, g.num_channels + 1)), replace=False))
            for g in graph.groups]


@pytest.mark.parametrize("name,width", [("resnet20", 0.5), ("vgg16_bn", 0.25), ("mobilenetv2", 0.25)])
def test_analytic_costs_and_masks_match_the_pruned_network(name, width):
    model = randomized(name, width)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = GroupGraph(model, X1)
    assert graph.base_macs == count_macs(model, X1) and graph.base_params == count_params(model)
    rng = np.random.default_rng(0)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for trial in range(3):
        keep = random_keep(graph, rng)
        if trial == 0:  # the extremes: one channel everywhere
            keep = [np.array([g.num_channels - 1]) for g in graph.groups]
        kept = [len(k) for k in keep]
        pruned = graph.prune_copy(keep)
        # every group's producers, BNs and consumers really shrank
        mods = dict(pruned.named_modules())
        for g, k in zip(graph.groups, kept):
            for n in g.producers:
                assert getattr(mods[n], "out_channels", getattr(mods[n], "out_features", None)) == k
            for n in g.consumers:
                assert getattr(mods[n], "in_channels", getattr(mods[n], "in_features", None)) == k
        assert graph.macs(kept) == count_macs(pruned, X1)
        assert graph.params(kept) == count_params(pruned)
        masked = masked_forward(graph, model, keep, x)
        with torch.no_grad():
            out = pruned(x)
        torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():  # the base model is never touched
        assert torch.equal(v, before[k]), k


def test_keep_all_is_the_identity():
    model = randomized("resnet20", 0.25)
    graph = GroupGraph(model, X1)
    full = [np.arange(g.num_channels) for g in graph.groups]
    pruned = graph.prune_copy(full)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
    assert graph.macs([g.num_channels for g in graph.groups]) == graph.base_macs


def test_runtime_macs_count_fewer_computed_channels():
    graph = GroupGraph(randomized("resnet20", 0.5), X1)
    kept = [g.num_channels for g in graph.groups]
    half = [k // 2 for k in kept]
    assert graph.macs(kept, runtime_kept=kept) == graph.macs(kept)
    assert graph.macs(kept, runtime_kept=half) < graph.macs(kept)
    assert graph.macs(kept, runtime_kept=half) == graph.macs(half)


def test_resnet18_has_12_groups_8_internal_4_residual():
    model = build_model("resnet18", num_classes=10, in_channels=1, width=1.0).eval()
    graph = GroupGraph(model, X1)
    kinds = [g.kind for g in graph.groups]
    assert len(graph.groups) == 12
    assert kinds.count("internal") == 8 and kinds.count("residual") == 4
    internal = [g for g in graph.groups if g.kind == "internal"]
    assert [g.name for g in internal] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)]
    assert all(len(g.producers) == 1 and len(g.consumers) == 1 and len(g.bns) == 1 for g in internal)
    residual = [g for g in graph.groups if g.kind == "residual"]
    assert [g.num_channels for g in residual] == [64, 128, 256, 512]
    assert "fc" in residual[-1].consumers  # the classifier reads the last stream but is never a root
    assert all(g.name != "fc" for g in graph.groups)
    # forward order: the first producer's position
    order = [n for n, _ in model.named_modules()]
    firsts = [order.index(g.producers[0]) for g in graph.groups]
    assert firsts == sorted(firsts)
    assert [g.index for g in graph.groups] == list(range(12))
    only = GroupGraph(model, X1, internal_only=True)
    assert len(only.groups) == 8 and [g.name for g in only.groups] == [g.name for g in internal]
    assert [g.index for g in only.groups] == list(range(8))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_non_depthwise_grouped_conv_is_rejected_by_name():
    with pytest.raises(UnsupportedModelError, match=r"'body\.1'.*groups=2"):
        GroupGraph(Grouped(), X1)
    assert issubclass(UnsupportedModelError, ValueError)


def test_depthwise_conv_is_carried_by_its_group():
    graph = GroupGraph(randomized("mobilenetv2", 0.25), X1)
    dw_groups = [g for g in graph.groups if g.depthwise]
    # every inverted residual's expansion group carries its depthwise conv (the first block, with expansion 1,
    # filters the stem's channels depthwise, so there the stem's residual group carries it)
    assert len(dw_groups) == sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in graph.model.modules())
    mods = dict(graph.model.named_modules())
    for g in dw_groups:
        assert all(mods[n].groups == mods[n].in_channels == g.num_channels for n in g.depthwise)


@pytest.mark.parametrize("ratio,channels,round_to,expected", [
    (0.5, 16, 1, 8), (0.1, 8, 1, 1), (0.01, 64, 1, 1), (1.0, 10, 4, 10), (0.5, 10, 4, 4), (0.3, 32, 4, 8),
    (0.1, 8, 4, 4), (0.99, 64, 8, 64),
])
def test_keep_count(ratio, channels, round_to, expected):
    assert keep_count(ratio, channels, round_to) == expected
