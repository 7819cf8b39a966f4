"""AMC's episode-level reward assignment, for SB3's online collection.

He et al., "AMC" (ECCV 2018): the reward comes only when the whole network is pruned, so every transition of an
episode is credited with the episode's final reward, and a moving-average baseline is subtracted to reduce the
variance. In AMC's DDPG (their ``amc_search.py`` / ``ddpg.py``) the transitions are buffered for the episode and
only enter the replay memory at its end, each with the final reward; at each update the moving average of the
sampled batch's mean reward (``b <- b + alpha * (mean - b)``, ``alpha = 0.5``) is subtracted from the batch.

SB3 collects online, so a Gymnasium wrapper cannot rewrite rewards it has already returned. The two families
therefore get different mechanisms (selected by ``--episode-reward``):

* off-policy (DDPG, TD3, SAC): :class:`EpisodeRewardReplayBuffer`, a ``ReplayBuffer`` that keeps an unfinished
  episode's transitions aside (so no update ever samples a transition before its reward is known, as in AMC) and
  commits them at the episode's end, each with the episode's return (the env gives 0 before the last step, so this
  is the final reward). Sampling subtracts AMC's moving-average baseline. ``done`` flags are kept as the env gave
  them, as in AMC (with ``gamma = 1`` the critic of step t then estimates the remaining steps' sum of the episode
  reward, as AMC's critic does).
* on-policy (PPO, A2C): the return of step t is ``sum_{t' >= t} gamma^(t'-t) r_t'``; with ``gamma = 1`` and
  ``gae_lambda = 1`` it *is* the final reward at every step, which is AMC's assignment without any buffer. The
  trainer forces both to 1 and wraps each env in :class:`EpisodeBaselineWrapper`, which subtracts the moving
  average of past episode rewards from the final reward (AMC's baseline; the critic's V(s) remains the
  advantage's baseline).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.type_aliases import ReplayBufferSamples


class EpisodeRewardReplayBuffer(ReplayBuffer):
    """Replay buffer that stores whole episodes, every transition carrying the episode's return.

    Takes the arguments of SB3's ``ReplayBuffer`` plus ``baseline_alpha`` (AMC's moving-average rate, 0.5;
    ``0`` disables the baseline). Internally one flat store (``n_envs=1``) holds the episodes of all envs in the
    order they finish; ``buffer_size`` is the total number of transitions.
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: Any = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        baseline_alpha: float = 0.5,
    ):
        if not 0.0 <= baseline_alpha <= 1.0:
            raise ValueError(f"baseline_alpha={baseline_alpha!r} must be in [0, 1]")
        if optimize_memory_usage:
            raise ValueError("optimize_memory_usage=True is not supported with episode-level rewards "
                             "(transitions are committed out of order across envs)")
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=1,
                         optimize_memory_usage=False, handle_timeout_termination=handle_timeout_termination)
        self.vec_n_envs = int(n_envs)
        self.baseline_alpha = float(baseline_alpha)
        self.baseline: float | None = None
        self._pending: list[list[tuple]] = [[] for _ in range(self.vec_n_envs)]

    def add(self, obs, next_obs, action, reward, done, infos: list[dict[str, Any]]) -> None:
        obs, next_obs = np.asarray(obs), np.asarray(next_obs)
        action = np.asarray(action).reshape((self.vec_n_envs, self.action_dim))
        reward, done = np.asarray(reward, dtype=np.float64).reshape(-1), np.asarray(done).reshape(-1)
        for i in range(self.vec_n_envs):
            timeout = bool(infos[i].get("TimeLimit.truncated", False))
            self._pending[i].append((obs[i].copy(), next_obs[i].copy(), action[i].copy(), float(reward[i]),
                                     bool(done[i]), timeout))
            if done[i]:
                self._commit(i)

    def _commit(self, i: int) -> None:
        episode, self._pending[i] = self._pending[i], []
        ret = float(sum(t[3] for t in episode))
        for o, no, a, _r, d, timeout in episode:
            super().add(o[None], no[None], a[None], np.array([ret]), np.array([d]),
                        [{"TimeLimit.truncated": timeout}])

    def sample(self, batch_size: int, env=None) -> ReplayBufferSamples:
        if self.size() == 0:
            raise RuntimeError("EpisodeRewardReplayBuffer is empty: no episode has finished yet; set "
                               "learning_starts "
                               "to at least one episode per env (the trainer does)")
        batch = super().sample(batch_size, env=env)
        if self.baseline_alpha == 0.0:
            return batch
        mean = float(batch.rewards.mean())
        b = self.baseline
        self.baseline = mean if b is None else b + self.baseline_alpha * (mean - b)
        return batch._replace(rewards=batch.rewards - self.baseline)


class EpisodeBaselineWrapper(gym.Wrapper):
    """Subtract the moving average of past episode rewards from each episode's final reward (on-policy AMC).

    ``b <- b + alpha * (R - b)`` after each episode (``b`` starts at the first episode's reward, so the first
    episode's shaped reward is 0). ``info["raw_reward"]`` keeps the env's reward at the last step.
    """

    def __init__(self, env: gym.Env, alpha: float = 0.5):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be in (0, 1]")
        super().__init__(env)
        self.alpha = float(alpha)
        self.baseline: float | None = None
        self._ret = 0.0

    def reset(self, **kwargs):
        self._ret = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._ret += float(reward)
        if terminated or truncated:
            info = dict(info, raw_reward=float(reward))
            b = self._ret if self.baseline is None else self.baseline
            shaped = reward - b
            self.baseline = b + self.alpha * (self._ret - b)
            reward = shaped
        return obs, float(reward), terminated, truncated, info
