"""Paper baselines: Neuron Merging (l1_merge), PFP and SCOP on the tiny env."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_plan_follows
from stable_baselines3.common.evaluation import evaluate_policy
from torch import nn

from baselines import make_baseline
from baselines.base import cost_of_ratios, on_device
from baselines.neuron_merging import merge_compensation, merge_pairs
from baselines.pfp import find_eps, pfp_sensitivities, relative_contributions
from baselines.scop import GaussianKnockoffs, gamma_magnitudes, learn_betas, scop_scores
from envs.episodes import run_episode
from envs.groups import GroupGraph


class IndexScorer:
    """Keeps the lowest channel indices (so a test controls the keep sets)."""

    name = "index"

    def scores(self, ctx):
        return [-np.arange(g.num_channels, dtype=np.float64) for g in ctx.graph.groups]


def _episode(baseline):
    env = baseline.setup().eval_env
    evaluate_policy(baseline, env, n_eval_episodes=1, deterministic=True, warn=False)
    return env.last_info


# ========================================================================================= shared episode checks
FAST_OPTIONS = {"l1_merge": {}, "pfp": {"images": 32}, "scop": {"steps": 12, "progress": False}}


@pytest.mark.parametrize("name", list(FAST_OPTIONS))
def test_full_episode_respects_budget_and_is_deterministic(make_env, name):
    env = make_env(budget=0.5)
    a = make_baseline(name, env, seed=0, **FAST_OPTIONS[name])
    info_a = _episode(a)
    assert len(info_a["keep_ratios"]) == env.n_groups
    assert info_a["flops_ratio"] <= 0.5 + 1e-9
    assert info_a["flops_ratio"] > 0.4  # the plan uses the budget, it does not just prune everything
    assert 0.0 < info_a["accuracy"] <= 1.0
    b = make_baseline(name, make_env(budget=0.5), seed=0, **FAST_OPTIONS[name])
    info_b = _episode(b)
    np.testing.assert_array_equal(a.ratios, b.ratios)
    assert info_a["keep_ratios"] == info_b["keep_ratios"]
    assert info_a["kept_channels"] == info_b["kept_channels"]
    assert info_a["accuracy"] == info_b["accuracy"]


def test_a_baseline_refuses_observations_from_another_env(make_env):
    # A plan is made for baseline.eval_env: l1 re-orders channels by L1 norm, so its eval env differs from the
    # learned-scorer env it was given; a budget change makes another env too. Both raise instead of playing a
    # plan made for something else; on its own env it plays.
    env = make_env(budget=0.5)
    b = make_baseline("l1", env).setup()
    assert b.eval_env is not env
    action, _ = b.predict(b.eval_env.reset(seed=0)[0])
    assert action.shape == (1,)
    with pytest.raises(ValueError, match="eval_env"):
        evaluate_policy(b, env, n_eval_episodes=1, warn=False)
    with pytest.raises(ValueError, match="eval_env"):
        b.predict(b.eval_env.derive(budget=0.3).reset(seed=0)[0])


def test_random_search_keeps_the_best_of_n_budget_fitted_plans_by_reward_accuracy(make_env):
    env = make_env(budget=0.5)
    rs = make_baseline("random_search", env, seed=3, samples=4).setup()
    hist = rs.history
    assert len(hist) == 4 and rs.draws >= 4
    # every candidate is a different plan within EagleEye's 0.5% of the budget
    assert all(abs(h["cost_ratio"] - 0.5) <= 0.0025 for h in hist)
    assert len({tuple(np.round(h["plan"], 6)) for h in hist}) == 4
    best = max(hist, key=lambda h: h["reward_accuracy"])
    np.testing.assert_array_equal(rs.ratios, best["plan"])
    assert best["reward_accuracy"] > min(h["reward_accuracy"] for h in hist)  # the choice is not vacuous
    # played through the env, the plan is applied as drawn (no wall clamping) and scores what the search saw
    info = _episode(rs)
    assert info["clamp_total"] == 0.0
    np.testing.assert_allclose(info["keep_ratios"], [k / g.num_channels for k, g in
                                                     zip(env.cost.plan_counts(rs.ratios)[0], env.groups)])
    assert info["accuracy"] == pytest.approx(best["reward_accuracy"], abs=1e-12)
    again = make_baseline("random_search", make_env(budget=0.5), seed=3, samples=4).setup()
    np.testing.assert_array_equal(again.ratios, rs.ratios)
    with pytest.raises(ValueError, match="samples"):
        make_baseline("random_search", env, samples=0).setup()


def test_anchored_random_search_draws_around_the_streams_whole_plan(make_env):
    """Its draws are factors in [1/SPREAD, SPREAD] of uniform_internal's plan (then one budget scale), so the
    residual streams stay near whole; EagleEye's uniform draws cut them like any other group."""
    from envs.budget import SPREAD

    env = make_env(budget=0.5)
    stream = np.array([g.kind == "residual" for g in env.groups])
    anchor = env.cost.streams_whole()
    near = make_baseline("random_search_anchored", env, seed=3, samples=6).setup()
    far = make_baseline("random_search", make_env(budget=0.5), seed=3, samples=6).setup()
    assert len(near.history) == 6 and all(abs(h["cost_ratio"] - 0.5) <= 0.0025 for h in near.history)
    np.testing.assert_array_equal(near.anchor, anchor)
    for h in near.history:
        free = (h["plan"] > env.min_keep) & (h["plan"] < 1.0)  # not clipped by the bounds
        factors = h["plan"][free] / anchor[free]  # one budget scale times a draw in [1/SPREAD, SPREAD]
        assert factors.max() / factors.min() <= SPREAD**2 + 1e-9
    mean_stream = lambda rs: np.mean([h["plan"][stream].mean() for h in rs.history])  # noqa: E731
    assert mean_stream(near) > mean_stream(far) + 0.1
    assert near.ratios.tolist() == max(near.history, key=lambda h: h["reward_accuracy"])["plan"].tolist()
    from baselines import is_search

    assert is_search("random_search_anchored") and is_search("random_search") and not is_search("uniform_internal")


def test_uniform_l1_and_random_plans_are_their_statistic_at_one_scale(make_env):
    env = make_env(budget=0.5)
    n = env.n_groups
    uniform = make_baseline("uniform", env)
    assert_plan_follows(uniform, np.ones(n))  # one keep ratio for every group
    assert uniform.eval_env is env  # the env's own (learned) channel order
    l1 = make_baseline("l1", env)
    assert_plan_follows(l1, np.ones(n))
    # l1 keeps, in every group, the channels with the largest summed L1 filter norms
    from envs.importance import ImportanceContext, weight_norms

    norms = weight_norms(ImportanceContext(env.base_model, env.graph, env.data.calib))
    for i, keep in enumerate(l1.eval_env.kept_channels(l1.eval_env.cost.plan_counts(l1.ratios)[0])):
        dropped = np.setdiff1d(np.arange(len(norms[i])), keep)
        if len(dropped):
            assert norms[i][keep].min() >= norms[i][dropped].max()
    rnd = make_baseline("random", env, seed=5)
    draw = np.random.default_rng(5).uniform(env.min_keep, 1.0, size=n)
    assert_plan_follows(rnd, draw)  # i.i.d. uniform ratios, one scale to the budget
    assert not np.allclose(rnd.setup().ratios, make_baseline("random", env, seed=6).setup().ratios)


def test_uniform_internal_keeps_the_residual_streams_and_cuts_the_blocks_alike(make_env):
    """Li et al. 2017's ResNet plan: residual-stream groups whole, one ratio inside the blocks, the largest within
    the budget; at a budget the streams alone overspend, they are cut too and the plan still fits."""
    env = make_env(budget=0.5)
    stream = np.array([g.kind == "residual" for g in env.groups])
    assert stream.any() and not stream.all()  # the premise: the tiny ResNet has both kinds
    b = make_baseline("uniform_internal", env)
    info = run_episode(b.setup().eval_env, b)[1]
    assert info["clamp_total"] == 0.0 and info["kept_counts"] == env.cost.plan_counts(b.ratios)[0]
    assert np.all(b.ratios[stream] == 1.0)
    inner = b.ratios[~stream]
    assert np.all(inner == inner[0]) and inner[0] < 0.5  # one ratio, paying for the whole streams
    assert env.cost.fits(info["kept_counts"])
    more = np.where(stream, 1.0, inner[0] + 1.0 / min(g.num_channels for g in env.groups))
    assert not env.cost.fits(env.cost.plan_counts(more)[0])  # the largest ratio that fits
    # not the uniform plan: the same budget shared otherwise
    assert not np.allclose(b.ratios, make_baseline("uniform", env).setup().ratios)

    low = make_env(budget=0.1)
    lb = make_baseline("uniform_internal", low).setup()
    assert np.all(lb.ratios[stream] < 1.0) and low.cost.fits(low.cost.plan_counts(lb.ratios)[0])


# ============================================================================================ neuron merging
def _plant_copies(conv: nn.Conv2d, bn: nn.BatchNorm2d, pairs: list[tuple[int, int]], gen: torch.Generator) -> None:
    """Make channel j an exact positive multiple of channel i after BN: z_j = s * z_i (w, mu, var, gamma, beta)."""
    with torch.no_grad():
        for j, i in pairs:
            a = 0.5 + float(torch.rand(1, generator=gen))  # filter scale
            s = 0.5 + float(torch.rand(1, generator=gen))  # BN-output scale
            conv.weight[j] = a * conv.weight[i]
            bn.running_mean[j] = a * bn.running_mean[i]
            bn.running_var[j] = a * a * (bn.running_var[i] + bn.eps) - bn.eps
            bn.weight[j] = s * bn.weight[i]
            bn.bias[j] = s * bn.bias[i]


def test_merge_reproduces_unpruned_output_for_scaled_copies_in_a_chain():
    """conv-BN-ReLU chain (VGG-like, a Linear reader at the end): pruned exact copies are merged back exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    gen = torch.Generator().manual_seed(1)
    for bn in (model[1], model[4], model[8]):
        with torch.no_grad():  # non-trivial BN statistics and affine parameters
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.3, 0.3, generator=gen)
    model.eval()
    x = torch.randn(4, 1, 12, 12)
    graph = GroupGraph(model, x[:1])
    assert [g.producers for g in graph.groups] == [["0"], ["3"], ["7"]]
    # channels 4..7 of the first two groups (and 3..5 of the last) copy kept ones; the second conv's copies are
    # planted after the first merge would have acted on its inputs, which linear column merges preserve
    _plant_copies(model[0], model[1], [(4, 0), (5, 1), (6, 2), (7, 2)], gen)
    _plant_copies(model[3], model[4], [(4, 3), (5, 0), (6, 1), (7, 2)], gen)
    _plant_copies(model[7], model[8], [(3, 0), (4, 1), (5, 2)], gen)
    keep = [np.arange(4), np.arange(4), np.arange(3)]
    with torch.no_grad():
        ref = model(x)
        plain = graph.prune_copy(keep, model).eval()
        merged = graph.prune_copy(keep, model).eval()
        counts = merge_compensation(graph, model, merged, keep)
        assert counts == [4, 4, 3]
        assert merged[3].weight.shape == (4, 4, 3, 3) and merged[12].weight.shape == (5, 3)
        torch.testing.assert_close(merged(x), ref, rtol=1e-4, atol=1e-5)
        assert (plain(x) - ref).abs().max() > 1e-2  # plain pruning loses the copies' contribution


def _widen(model: nn.Module, noise: float, seed: int = 0) -> nn.Module:
    """Net2Net-style redundancy: every residual block's internal conv gets a (noisy, rescaled) copy of each filter,
    with the consumer's weights split between original and copy, so the wider net computes (about) the same."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    blocks = [b for n, b in m.named_modules() if n and hasattr(b, "conv1") and hasattr(b, "bn1")]
    with torch.no_grad():
        for b in blocks:
            c1, bn, c2 = b.conv1, b.bn1, b.conv2
            c = c1.out_channels
            a = 0.5 + torch.rand(c, generator=gen)
            s = 0.5 + torch.rand(c, generator=gen)
            share = 0.3 + 0.4 * torch.rand(c, generator=gen)  # the original keeps this share of its reader weights
            w = c1.weight
            scale = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1) / w[0].numel() ** 0.5
            wide1 = nn.Conv2d(c1.in_channels, 2 * c, c1.kernel_size, c1.stride, c1.padding, bias=False)
            copies = a.view(-1, 1, 1, 1) * (w + noise * scale * torch.randn(w.shape, generator=gen))
            wide1.weight.copy_(torch.cat([w, copies]))
            wbn = nn.BatchNorm2d(2 * c)
            wbn.running_mean.copy_(torch.cat([bn.running_mean, a * bn.running_mean]))
            wbn.running_var.copy_(torch.cat([bn.running_var, a * a * (bn.running_var + bn.eps) - bn.eps]))
            wbn.weight.copy_(torch.cat([bn.weight, s * bn.weight]))
            wbn.bias.copy_(torch.cat([bn.bias, s * bn.bias]))
            wide2 = nn.Conv2d(2 * c, c2.out_channels, c2.kernel_size, c2.stride, c2.padding, bias=False)
            w2 = c2.weight
            split = [w2 * share.view(1, -1, 1, 1), w2 * ((1 - share) / s).view(1, -1, 1, 1)]
            wide2.weight.copy_(torch.cat(split, 1))
            b.conv1, b.bn1, b.conv2 = wide1, wbn, wide2
    return m.eval()


def test_merge_exact_through_env_on_tiny_resnet(make_env):
    """The env's compensate='merge' path on the (widened, exactly redundant) tiny ResNet: no output change."""
    base = make_env(scorer="l1")
    wide = _widen(base.base_model, noise=0.0)
    env = base.derive(model=wide, scorer=IndexScorer(), compensate=merge_compensation)
    kept = [g.num_channels if g.kind == "residual" else g.num_channels // 2 for g in env.groups]
    plain_env = base.derive(model=wide, scorer=IndexScorer())
    x = env.data.reward.x[:64]
    with torch.no_grad():
        ref = env.base_model(x)
        out = env.build_pruned(kept).eval()(x)
        plain = plain_env.build_pruned(kept).eval()(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert (plain - ref).abs().max() > 0.1


def test_merge_beats_plain_pruning_on_same_keep_set(make_env):
    """Approximately redundant filters (cos ~0.96): merging keeps accuracy that plain pruning loses, both raw and
    after the env's BN recalibration, on the reward split, internal groups at 0.5 and residual streams kept."""
    base = make_env(scorer="l1")
    wide = _widen(base.base_model, noise=0.3)
    plain_env = base.derive(model=wide, scorer=IndexScorer())
    merge_env = base.derive(model=wide, scorer=IndexScorer(), compensate=merge_compensation)
    kept = [g.num_channels if g.kind == "residual" else g.num_channels // 2 for g in plain_env.groups]
    acc = {}
    for name, env in [("plain", plain_env), ("merge", merge_env)]:
        pruned = env.build_pruned(kept)
        raw = env.evaluate(pruned)[0]
        env.recalibrate_bn(pruned)
        acc[name] = (raw, env.evaluate(pruned)[0])
    assert acc["merge"][0] > acc["plain"][0] + 0.3  # raw: plain pruning shrinks every block's output
    assert acc["merge"][1] > acc["plain"][1]  # the env's evaluation path (BN recalibrated)


def test_merge_pairs_threshold_and_scale():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [-1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([0.5, 0.1, 1.0, 0.2], dtype=torch.float64)
    pairs = merge_pairs(f, b, kept=[0, 1], threshold=0.5)
    assert pairs[0][:2] == (2, 0) and math.isclose(pairs[0][2], float(f[2].norm()), rel_tol=1e-9)
    assert all(j != 3 for j, _, _ in pairs)  # a filter opposite to every kept one is never merged (s must be > 0)
    with pytest.raises(ValueError, match="threshold"):
        merge_compensation(None, None, None, [], threshold=2.0)


# ============================================================================================ PFP
def test_pfp_relative_contributions_match_brute_force():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    a = torch.rand(2, 3, 5, 5) * (torch.rand(2, 3, 5, 5) > 0.3)
    fast = relative_contributions(a, conv, 3)
    ap = torch.nn.functional.pad(a, (1, 1, 1, 1))
    w = conv.weight.detach()
    slow = torch.zeros(3, dtype=torch.float64)
    for n in range(2):
        for i in range(4):
            for py in range(3):
                for px in range(3):
                    patch = ap[n, :, 2 * py : 2 * py + 3, 2 * px : 2 * px + 3]
                    for wpart in (w[i].clamp_min(0), (-w[i]).clamp_min(0)):
                        terms = wpart * patch
                        z = terms.sum()
                        if z > torch.finfo(torch.float32).eps:
                            slow = torch.maximum(slow, (terms / z).flatten(1).amax(1).double())
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


@pytest.fixture
def pfp_setup(make_env):
    env = make_env(scorer="l1", budget=0.5)
    sens = pfp_sensitivities(env.base_model, env.graph, env.data.calib.x[:32])
    return env, sens


def test_pfp_eps_meets_budget_and_grows_as_budget_shrinks(pfp_setup):
    env, sens = pfp_setup
    assert all(s.shape == (g.num_channels,) and np.all((s >= 0) & (s <= 1)) for s, g in zip(sens, env.groups))
    eps = {}
    for budget in (0.4, 0.6):
        eps[budget], ratios = find_eps(env, sens, budget=budget)
        cost = cost_of_ratios(env, ratios)
        assert cost <= budget + 1e-12
        assert budget - cost <= 0.02
    assert eps[0.4] > eps[0.6]


def test_pfp_keeps_the_most_sensitive_channels(make_env):
    b = make_baseline("pfp", make_env(budget=0.5), images=32).setup()
    env = b.eval_env
    kept = env.kept_channels([max(1, round(r * g.num_channels)) for r, g in zip(b.ratios, env.groups)])
    for s, k in zip(env.static_scores, kept):
        top = np.argsort(-s, kind="stable")[: len(k)]
        assert set(top.tolist()) == set(k.tolist())
        if len(k) < len(s):  # every kept channel is at least as sensitive as every removed one
            assert s[k].min() >= np.delete(s, k).max()


# ============================================================================================ SCOP
def test_knockoffs_match_first_two_moments(make_env):
    env = make_env(scorer="l1")
    x = env.data.calib.x
    kn = GaussianKnockoffs(x, max_dim=256)
    assert kn.pool == 2 and kn.reduced_shape == (1, 14, 14)
    z = kn.reduce(x).double()
    mu, cov = z.mean(0), torch.cov(z.T)
    sample = kn.sample_reduced(20000, torch.Generator().manual_seed(0))
    assert (sample.mean(0) - mu).norm() / mu.norm() < 0.02
    assert (torch.cov(sample.T) - cov).norm() / cov.norm() < 0.05
    imgs = kn.sample(8, torch.Generator().manual_seed(0))
    assert imgs.shape == x[:8].shape and imgs.dtype == torch.float32
    # the images carry the modelled moments: pooling them back gives the N(mu, Sigma) draw
    torch.testing.assert_close(kn.reduce(imgs).double(),
                               kn.sample_reduced(8, torch.Generator().manual_seed(0)), rtol=1e-5, atol=1e-5)


def test_scop_scores_flag_useless_channels(make_env):
    """Channels made useless on purpose (BN gamma and beta zeroed, or nothing reading them) get no signal from the
    knockoff test: beta stays at 0.5 and the score at 0, below every channel whose real feature beat its knockoff,
    even when their |gamma| is large (a BN-scale criterion would keep those)."""
    env = make_env(scorer="l1")
    model = copy.deepcopy(env.base_model)
    mods = dict(model.named_modules())
    rng = np.random.default_rng(0)
    dead: dict[int, list[int]] = {}
    with torch.no_grad():
        for g in env.groups:
            if g.kind != "internal":
                continue
            zero_bn, zero_reader = (int(c) for c in rng.choice(g.num_channels, 2, replace=False))
            mods[g.bns[0]].weight[zero_bn] = 0.0
            mods[g.bns[0]].bias[zero_bn] = 0.0
            mods[g.consumers[0]].weight[:, zero_reader] = 0.0
            dead[g.index] = [zero_bn, zero_reader]
    kn = GaussianKnockoffs(env.data.calib.x)
    flags = [p.requires_grad for p in model.parameters()]
    betas = learn_betas(model, env.graph, env.data.train, kn, steps=40, lr=0.2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags  # weights were frozen only while learning
    scores = scop_scores(betas, gamma_magnitudes(model, env.graph))
    live_pos = live = 0
    for gi, d in dead.items():
        s = scores[gi]
        assert np.all(s[d] == 0.0) and torch.all(betas[gi][d] == 0.5)
        assert gamma_magnitudes(model, env.graph)[gi][d[1]] > 0  # |gamma| alone would not flag the unread one
        others = np.delete(s, d)
        assert s[d].max() < others[others > 0].min()
        live_pos += int((others > 0).sum())
        live += len(others)
    assert live_pos / live > 0.6  # most live channels beat their knockoffs
    assert all(torch.all((b > 0) & (b < 1)) for b in betas)


def test_scop_betas_deterministic_for_a_seed(make_env):
    env = make_env(scorer="l1")
    kn = GaussianKnockoffs(env.data.calib.x)
    before = {k: v.clone() for k, v in env.base_model.state_dict().items()}
    run = lambda seed: learn_betas(env.base_model, env.graph, env.data.train, kn, steps=4, seed=seed,  # noqa: E731
                                   progress=False)
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(torch.equal(v, env.base_model.state_dict()[k]) for k, v in before.items())  # base untouched


class RealDataAsKnockoffs:
    """Draws exactly the batches learn_betas draws (same seed, same calls): every 'knockoff' is the real image."""

    def __init__(self, data, seed: int):
        self.data, self.gen = data, torch.Generator().manual_seed(seed)

    def sample(self, n: int, _gen) -> torch.Tensor:
        return self.data.x[torch.randint(len(self.data), (n,), generator=self.gen)]


def test_scop_betas_stay_at_one_half_when_knockoffs_are_the_real_data(make_env):
    # SCOP's control: a channel is kept when its real feature beats its knockoff's. With knockoffs equal to the
    # real inputs, mixing changes nothing, so the loss has no gradient in beta and every beta stays at 0.5.
    env = make_env(scorer="l1")
    betas = learn_betas(env.base_model, env.graph, env.data.train, RealDataAsKnockoffs(env.data.train, 2), steps=5,
                        seed=2, progress=False)
    for b in betas:
        torch.testing.assert_close(b, torch.full_like(b, 0.5), atol=1e-3, rtol=0)
    gk = learn_betas(env.base_model, env.graph, env.data.train, GaussianKnockoffs(env.data.calib.x), steps=5,
                     seed=2, progress=False)
    assert max(float((b - 0.5).abs().max()) for b in gk) > 0.05  # real knockoffs do move them


def test_scop_allocation_is_the_papers_uniform_rate_by_default(make_env):
    env = make_env(budget=0.5)
    fast = dict(steps=4, progress=False)
    scop = make_baseline("scop", env, **fast)
    assert_plan_follows(scop, np.ones(env.n_groups))  # one rate for every layer; SCOP scores pick the channels
    assert scop.eval_env.problem.scorer is scop.scorer
    glob = make_baseline("scop", env, allocation="global", **fast).setup()
    from baselines.scop import threshold_plan

    assert_plan_follows(glob, threshold_plan(glob.eval_env, glob.eval_env.static_scores))
    with pytest.raises(ValueError, match="allocation"):
        make_baseline("scop", env, allocation="layerwise", **fast).setup()


def test_pfp_plan_is_the_sampling_bound_at_one_global_eps(make_env):
    from baselines.pfp import keep_ratios

    b = make_baseline("pfp", make_env(budget=0.5), images=32).setup()
    env, sens = b.eval_env, b.eval_env.static_scores
    np.testing.assert_allclose(b.ratios, np.clip(keep_ratios(sens, b.eps), env.min_keep, 1.0))
    info = run_episode(env, b)[1]
    assert info["clamp_total"] == 0.0 and info["kept_counts"] == env.cost.plan_counts(b.ratios)[0]
    # more total sensitivity -> more samples m_l -> more filters kept: scale one group's sensitivities (same
    # distribution p, twice S_l) and only that group's ratio grows
    free = [i for i, r in enumerate(b.ratios) if env.min_keep < r < 1.0]
    assert free
    i = free[0]
    doubled = [2.0 * s if j == i else s for j, s in enumerate(sens)]
    before, after = keep_ratios(sens, b.eps), keep_ratios(doubled, b.eps)
    assert after[i] > before[i]
    np.testing.assert_allclose(np.delete(after, i), np.delete(before, i))


# ============================================================================================ devices
def test_on_device_copies_only_when_the_model_is_elsewhere():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert on_device(net, "cpu") is net and on_device(net, torch.device("cpu")) is net
    moved = on_device(net, "meta")  # a device the model is not on: a copy goes there, the model stays
    assert moved is not net and next(moved.parameters()).device.type == "meta"
    assert all(p.device.type == "cpu" for p in net.parameters())
    relu = nn.ReLU()
    assert on_device(relu, "meta") is relu  # no parameters: nothing to move


def test_baselines_run_on_the_env_device_and_return_cpu_results(make_env):
    env = make_env(scorer="l1", device="cpu")
    b = make_baseline("pfp", env, images=16).setup()
    assert b.eval_env.device == env.device == torch.device("cpu")  # derived envs inherit the device
    assert b.wall_seconds > 0 and b.cpu_seconds > 0
    sens = pfp_sensitivities(env.base_model, env.graph, env.data.calib.x[:16], device=torch.device("cpu"))
    ref = pfp_sensitivities(env.base_model, env.graph, env.data.calib.x[:16])
    assert all(isinstance(s, np.ndarray) and np.array_equal(s, r) for s, r in zip(sens, ref))
    betas = learn_betas(env.base_model, env.graph, env.data.train, GaussianKnockoffs(env.data.calib.x), steps=2,
                        progress=False, device="cpu")
    assert all(b.device.type == "cpu" and not b.requires_grad for b in betas)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error_in_the_baselines(make_env):
    env = make_env(scorer="l1")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pfp_sensitivities(env.base_model, env.graph, env.data.calib.x[:4], device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        learn_betas(env.base_model, env.graph, env.data.train, GaussianKnockoffs(env.data.calib.x), steps=1,
                    progress=False, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pfp_and_scop_on_cuda_agree_with_the_cpu(make_env):
    env = make_env(scorer="l1")
    x = env.data.calib.x[:16]
    cpu = pfp_sensitivities(env.base_model, env.graph, x, device="cpu")
    gpu = pfp_sensitivities(env.base_model, env.graph, x, device="cuda")
    for a, b in zip(cpu, gpu):  # cuDNN may use TF32 convolutions: close, not equal
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)
    kn = GaussianKnockoffs(env.data.calib.x)
    betas = learn_betas(env.base_model, env.graph, env.data.train, kn, steps=4, progress=False, device="cuda")
    assert all(b.device.type == "cpu" and torch.all((b > 0) & (b < 1)) for b in betas)
    assert all(p.device.type == "cpu" for p in env.base_model.parameters())  # the base model never moved
