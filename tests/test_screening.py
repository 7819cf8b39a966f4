"""Racing the reward split (``screen_size``): what a raced search scores, what it skips, and what it never gets
wrong (a plan scored in full has exactly the unraced score; the best is always scored in full)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from baselines import make_baseline
from baselines.experiments import screening
from envs.episodes import run_actions
from envs.screening import Screen


def test_racing_rule_stops_only_plans_that_cannot_win():
    s = Screen(500)
    assert s.can_win(0.01)  # nothing scored in full yet: the first plan always is
    s.record(0.80)
    assert s.can_win(0.80) and s.can_win(0.78)  # within two standard errors (0.018 at 500 images)
    assert not s.can_win(0.70)
    with pytest.raises(ValueError, match="screen_size"):
        Screen(0)


def test_the_bound_is_on_the_accuracy_of_this_split():
    """After 1,000 of 2,000 images half the split is known: the finite-population factor halves the variance, so
    a plan 0.02 below the best stops there, where an infinite split would keep it."""
    s = Screen((500, 1000))
    s.record(0.80)
    assert s.can_win(0.78, 1000) and not s.can_win(0.78, 1000, total=2000)
    assert s.can_win(0.78, 500, total=2000)  # at 500 images the same gap is within the bound
    assert s.cuts(2000) == [500, 1000, 2000] and s.cuts(800) == [500, 800]
    for bad in ([1000, 500], [0, 10], "500", [500, 500]):
        with pytest.raises(ValueError, match="screen_size"):
            Screen(bad)


def random_actions(env, seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, env.action_space.shape) for _ in range(env.n_groups)]


def test_raced_env_scores_in_full_exactly_or_stops_at_the_first_rung(make_env):
    plain = make_env(budget=0.5)
    raced = plain.derive(screen_size=100)
    assert raced.screen is not None and plain.screen is None
    full_scores, screened = [], 0
    for seed in range(8):
        ref = run_actions(plain, random_actions(plain, seed))
        info = run_actions(raced, random_actions(raced, seed))
        assert info["kept_counts"] == ref["kept_counts"]
        if info["screened"]:
            screened += 1
            assert info["images_scored"] == 100
            assert info["accuracy"] < raced.screen.best  # a stopped plan is below the best scored in full
        else:
            assert info["images_scored"] == len(plain.data.reward)
            assert info["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)  # the parts add up exactly
            assert info["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            full_scores.append(ref["accuracy"])
    assert full_scores  # the first plan at least
    assert raced.screen.best == max(full_scores)
    assert screened > 0  # random plans on the tiny model spread wider than the race's margin


def test_raced_random_search_chooses_a_plan_scored_in_full(make_env):
    env = make_env(budget=0.5, screen_size=100)
    b = make_baseline("random_search", env, seed=0, samples=10).setup()
    best = max(h["reward_accuracy"] for h in b.history)
    chosen = [h for h in b.history if h["reward_accuracy"] == best][0]
    kept, rt = env.cost.plan_counts(chosen["plan"])
    assert env.problem.evaluate_plan(kept, rt)["accuracy"] == pytest.approx(best, abs=1e-12)
    plain = make_baseline("random_search", make_env(budget=0.5), seed=0, samples=10).setup()
    assert [h["plan"].tolist() for h in plain.history] == [h["plan"].tolist() for h in b.history]
    # the race changes scores only of plans below the best
    for h, p in zip(b.history, plain.history):
        same = h["reward_accuracy"] == pytest.approx(p["reward_accuracy"], abs=1e-12)
        assert same or h["reward_accuracy"] < best


def test_a_plan_stops_at_the_rung_where_it_can_no_longer_win(make_env):
    """Rungs are scored in order, each only while the plan can still win; a stopped plan's score is its accuracy
    on the images scored so far."""
    env = make_env(budget=0.5)
    problem = env.problem
    kept = run_actions(env, random_actions(env, 0))["kept_counts"]

    class LosesAtTheSecondRung(Screen):
        def can_win(self, accuracy, scored=None, total=None):
            return scored < 200

    stopped = problem.evaluate_plan(kept, screen=LosesAtTheSecondRung((100, 200, 300)))
    pruned = problem.build_pruned(kept)
    problem.recalibrate_bn(pruned)
    first_200 = problem.evaluate_on(pruned, problem.data.reward.part(0, 200))
    assert stopped["screened"] and stopped["images_scored"] == 200
    assert stopped["accuracy"] == pytest.approx(first_200[0], abs=1e-12)
    whole = problem.evaluate_plan(kept, screen=Screen((100, 200, 300)))  # the first race: every rung may win
    assert not whole["screened"] and whole["images_scored"] == len(problem.data.reward)
    assert whole["accuracy"] == pytest.approx(problem.evaluate_plan(kept)["accuracy"], abs=1e-12)


def test_race_replay_finds_the_best_when_the_first_rung_agrees():
    acc = np.random.default_rng(0).uniform(0.3, 0.9, 40)
    r = screening.race({500: acc}, acc, 2000, orders=50)
    assert r["found_best"] == 1.0 and r["max_regret"] == 0.0
    assert 1 / 40 <= r["scored_in_full"] < 1.0  # plans far below the best so far are stopped
    assert r["images_per_plan"] == pytest.approx(500 + r["scored_in_full"] * 1500)
    # a first rung that ranks plans backwards misleads the race: it can miss the best
    bad = screening.race({500: 1.2 - acc}, acc, 2000, orders=50)
    assert bad["found_best"] < 1.0 and bad["mean_regret"] > 0
    # a second rung stops near-best plans that the first could not, and scores fewer images
    noisy = {500: acc + np.random.default_rng(1).normal(0, 0.02, 40), 1000: acc}
    two = screening.race(noisy, acc, 2000, orders=50)
    one = screening.race({500: noisy[500]}, acc, 2000, orders=50)
    assert two["found_best"] == 1.0 and two["images_per_plan"] < one["images_per_plan"]
    assert two["stopped_at"]["1000"] > 0 and sum(two["stopped_at"].values()) == pytest.approx(1.0)


def test_screening_report_on_the_tiny_model(make_env):
    env = make_env(budget=0.5)
    rows = screening.score_plans(env, 5, [100, 250], seed=0)
    assert len(rows) == 5
    for r in rows:
        assert set(r["rungs"]) == {100, 250, len(env.data.reward)}
        assert r["rungs"][len(env.data.reward)]["accuracy"] == r["accuracy"]
        seconds = [r["rungs"][n]["seconds"] for n in (100, 250, len(env.data.reward))]
        assert seconds == sorted(seconds) and seconds[0] > 0  # cumulative: each rung adds its part's time
        assert math.isclose(r["cost_ratio"], 0.5, abs_tol=0.5 * 0.005)
    with pytest.raises(ValueError, match="rungs"):
        screening.score_plans(env, 3, [len(env.data.reward)])


def test_bad_screen_size_names_the_argument(make_env):
    with pytest.raises(ValueError, match="screen_size=0"):
        make_env(screen_size=0)
    with pytest.raises(ValueError, match=r"screen_size=\[200, 100\].*increasing"):
        make_env(screen_size=[200, 100])
    assert make_env(screen_size=[100, 200]).screen.rungs == (100, 200)


def test_a_part_of_the_split_a_plan_was_scored_on_is_not_scored_again(make_env, monkeypatch):
    """The evaluator is deterministic: a replayed plan costs no pruning, recalibration or forward pass for the
    parts already scored (one race's first rung is another's), and gives the very same numbers."""
    plain = make_env(budget=0.5)
    problem = plain.problem
    built = []
    build = problem.build_pruned
    monkeypatch.setattr(problem, "build_pruned", lambda *a, **k: built.append(1) or build(*a, **k))
    kept = run_actions(plain, random_actions(plain, 0))["kept_counts"]
    assert len(built) == 1
    whole = problem.evaluate_plan(kept)
    assert len(built) == 1 and whole["images_scored"] == len(problem.data.reward)
    assert problem.with_budget(0.7).evaluate_plan(kept)["accuracy"] == whole["accuracy"]  # a budget shares them
    assert len(built) == 1

    screen = Screen(100)
    screen.record(1.0)  # a bar nothing reaches: the plan stops at the first rung
    first = problem.evaluate_plan(kept, screen=screen)
    assert first["screened"] and len(built) == 2  # images 0:100 were not a part scored before
    fresh = Screen(100)  # a new race: the first rung is remembered, the rest of the split is scored
    raced = problem.evaluate_plan(kept, screen=fresh)
    assert not raced["screened"] and len(built) == 3
    assert raced["accuracy"] == pytest.approx(whole["accuracy"], abs=1e-12)
    assert problem.evaluate_plan(kept, screen=Screen(100))["accuracy"] == raced["accuracy"] and len(built) == 3
    assert problem.evaluate_plan(kept, split="test")["images_scored"] == len(problem.data.test) and len(built) == 4
