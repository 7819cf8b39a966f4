"""Self-imitation for on-policy agents: learn again from the best episodes the run has found.

Oh, Guo, Singh & Lee, "Self-Imitation Learning", ICML 2018 (SIL). Between the updates of PPO / A2C, SIL replays
past transitions and raises the log-probability of those whose return ``R`` beat the critic's estimate ``V(s)``:

    L_sil = E[ -log pi(a | s) * (R - V(s))+ ]  +  beta / 2 * E[ ((R - V(s))+)^2 ]

(the advantage is clipped at 0 and not differentiated in the policy term; the value term lifts ``V`` towards the
returns that beat it, so an episode stops being imitated once the critic expects it).

Why here: on ResNet-56 the Gaussian's mean drifts back to the anchor (a = 0) while the good plans come from
exploration (docs/reports/agents.md, "A falling learning rate on ResNet-56"), so the deterministic policy ends
below the run's best episodes. SIL turns those episodes into a training signal for the mean. It costs no
evaluation of a pruned network: it reuses episodes already scored.

Measured (docs/reports/agents.md, "Self-imitation on ResNet-56"; budget 0.3, 5 seeds, the defaults): the selected
policy 2.6 points below the preset's on test (paired [-5.0, -0.2]), best of 280 2.3 below (a tie); the policy
leaves the anchor more often but finds worse plans. So no preset uses it.

Deviations from the paper: the buffer keeps only the ``top_k`` episodes by return (the paper keeps all and samples
by clipped advantage; an episode below the critic's estimate has zero weight either way), it has its own Adam
optimizer at the policy's current learning rate (so PPO's moment estimates are not disturbed), and an episode
stopped at a rung of a race (``screen_size``) is never kept: its score is a part-split guess.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from .callbacks import episode_return

SIL_KEYS = {"top_k": 8, "steps": 4, "batch_size": 64, "value_coef": 0.01}


def check_self_imitation(spec: Any) -> dict[str, Any]:
    """The preset's ``self_imitation`` mapping with its defaults filled in (ValueError naming a bad entry)."""
    if spec is True:
        spec = {}
    if not isinstance(spec, dict):
        raise ValueError(f"self_imitation={spec!r} must be a mapping with keys {', '.join(SIL_KEYS)} (or true "
                         f"for the defaults {SIL_KEYS}), or null")
    bad = sorted(set(spec) - set(SIL_KEYS))
    if bad:
        raise ValueError(f"self_imitation: unknown key(s) {bad}; allowed: {', '.join(SIL_KEYS)}")
    out = {**SIL_KEYS, **spec}
    for key in ("top_k", "steps", "batch_size"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"self_imitation.{key}={v!r} must be a positive integer")
    v = out["value_coef"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"self_imitation.value_coef={v!r} must be a number >= 0")
    out["value_coef"] = float(v)
    return out


class SelfImitation(BaseCallback):
    """Keep the ``top_k`` episodes by return; before each rollout after the first, take ``steps`` SIL gradient
    steps on minibatches of their transitions (on-policy algorithms: PPO, A2C).

    Args:
        top_k: episodes kept (the best returns so far, fully scored ones only).
        steps: SIL gradient steps per rollout.
        batch_size: transitions per step (all of them when fewer are kept).
        value_coef: beta, the weight of the value term.
        seed: seeds the minibatch sampling.
    """

    def __init__(self, top_k: int = 8, steps: int = 4, batch_size: int = 64, value_coef: float = 0.01,
                 seed: int | None = None):
        super().__init__()
        spec = check_self_imitation({"top_k": top_k, "steps": steps, "batch_size": batch_size,
                                     "value_coef": value_coef})
        self.top_k, self.steps, self.batch_size = spec["top_k"], spec["steps"], spec["batch_size"]
        self.value_coef = spec["value_coef"]
        self.rng = np.random.default_rng(seed)
        # min-heap of (episode return, order, observations, actions, returns-to-go per step)
        self.elites: list[tuple[float, int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._seen = 0
        self._open: dict[int, tuple[list, list, list]] = {}  # per env: the episode so far (obs, actions, rewards)
        self._optimizer: torch.optim.Optimizer | None = None

    def _on_training_start(self) -> None:
        self._optimizer = torch.optim.Adam(self.model.policy.parameters(), lr=self._learning_rate())

    def _learning_rate(self) -> float:
        return float(self.model.policy.optimizer.param_groups[0]["lr"])

    def _on_step(self) -> bool:
        obs = self.locals["obs_tensor"].detach().cpu().numpy()
        actions = np.asarray(self.locals["actions"])
        dones = np.asarray(self.locals["dones"])
        infos = self.locals["infos"]
        rewards = np.asarray(self.locals.get("rewards", np.zeros(len(dones))))
        for i in range(len(dones)):
            episode_obs, episode_actions, episode_rewards = self._open.setdefault(i, ([], [], []))
            episode_obs.append(obs[i].copy())
            episode_actions.append(actions[i].copy())
            episode_rewards.append(float(rewards[i]))
            if dones[i]:
                del self._open[i]
                if not infos[i].get("screened"):
                    self._keep(episode_return(infos[i], float(rewards[i])), np.stack(episode_obs),
                               np.stack(episode_actions), self._returns_to_go(episode_rewards))
        return True

    def _returns_to_go(self, rewards: list[float]) -> np.ndarray:
        """The discounted return from each step on, of the rewards the critic learns from (gamma = 1 in the
        presets: every step's is the episode's accuracy)."""
        out, running = np.zeros(len(rewards), dtype=np.float32), 0.0
        for t in range(len(rewards) - 1, -1, -1):
            running = rewards[t] + self.model.gamma * running
            out[t] = running
        return out

    def _keep(self, ret: float, obs: np.ndarray, act: np.ndarray, returns: np.ndarray) -> None:
        """Offer an episode: its return ``ret`` ranks it; ``returns`` are its steps' returns-to-go."""
        self._seen += 1
        item = (ret, self._seen, obs, act, returns)
        if len(self.elites) < self.top_k:
            heapq.heappush(self.elites, item)
        elif ret > self.elites[0][0]:
            heapq.heapreplace(self.elites, item)

    def _on_rollout_start(self) -> None:
        if self.elites:
            self.update()

    def update(self) -> float:
        """``steps`` SIL gradient steps on the kept episodes; returns the last step's loss."""
        policy = self.model.policy
        obs = torch.as_tensor(np.concatenate([e[2] for e in self.elites]), device=policy.device)
        act = torch.as_tensor(np.concatenate([e[3] for e in self.elites]), device=policy.device)
        ret = torch.as_tensor(np.concatenate([e[4] for e in self.elites]), device=policy.device)
        for group in self._optimizer.param_groups:  # follow the policy's (possibly scheduled) learning rate
            group["lr"] = self._learning_rate()
        loss = torch.zeros(())
        for _ in range(self.steps):
            idx = self.rng.choice(len(ret), size=min(self.batch_size, len(ret)), replace=False)
            idx_t = torch.as_tensor(idx, device=policy.device)
            values, log_prob, _ = policy.evaluate_actions(obs[idx_t], act[idx_t])
            advantage = (ret[idx_t] - values.flatten()).clamp(min=0.0)
            loss = -(log_prob * advantage.detach()).mean() + self.value_coef * 0.5 * (advantage ** 2).mean()
            self._optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), getattr(self.model, "max_grad_norm", 0.5))
            self._optimizer.step()
        self.logger.record("self_imitation/loss", float(loss.detach()))
        self.logger.record("self_imitation/best_return", max(e[0] for e in self.elites))
        return float(loss.detach())
