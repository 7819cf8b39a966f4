"""Runtime (per-input) pruning and the importance predictors: effective FLOPs, the learned gate vs. random
gates, the sparse executor (same logits, really fewer multiply-accumulates), the static scorers, the cache."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import envs.importance as importance
from envs.cost import count_macs_per_module
from envs.data import Split
from envs.groups import GroupGraph
from envs.gates import collect_gate_data, gate_layout
from envs.importance import ImportanceContext, make_scorer
from envs.models import build_model
from envs.runtime import GateSpec, install_gates


def _cut(split: Split, n: int) -> Split:
    return Split(split.x[:n], split.y[:n], None if split.indices is None else split.indices[:n])


def half_runtime(env, kept, ratio: float = 0.5) -> list[int]:
    """Runtime counts: ``ratio`` of the kept channels on gated groups, all of them elsewhere."""
    return [max(1, int(round(ratio * k))) if env.gated[i] else k for i, k in enumerate(kept)]


def flop_counts(model: nn.Module, x: torch.Tensor) -> dict[str, dict]:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = model(x)
    return fc.get_flop_counts(), out


def module_macs(counts: dict, name: str, batch: int) -> dict[str, float]:
    """Per-example MACs by op of the module called ``name`` (FlopCounterMode keys are '<RootClass>.<name>')."""
    keys = [k for k in counts if k != "Global" and k.split(".", 1)[-1] == name and "." in k]
    assert len(keys) == 1, (name, keys)
    return {str(op): v / 2 / batch for op, v in counts[keys[0]].items()}


# ---------------------------------------------------------------------------------------------------- the env


def test_effective_flops_below_static_when_runtime_ratio_below_one(make_env):
    env = make_env(mode="runtime", budget=1.0)
    env.problem.data = dataclasses.replace(
        env.data, reward=_cut(env.data.reward, 32), calib=_cut(env.data.calib, 32)
    )
    env.reset(seed=0)
    ratios = []
    for _ in range(env.n_groups):
        _, _, _, _, info = env.step(np.array([1.0, -0.5], np.float32))  # keep all, compute ~30% per input
        ratios.append(info["runtime_ratio"])
    assert info["flops_ratio"] == pytest.approx(1.0) and info["params_ratio"] == pytest.approx(1.0)
    assert info["effective_flops_ratio"] < 0.75
    for i, r in enumerate(ratios):  # residual streams have no gate: their runtime ratio is ignored
        assert (r < 1.0) == env.gated[i]
        assert env.gated[i] == (env.groups[i].kind == "internal")
    # the same plan with every runtime ratio at 1 costs exactly the static FLOPs
    env.reset(seed=0)
    for _ in range(env.n_groups):
        _, _, _, _, info = env.step(np.array([1.0, 1.0], np.float32))
    assert info["effective_flops_ratio"] == pytest.approx(info["flops_ratio"])


def test_learned_gate_beats_random_gates(make_env, monkeypatch):
    """At the same runtime ratio (half of every gated group's channels per input, nothing pruned statically) the
    learned gate keeps more accuracy than gates with random weights of the same shapes. Evaluated with the base
    model's BN statistics, so that only the gate's choice differs; the ridge gates, fitted to those statistics
    (the trained gates are checked against them in test_gates.py)."""
    env = make_env(mode="runtime", budget=1.0, runtime_gates="ridge")
    kept = list(env.cost.k_full)
    rt = half_runtime(env, kept)

    def accuracy() -> float:
        return env.evaluate(env.build_pruned(kept, rt))[0]

    learned = accuracy()
    gates = env.predictors.gates
    random_accs = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        fake = {k: torch.randn(v.shape, generator=gen) * v.std() + v.mean() for k, v in gates.items()}
        monkeypatch.setattr(env.predictors, "gates", fake)
        random_accs.append(accuracy())
    monkeypatch.setattr(env.predictors, "gates", gates)
    base = env.evaluate(env.base_model)[0]
    assert learned > max(random_accs) + 0.05, (learned, random_accs)
    assert learned < base  # half the channels per input do cost accuracy: the comparison is not vacuous


def test_sparse_executor_matches_dense_and_counts_effective_macs(make_env):
    env = make_env(mode="runtime", budget=1.0)
    rng = np.random.default_rng(0)
    kept = [int(rng.integers(k // 2, k + 1)) for k in env.cost.k_full]  # static pruning too
    rt = half_runtime(env, kept)
    dense, sparse = env.build_pruned(kept, rt), env.build_pruned(kept, rt, sparse=True)
    x = env.data.reward.x[:16]
    with torch.no_grad():
        ref = dense(x)
    counts, out = flop_counts(sparse, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (out.argmax(1) == ref.argmax(1)).all()

    # Per gated conv. FlopCounterMode counts a convolution as 2 * N * prod(weight.shape) * H_out * W_out, with
    # weight.shape = (C_out, C_in / groups, kh, kw): the sparse executor's grouped convolution (one group per
    # input, its k selected filters over its k' selected inputs) therefore counts exactly k * k' * kh * kw * H'W'
    # per input, the dense layer's MACs scaled by (k / C_out) * (k' / C_in). The gate's Linear on the pooled input
    # (C_in kept x C_out kept) is counted under the same module as an addmm.
    static = count_macs_per_module(env.build_pruned(kept, list(kept)), x[:1])
    conv_op, gate_op = "aten.convolution", "aten.addmm"
    checked = 0
    for i, v in enumerate(env.problem.gate_layout):
        if not env.gated[i]:
            continue
        _, prod, _, cons = v
        in_g = env.graph.input_group(prod)
        c_in = kept[in_g] if in_g is not None else env.base_model.get_submodule(prod).in_channels
        p = module_macs(counts, prod, len(x))
        assert p[conv_op] == static[prod] * rt[i] / kept[i]
        assert p[gate_op] == c_in * kept[i]
        c = module_macs(counts, cons, len(x))
        assert c[conv_op] == static[cons] * rt[i] / kept[i]
        checked += 1
    assert checked == sum(env.gated) == 9
    total = sum(counts["Global"].values()) / 2 / len(x)
    assert total == env.cost.effective_macs(kept, rt)
    assert total < sum(static.values())
    # batch 1 (plain convolutions with sliced weights, the deployment case): the same logits and MACs
    for j in (0, 5):
        counts1, out1 = flop_counts(sparse, x[j:j + 1])
        torch.testing.assert_close(out1, ref[j:j + 1], rtol=1e-4, atol=1e-4)
        assert sum(counts1["Global"].values()) / 2 == env.cost.effective_macs(kept, rt)


def test_sparse_executor_on_a_chain_of_gated_convs():
    """VGG: each gated conv both reads the previous gate's channels and computes only its own gate's channels."""
    torch.manual_seed(0)
    model = build_model("vgg16_bn", num_classes=10, in_channels=1, width=0.25).eval()
    with torch.no_grad():  # trained-like BN statistics: BN(0) != 0, so a channel not computed is not a zero
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    x1 = torch.zeros(1, 1, 28, 28)
    graph = GroupGraph(model, x1)
    layout = [v for v in gate_layout(graph) if v is not None]
    assert len(layout) == 12  # every conv but the last, whose reader is the classifier
    gen = torch.Generator().manual_seed(1)
    specs, rt = [], [g.num_channels for g in graph.groups]
    mods = dict(model.named_modules())
    for i, prod, bn, cons in layout:
        c_out, c_in = graph.groups[i].num_channels, mods[prod].in_channels
        rt[i] = max(1, c_out // 2 - i % 3)
        weight, bias = torch.randn(c_out, c_in, generator=gen), torch.randn(c_out, generator=gen)
        specs.append(GateSpec(prod, bn, cons, weight, bias, rt[i]))
    dense, sparse = copy.deepcopy(model), copy.deepcopy(model)
    install_gates(dense, specs, sparse=False)
    install_gates(sparse, specs, sparse=True)
    x = torch.randn(8, 1, 28, 28, generator=gen)
    with torch.no_grad():
        ref = dense(x)
    counts, out = flop_counts(sparse, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    kept = [g.num_channels for g in graph.groups]
    gate_macs = sum(s.weight.numel() for s in specs)
    total = sum(counts["Global"].values()) / 2 / len(x)
    assert total == graph.macs(kept, runtime_kept=rt) + gate_macs
    # a middle conv of the chain: reads rt[i-1] channels, computes rt[i]
    i, prod, _, _ = layout[5]
    per = module_macs(counts, prod, len(x))
    full = graph.base_macs_per_module[prod]
    assert per["aten.convolution"] == full * rt[i] / kept[i] * rt[i - 1] / kept[i - 1]


# ---------------------------------------------------------------------------------------------------- predictors


@pytest.mark.parametrize("name", ["learned", "l1", "bn", "taylor", "fpgm"])
def test_scorers_return_one_finite_array_per_group(make_env, name):
    env = make_env(scorer=name)
    assert len(env.static_scores) == env.n_groups
    for g, s in zip(env.groups, env.static_scores):
        assert s.shape == (g.num_channels,) and np.all(np.isfinite(s))
        assert np.ptp(s) > 0  # they do rank the channels
    ctx = ImportanceContext(env.base_model, env.graph, env.data.calib, env.data.train, device=env.device)
    direct = (env.predictors and make_scorer(name, env.predictors) or make_scorer(name)).scores(ctx)
    for a, b in zip(direct, env.static_scores):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # float32 scores vs their float64 copy (seen on CUDA: 1e-7)
    # the kept channels are the top of that ranking
    kept = env.kept_channels([max(1, g.num_channels // 4) for g in env.groups])
    for s, k in zip(env.static_scores, kept):
        assert s[k].min() >= np.sort(s)[::-1][len(k) - 1]


def test_fpgm_ranks_filters_by_their_distance_to_the_others(make_env):
    """FPGM (He et al. 2019): a filter's score is its summed distance to the layer's other filters, so the filter
    nearest the geometric median ranks last; a group fed by one conv is checked against the definition."""
    env = make_env(scorer="fpgm")
    mods = dict(env.base_model.named_modules())
    g = next(g for g in env.groups if len(g.producers) == 1)
    w = mods[g.producers[0]].weight.detach().flatten(1).double().numpy()
    dist = np.sqrt(((w[:, None, :] - w[None, :, :]) ** 2).sum(-1)).sum(1)
    s = env.static_scores[g.index]
    assert np.argmin(s) == np.argmin(dist) and np.argmax(s) == np.argmax(dist)
    np.testing.assert_allclose(s / s.mean(), dist / dist.mean(), rtol=1e-4)


def test_scorer_object_is_pluggable(make_env):
    class Reverse:
        name = "reverse-index"

        def scores(self, ctx):
            return [-np.arange(g.num_channels, dtype=float) for g in ctx.graph.groups]

    env = make_env(scorer=Reverse())
    assert all(np.array_equal(k, np.arange(2)) for k in env.kept_channels([2] * env.n_groups))

    class Broken:
        name = "broken"

        def scores(self, ctx):
            return [np.full(g.num_channels, np.nan) for g in ctx.graph.groups]

    with pytest.raises(ValueError, match="broken.*non-finite"):
        make_env(scorer=Broken())


def test_predictors_are_cached_per_checkpoint(make_env, tiny_setup, monkeypatch):
    ckpt = Path(tiny_setup[0])
    make_env(mode="runtime", scorer="learned")  # trains them unless an earlier test did
    assert list(ckpt.parent.glob(ckpt.name + ".static-predictor-*.pt"))
    assert list(ckpt.parent.glob(ckpt.name + ".runtime-gates-*.pt"))

    def refuse(*args, **kwargs):
        raise AssertionError("the importance predictors were retrained instead of loaded from the cache")

    monkeypatch.setattr(importance, "train_static_predictor", refuse)
    monkeypatch.setattr(importance, "fit_runtime_predictor", refuse)
    env = make_env(mode="runtime", scorer="learned")
    assert env.predictors is not None and sum(env.gated) == 9


def test_predictors_trained_once_for_a_new_checkpoint(tiny_setup, tmp_path, monkeypatch):
    from envs.channel_prune import ChannelPruneEnv

    ckpt = tmp_path / "copy.pt"
    shutil.copy(tiny_setup[0], ckpt)
    data = tiny_setup[1]
    data = dataclasses.replace(data, train=_cut(data.train, 256), calib=_cut(data.calib, 64))
    calls = []
    real = importance.train_static_predictor
    monkeypatch.setattr(importance, "train_static_predictor", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = dict(model="resnet20", width=0.5, checkpoint=str(ckpt), data=data, importance_samples=2,
                  progress=False, mode="runtime", runtime_gates="ridge")
    gates_only = ChannelPruneEnv(**kwargs)  # the default scorer needs no static predictor: none is trained
    assert not calls and gates_only.predictors.static_scores is None and gates_only.predictors.gates
    assert not list(tmp_path.glob("copy.pt.static-predictor-*.pt"))
    kwargs["scorer"] = "learned"
    first = ChannelPruneEnv(**kwargs)
    assert len(calls) == 1 and list(tmp_path.glob("copy.pt.static-predictor-*.pt"))
    second = ChannelPruneEnv(**kwargs)
    assert len(calls) == 1
    for a, b in zip(first.static_scores, second.static_scores):
        np.testing.assert_array_equal(a, b)
    assert first.predictors.gates.keys() == second.predictors.gates.keys()
    for k in first.predictors.gates:
        assert torch.equal(first.predictors.gates[k], second.predictors.gates[k])


def test_predictor_quality_report(make_env):
    env = make_env(mode="runtime", scorer="learned", runtime_gates="ridge")  # the report is the ridge fit's
    rep = env.predictors.report
    for key in ("static_pair_accuracy_heldout", "taylor_pair_accuracy_heldout", "l1_pair_accuracy_heldout",
                "runtime_spearman_per_input", "runtime_spearman_static_ranking", "gated_groups"):
        assert key in rep and np.isfinite(rep[key]), key
    assert 0 <= rep["static_pair_accuracy_heldout"] <= 1
    assert rep["gated_groups"] == sum(env.gated)
    # the runtime gate ranks each input's channels better than one dataset-wide ranking can
    assert rep["runtime_spearman_per_input"] > rep["runtime_spearman_static_ranking"] + 0.2
    # and the reported figure is what the gates achieve on the calibration split
    data = collect_gate_data(env.base_model, env.graph, env.data.calib.x[:64])
    rhos = []
    for i, (xin, sal) in data.items():
        pred = xin @ env.predictors.gates[f"gate{i}.weight"].T + env.predictors.gates[f"gate{i}.bias"]
        rhos.append(np.nanmean([spearmanr(pred[n].numpy(), sal[n].numpy()).statistic for n in range(len(sal))]))
    assert np.mean(rhos) == pytest.approx(rep["runtime_spearman_per_input"], abs=0.05)
