"""Relative actions: the agent asks for a keep ratio as a factor of what a uniform allocation would give.

With the env's own (absolute) actions and ``budget_mode="fill"``, only the groups' ratios relative to each other
matter: the fill rescales the plan, so moving every action together changes little, nothing pulls the policy's
mean back along that direction, and PPO's means were measured to drift to the action bounds, where the clipped
actions stop carrying what the policy learned (docs/reports/agents.md, "Keeping PPO's mean inside the
action bounds").

``RelativeActions`` removes that direction. At step ``t`` the env's ``even_keep_ratio()`` is the ratio that,
given to this group and every later one, spends the budget with the earlier groups as decided. The agent's
action ``a`` in [-1, 1] asks for ``even * SPREAD**a`` (clipped to ``[min_keep, 1]``), so ``a = 0`` at every step
is the uniform plan, and a common shift of all actions moves budget from the later groups to the earlier ones
instead of cancelling out. The env still applies its wall (and fill), and it records the plan in its own terms,
so ``best.json``, replays and baselines are unchanged. In runtime mode the second component (the runtime ratio)
passes through as it is.

A model trained with ``actions: relative`` (a preset key of ``agents/presets.yaml``) acts through this wrapper:
``agents.evaluate`` re-applies it from the run's ``config.yaml``.

Measured (docs/reports/agents.md, "Relative actions"; PPO, 3 seeds x 300 episodes, budget 0.3): a tie with random
search, and the policies' means still end at the bounds (in 2 of 3 seeds "-1 everywhere"), so the presets keep
absolute actions; this is the ablation's other arm.

``AnchoredActions`` (``actions: anchored``) asks for ``anchor[t] * SPREAD**a`` instead, where the anchor is a fixed
plan: Li et al.'s ResNet plan (``CostModel.streams_whole``: residual streams whole, one ratio inside the blocks;
the ``uniform_internal`` baseline). ``a = 0`` at every step is that plan, so the search starts from the structure
the best plans were measured to share (docs/reports/agents.md, "ResNet-56 (30 groups)") and learns departures from
it. Its control at equal evaluations is ``random_search_anchored``: the same plans a uniformly random policy would
ask for. Measured (docs/reports/agents.md, "Anchored actions"; ResNet-56, budget 0.3, 10 seeds): PPO's best of 300
0.5415 on test, above ``random_search_anchored`` (0.4686), ``uniform_internal`` (0.4652) and random search
(0.3723), intervals apart. On ResNet-18 (budget 0.3, 5 seeds; "Anchored actions on ResNet-18"): 0.7668, above
``random_search_anchored`` (0.7467) and random search (0.6957), intervals apart. The ResNet-18 and ResNet-56
presets use it.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.budget import SPREAD, action_of_ratio

ACTIONS = ("absolute", "relative", "anchored")


def check_actions(actions: str) -> str:
    if actions not in ACTIONS:
        raise ValueError(f"actions={actions!r} is not allowed; allowed: {', '.join(ACTIONS)}")
    return actions


class RelativeActions(gym.ActionWrapper):
    """Map an action in [-1, 1] to the env's action asking for ``even_keep_ratio() * SPREAD**a`` (component 0)."""

    def __init__(self, env: gym.Env, spread: float = SPREAD):
        super().__init__(env)
        if not (isinstance(spread, (int, float)) and spread > 1):
            raise ValueError(f"spread={spread!r} must be a number > 1 (the factor a = +1 asks for)")
        self.spread = float(spread)

    def reference(self) -> float:
        """The ratio ``a = 0`` asks for at this step: the even keep ratio of what is left."""
        return self.env.unwrapped.even_keep_ratio()

    def action(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1).copy()
        if not np.all(np.isfinite(a)):
            return a  # the env names the bad action
        base = self.env.unwrapped
        ratio = self.reference() * self.spread ** float(np.clip(a[0], -1.0, 1.0))
        a[0] = action_of_ratio(min(1.0, max(base.min_keep, ratio)), base.min_keep)
        return a


class AnchoredActions(RelativeActions):
    """Map an action in [-1, 1] to the env's action asking for ``anchor[t] * SPREAD**a`` (component 0), where
    ``anchor`` is the env's ``cost.streams_whole()`` plan and ``t`` the step."""

    def __init__(self, env: gym.Env, spread: float = SPREAD):
        super().__init__(env, spread)
        self.anchor = self.env.unwrapped.cost.streams_whole()
        self._t = 0

    def reference(self) -> float:
        return float(self.anchor[min(self._t, len(self.anchor) - 1)])

    def reset(self, **kwargs):
        self._t = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        out = super().step(action)
        self._t += 1
        return out


def actions_of_config(config: dict) -> str:
    """The ``actions`` a run of ``agents.train`` used, from its ``config.yaml`` (older runs: absolute)."""
    return check_actions((config.get("hyperparams") or {}).get("actions", "absolute"))


def wrap_actions(env: gym.Env, actions: str) -> gym.Env:
    """``env`` itself for ``"absolute"``, else the wrapper of ``actions``."""
    wrapper = {"relative": RelativeActions, "anchored": AnchoredActions}.get(check_actions(actions))
    return wrapper(env) if wrapper else env
