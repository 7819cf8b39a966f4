"""The SB3 algorithms the trainer offers, with two additions AMC's DDPG recipe needs.

* Truncated-normal exploration (He et al., AMC, ECCV 2018): when the action noise is a
  :class:`~agents.noise.TruncatedNormalActionNoise`, the actor's action is replaced by a sample of the normal
  around it truncated to the action bounds (SB3 would add the noise and clip), and no noise is added to the random
  warm-up actions (AMC's warm-up is purely random).
* Separate actor and critic learning rates (AMC: 1e-4 / 1e-3). SB3 has one ``learning_rate`` (applied to both
  optimizers); ``actor_learning_rate`` (optional) overrides the actor's after SB3 sets it, so ``learning_rate`` is
  the critic's.

Everything else is stock SB3; a model saved by these classes also loads with the stock class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3 import DDPG as _DDPG
from stable_baselines3 import TD3 as _TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.noise import ActionNoise, VectorizedActionNoise

from .noise import TruncatedNormalActionNoise


class _AMCMixin:
    """Truncated-normal exploration around the actor's action and an optional separate actor learning rate."""

    actor_learning_rate: float | None = None

    def _sample_action(self, learning_starts: int, action_noise: ActionNoise | None = None, n_envs: int = 1):
        base = action_noise.base_noise if isinstance(action_noise, VectorizedActionNoise) else action_noise
        if not isinstance(base, TruncatedNormalActionNoise):
            return super()._sample_action(learning_starts, action_noise, n_envs)
        if self.num_timesteps < learning_starts:  # AMC's warm-up: uniform random actions, no noise
            return super()._sample_action(learning_starts, None, n_envs)
        unscaled, _ = self.predict(self._last_obs, deterministic=True)
        scaled = self.policy.scale_action(unscaled)
        if isinstance(action_noise, VectorizedActionNoise):
            for noise in action_noise.noises:
                noise.episode = self._episode_num  # AMC's schedule counts episodes, over all envs
            noisy = np.stack([noise.around(scaled[i]) for i, noise in enumerate(action_noise.noises)])
        else:
            action_noise.episode = self._episode_num
            noisy = action_noise.around(scaled)
        return self.policy.unscale_action(noisy), noisy

    def _update_learning_rate(self, optimizers) -> None:
        super()._update_learning_rate(optimizers)
        if self.actor_learning_rate is not None and hasattr(self, "actor"):
            for group in self.actor.optimizer.param_groups:
                group["lr"] = float(self.actor_learning_rate)
            self.logger.record("train/actor_learning_rate", float(self.actor_learning_rate))


class DDPG(_AMCMixin, _DDPG):
    """SB3's DDPG with truncated-normal exploration and ``actor_learning_rate`` (AMC's agent)."""

    def __init__(self, *args: Any, actor_learning_rate: float | None = None, **kwargs: Any):
        self.actor_learning_rate = actor_learning_rate
        super().__init__(*args, **kwargs)


class TD3(_AMCMixin, _TD3):
    """SB3's TD3 with the same two options as :class:`DDPG`."""

    def __init__(self, *args: Any, actor_learning_rate: float | None = None, **kwargs: Any):
        self.actor_learning_rate = actor_learning_rate
        super().__init__(*args, **kwargs)


ALGOS: dict[str, type[BaseAlgorithm]] = {"ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3, "ddpg": DDPG}
ON_POLICY = ("ppo", "a2c")
OFF_POLICY = ("sac", "td3", "ddpg")
