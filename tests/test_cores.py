"""Cores shared by parallel workers (``envs.cores``): a worker that evaluates alone takes its idle siblings'
cores, only past the first rung of a race, and the score does not depend on the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.cores import CoreShare
from envs.episodes import run_actions


@pytest.fixture
def threads():
    """Restore torch's thread count after the test."""
    was = torch.get_num_threads()
    yield
    torch.set_num_threads(was)


def test_a_worker_takes_the_cores_of_idle_siblings(threads):
    share = CoreShare(3, cores=2)
    a, b, c = (share.slot(i) for i in range(3))
    torch.set_num_threads(1)
    with a.busy(), b.busy(), c.busy():
        assert a.share() == 1 and a.fit() == 1  # three busy workers on two cores: one thread each
    with a.busy():
        with b.busy():
            assert a.share() == 1
        assert a.share() == 2 and a.fit() == 2 and torch.get_num_threads() == 2  # b and c idle: both cores
    assert torch.get_num_threads() == 1  # outside an evaluation a worker keeps its own count
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="workers"):
            CoreShare(bad)
    with pytest.raises(ValueError, match="index"):
        share.slot(3)


def test_a_worker_never_drops_below_its_own_threads(threads):
    share = CoreShare(2, cores=2)
    torch.set_num_threads(2)
    a, b = share.slot(0), share.slot(1)
    with a.busy(), b.busy():
        assert a.share() == 1 and a.fit() == 2


def random_actions(env, seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, env.action_space.shape) for _ in range(env.n_groups)]


def test_a_recalibrated_plan_scores_the_same_at_any_thread_count(make_env, threads):
    """Why a worker may change its thread count mid-evaluation: once BN is recalibrated (always at the worker's
    own count; batch statistics do depend on it), the forward pass gives the same accuracy and loss at 1 and 2
    threads, so a run's rewards do not depend on when its siblings stopped."""
    env = make_env(budget=0.5)
    problem = env.problem
    for seed in range(3):
        kept = run_actions(env, random_actions(env, seed))["kept_counts"]
        torch.set_num_threads(1)
        pruned = problem.build_pruned(kept)
        problem.recalibrate_bn(pruned)
        scores = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            scores.append(problem.evaluate(pruned, "reward"))
        assert scores[0] == scores[1] == scores[2]


def test_a_raced_plan_past_the_first_rung_uses_the_idle_cores(make_env, threads):
    share = CoreShare(2, cores=2)
    env, plain = make_env(budget=0.5, screen_size=100), make_env(budget=0.5)
    cores = share.slot(0)
    env.share_cores(cores)
    seen, fit = [], cores.fit
    cores.fit = lambda: seen.append(fit()) or seen[-1]  # records the thread counts the problem asked for
    torch.set_num_threads(1)
    info = run_actions(env, random_actions(env, 0))  # the first plan is scored in full (no bar yet)
    ref = run_actions(plain, random_actions(plain, 0))
    assert info["images_scored"] == len(env.problem.data.reward) and not info["screened"]
    assert seen == [2]  # the second part, with the sibling idle, on both cores; the first part on one
    assert torch.get_num_threads() == 1
    assert info["accuracy"] == ref["accuracy"]
    assert info["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # a mean of two parts' means, rounded
    with pytest.raises(ValueError, match="cores"):
        env.share_cores("all")


def _mark_busy_in_another_process(slot, done) -> None:
    with slot.busy():
        done.put(slot.share())


def test_a_slot_travels_to_a_spawned_worker():
    """SubprocVecEnv pickles its env factories (with cloudpickle): a slot goes as the block's name."""
    import multiprocessing as mp

    import cloudpickle

    share = CoreShare(2, cores=2)
    here = share.slot(0)
    assert cloudpickle.loads(cloudpickle.dumps(share.slot(1))).share() == 2  # nobody busy: all the cores
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    with here.busy():
        p = ctx.Process(target=_mark_busy_in_another_process, args=(share.slot(1), done))
        p.start()
        assert done.get(timeout=120) == 1  # it saw this process busy
        p.join(timeout=60)
    assert p.exitcode == 0
