"""PPO / A2C's Gaussian policy with its mean kept inside the action bounds (preset ``policy: BoundedMlpPolicy``).

SB3's ``MlpPolicy`` draws actions from a Gaussian whose mean is an unbounded linear head, and the env clips the
draw to [-1, 1]. On ChannelPrune the mean can leave the bounds for good: PPO on ResNet-18 at budget 0.3 with
``budget_mode="fill"`` drove every group's mean to about -2 (std still 0.43), so nearly every draw clipped to -1,
the fill scaled that to the uniform plan, and from episode 275 every episode replayed it. Outside the bounds a
move of the mean barely changes the clipped actions, so nothing pulls it back.

Here the mean is ``tanh`` of the action head: it stays in [-1, 1], so a share of the draws always falls inside
the bounds and each group's ratio stays a live choice. The std is SB3's state-independent log-std, unchanged;
the draws are still clipped by the env, and PPO's log-probabilities are those of the unclipped Gaussian, as in
``MlpPolicy``. A model saved with it loads with ``PPO.load`` wherever ``agents`` is importable.

Measured (README, "Keeping PPO's mean inside the action bounds"; 3 seeds x 300 episodes, budget 0.3): it does not
beat random search, and the bounded means still end at -1 or +1 (where about half the draws clip). So the
presets keep ``MlpPolicy``; this class is the ablation's other arm.
"""

from __future__ import annotations

import torch
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy


class BoundedMlpPolicy(ActorCriticPolicy):
    """``MlpPolicy`` (actor-critic MLP) whose Gaussian mean is ``tanh(action_net(latent))``."""

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> Distribution:
        if isinstance(self.action_dist, DiagGaussianDistribution):
            return self.action_dist.proba_distribution(torch.tanh(self.action_net(latent_pi)), self.log_std)
        return super()._get_action_dist_from_latent(latent_pi)
