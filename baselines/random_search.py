"""Random search at equal evaluations: the control every learned allocation is compared against.

Li, Y., Lin, S., Zhang, B., Liu, J., Doermann, D., Wu, Y., Huang, F., Ji, R. "EagleEye: Fast Sub-net Evaluation
for Efficient Neural Network Pruning", ECCV 2020. EagleEye shows that random pruning strategies, scored by a cheap
BN-recalibrated accuracy, find allocations as good as learned ones. Its candidate generation:

    repeat until N candidates:
        r_l ~ U(min_keep, 1) for every layer l                    (random per-layer keep ratios)
        reject the plan unless its FLOPs are within tolerance of the target (EagleEye: 0.5%)
        score it: recalibrate BN statistics on a few training batches ("adaptive BN"), accuracy on held-out data
    return the best-scoring plan

Here a drawn plan is brought to the budget by one common scale factor (``fit_to_budget``) before the check, so
almost every draw is accepted instead of rejecting most of them; the score is the env's own evaluator (BN
recalibrated on the calibration split, accuracy on the reward split: the selection split, never the test split).
``samples`` (N) should equal the number of episodes the agents it is compared with ran; at most ``20 * samples``
draws are made. Deviations: uniform draws in ``[min_keep, 1]`` rather than EagleEye's ``[0, R]``; static ratios
only (runtime ratios stay 1, as for every static baseline).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from envs.budget import SPREAD
from envs.screening import Screen

from .base import Baseline, fit_to_budget, register

DEFAULT_SAMPLES = 30
TOLERANCE = 0.005  # EagleEye's: a candidate's cost within 0.5% of the target


def reward_accuracies(env, counts: list[tuple[list[int], list[int]]]) -> list[float]:
    """The env's score of each plan's (kept, runtime) channel counts, one after another: BN recalibration, then
    accuracy on the reward split, raced as the env's episodes are when it has a ``screen_size`` (a plan that
    cannot beat the best so far keeps its part-split accuracy, below that best). The ``evaluate`` option replaces
    it (``baselines.experiments.ray_grid`` spreads the evaluations over a Ray cluster, unraced)."""
    screen = Screen(env.screen.rungs, env.screen.z) if getattr(env, "screen", None) is not None else None
    return [env.problem.evaluate_plan(kept, rt, split="reward", screen=screen)["accuracy"] for kept, rt in counts]


def uniform_draw(env, rng: np.random.Generator) -> np.ndarray:
    """EagleEye's draw: every group's keep ratio uniform in ``[min_keep, 1]``."""
    return rng.uniform(env.min_keep, 1.0, size=env.n_groups)


def budget_plans(env, rng: np.random.Generator, samples: int,
                 draw: Callable[[Any, np.random.Generator], np.ndarray] = uniform_draw
                 ) -> tuple[list[tuple[np.ndarray, float]], int]:
    """EagleEye's candidates: up to ``samples`` plans of random keep ratios (``draw``), each brought to the budget
    by one scale factor and kept when its cost is within ``TOLERANCE`` of it; returns [(plan, cost ratio)] and
    the number of draws (at most ``20 * samples``). ValueError when no draw comes within the tolerance."""
    candidates, draws = [], 0
    while len(candidates) < samples and draws < 20 * samples:
        draws += 1
        plan = fit_to_budget(env, draw(env, rng))
        ratio = env.cost.plan_cost(plan)
        if abs(ratio - env.budget) <= TOLERANCE * env.budget:
            candidates.append((plan, ratio))
    if not candidates:
        raise ValueError(f"random_search: none of {draws} random plans came within {TOLERANCE:.1%} of "
                         f"budget={env.budget}; the budget is out of reach of this network's channel counts")
    return candidates, draws


@register("random_search")
class RandomSearch(Baseline):
    """Options: ``samples`` (plans evaluated, 30), ``evaluate`` (``reward_accuracies``' signature: how the plans
    are scored, e.g. in parallel)."""

    equal_evaluations = True  # the benchmark gives it as many evaluations as the agents' episodes

    def draw(self, env, rng: np.random.Generator) -> np.ndarray:
        return uniform_draw(env, rng)

    def plan(self) -> np.ndarray:
        env = self.eval_env
        samples = int(self.options.get("samples", DEFAULT_SAMPLES))
        if samples < 1:
            raise ValueError(f"samples={samples!r} must be a positive integer (the number of plans evaluated)")
        candidates, draws = budget_plans(env, self.rng, samples, self.draw)
        evaluate = self.options.get("evaluate") or reward_accuracies
        accuracies = evaluate(env, [env.cost.plan_counts(plan) for plan, _ in candidates])
        # every evaluated candidate: its plan, cost ratio and reward-split accuracy
        self.history = [{"plan": plan, "cost_ratio": ratio, "reward_accuracy": acc}
                        for (plan, ratio), acc in zip(candidates, accuracies)]
        self.draws, self.evaluations = draws, len(self.history)
        best = max(self.history, key=lambda h: h["reward_accuracy"])  # first of equals: deterministic
        return best["plan"]


@register("random_search_anchored")
class AnchoredRandomSearch(RandomSearch):
    """Random search around Li et al.'s ResNet plan (``uniform_internal``; ``CostModel.streams_whole``): group
    ``i`` draws ``anchor_i * SPREAD**a_i`` with ``a_i ~ U(-1, 1)``, clipped to ``[min_keep, 1]``, the plans a
    uniformly random policy asks for through ``actions: anchored``; then the same budget fit and scoring. It is
    the control of equal evaluations for agents trained with anchored actions."""

    def plan(self) -> np.ndarray:
        self.anchor = self.eval_env.cost.streams_whole()
        return super().plan()

    def draw(self, env, rng: np.random.Generator) -> np.ndarray:
        return np.clip(self.anchor * SPREAD ** rng.uniform(-1.0, 1.0, size=env.n_groups), env.min_keep, 1.0)
