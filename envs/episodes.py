"""The one episode runner: a policy (anything with SB3's ``predict``) or a fixed action sequence on an env."""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from .budget import action_of_ratio


def unwrap(env: gym.Env) -> gym.Env:
    """The environment under any Gymnasium wrappers (``env.unwrapped``), or ``env`` itself."""
    return env.unwrapped if hasattr(env, "unwrapped") else env


def run_episode(env: gym.Env, policy: Any, seed: int | None = 0, deterministic: bool = True
                ) -> tuple[float, dict[str, Any]]:
    """One episode of ``policy.predict`` on ``env`` reset with ``seed``; returns (return, the final info)."""
    obs, info = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        action, _ = policy.predict(obs, deterministic=deterministic)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        done = terminated or truncated
    return total, dict(info)


class ActionSequence:
    """A policy that plays fixed actions in order (one per step, from reset)."""

    def __init__(self, actions: Sequence[Any]):
        self.actions, self.t = [np.asarray(a, dtype=np.float64).reshape(-1) for a in actions], 0

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        if self.t >= len(self.actions):
            raise ValueError(f"actions: {len(self.actions)} given, but the episode asks for step {self.t + 1}")
        self.t += 1
        return self.actions[self.t - 1], state


def run_actions(env: gym.Env, actions: Sequence[Any], seed: int | None = 0) -> dict[str, Any]:
    """Reset ``env`` with ``seed`` and take ``actions`` in order until the episode ends; returns the final info."""
    return run_episode(env, ActionSequence(actions), seed)[1]


def plan_action(t: int, keep_ratios: Sequence[float], runtime_ratios: Sequence[float] | None, min_keep: float,
                runtime: bool, dtype: type = np.float32) -> np.ndarray:
    """Step ``t``'s action of a plan: it asks for ``keep_ratios[t]`` (and, with ``runtime``, ``runtime_ratios[t]``;
    1 when None). The one place plans become actions: policies answer in the action space's float32, replays
    (``actions_of_ratios``) in float64, which the env steps with."""
    a = [action_of_ratio(float(keep_ratios[t]), min_keep)]
    if runtime:
        a.append(action_of_ratio(1.0 if runtime_ratios is None else float(runtime_ratios[t]), min_keep))
    return np.asarray(a, dtype=dtype)


def actions_of_ratios(keep_ratios: Sequence[float], runtime_ratios: Sequence[float] | None, min_keep: float,
                      runtime: bool) -> list[np.ndarray]:
    """The actions that ask for ``keep_ratios`` (and, with ``runtime``, ``runtime_ratios``; 1 when None)."""
    return [plan_action(t, keep_ratios, runtime_ratios, min_keep, runtime, np.float64)
            for t in range(len(keep_ratios))]


def step_of(observation: np.ndarray, n_groups: int) -> int:
    """The step index an observation is for (its first entry, ``index / (n_groups - 1)``); ValueError when it is
    not one of ``n_groups`` steps (an observation of a model with another number of groups)."""
    x = float(np.asarray(observation).reshape(-1)[0]) * max(n_groups - 1, 1)
    t = int(round(x))
    if not (0 <= t < n_groups and abs(x - t) < 1e-3):
        raise ValueError(f"observation index {float(np.asarray(observation).reshape(-1)[0]):.6f} is not a step of "
                         f"a {n_groups}-group episode; this policy's plan is for another model")
    return t
