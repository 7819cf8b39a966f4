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

Measured (docs/reports/agents.md, "Keeping PPO's mean inside the action bounds"; 3 seeds x 300 episodes, budget
0.3): it does not beat random search, and the bounded means still end at -1 or +1 (where about half the draws
clip). So the presets keep ``MlpPolicy``; this class is the ablation's other arm.

``BetaMlpPolicy`` (preset ``policy: BetaMlpPolicy``) draws each action from a Beta distribution on [-1, 1] instead
(Chou, Maturana & Scherer, ICML 2017): its support is the action box, so no draw is clipped and the
log-probabilities are those of the actions the env receives. A clipped Gaussian's mean near a bound gets
almost no gradient (and clipping biases it toward the bound); a Beta's concentrations keep one. Both
concentrations are ``1 + softplus`` of the action head, so the density is unimodal, and the deterministic action
is its mode. Measured (docs/reports/agents.md, "Relative actions"; a 2-seed pilot with ``actions: relative``): it
converges instead of drifting, but onto corner plans too; not in the presets.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn
from torch.nn import functional as F


class BoundedMlpPolicy(ActorCriticPolicy):
    """``MlpPolicy`` (actor-critic MLP) whose Gaussian mean is ``tanh(action_net(latent))``."""

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> Distribution:
        if isinstance(self.action_dist, DiagGaussianDistribution):
            return self.action_dist.proba_distribution(torch.tanh(self.action_net(latent_pi)), self.log_std)
        return super()._get_action_dist_from_latent(latent_pi)


class BetaDistribution(Distribution):
    """Independent Beta distributions, one per action dimension, mapped from (0, 1) onto (-1, 1)."""

    _EPS = 1e-6  # keeps log-probabilities finite for actions at the bounds

    def __init__(self, action_dim: int):
        super().__init__()
        self.action_dim = action_dim

    def proba_distribution_net(self, latent_dim: int) -> nn.Module:
        return nn.Linear(latent_dim, 2 * self.action_dim)  # the two concentrations' pre-activations

    def proba_distribution(self, params: torch.Tensor) -> "BetaDistribution":
        conc = 1.0 + F.softplus(params)
        self.distribution = torch.distributions.Beta(conc[..., :self.action_dim], conc[..., self.action_dim:])
        return self

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        x = ((actions + 1.0) / 2.0).clamp(self._EPS, 1.0 - self._EPS)
        return (self.distribution.log_prob(x) - math.log(2.0)).sum(dim=-1)  # density on [-1, 1]: Jacobian 1/2

    def entropy(self) -> torch.Tensor:
        return (self.distribution.entropy() + math.log(2.0)).sum(dim=-1)

    def sample(self) -> torch.Tensor:
        return 2.0 * self.distribution.rsample() - 1.0

    def mode(self) -> torch.Tensor:
        a, b = self.distribution.concentration1, self.distribution.concentration0
        return 2.0 * (a - 1.0) / (a + b - 2.0).clamp_min(self._EPS) - 1.0  # a, b > 1: the interior maximum

    def actions_from_params(self, params: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        self.proba_distribution(params)
        return self.get_actions(deterministic=deterministic)

    def log_prob_from_params(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actions = self.actions_from_params(params)
        return actions, self.log_prob(actions)


class BetaMlpPolicy(ActorCriticPolicy):
    """``MlpPolicy`` (actor-critic MLP) with a Beta distribution per action dimension instead of a Gaussian."""

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        box = self.action_space
        if not isinstance(self.action_dist, DiagGaussianDistribution) or not (
                (box.low == -1).all() and (box.high == 1).all()):
            raise ValueError(f"BetaMlpPolicy needs a Box action space with bounds [-1, 1]; got {box}")
        self.action_dist = BetaDistribution(self.action_space.shape[0])
        self.action_net = self.action_dist.proba_distribution_net(self.mlp_extractor.latent_dim_pi)
        if self.ortho_init:  # small output weights, as SB3 gives its own action head: both concentrations ~1.7
            self.action_net.apply(partial(self.init_weights, gain=0.01))
        del self.log_std  # the Gaussian's; a Beta's spread comes from its concentrations
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_action_dist_from_latent(self, latent_pi: torch.Tensor) -> Distribution:
        return self.action_dist.proba_distribution(self.action_net(latent_pi))
