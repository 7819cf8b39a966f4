"""AMC's exploration noise: a truncated normal around the actor's action, its sigma decaying per episode.

He et al., "AMC: AutoML for Model Compression and Acceleration on Mobile Devices" (ECCV 2018): after a warm-up
of random episodes, the DDPG actor's action ``mu`` is perturbed by sampling from ``TN(mu, sigma^2, lo, hi)``, a
normal truncated to the action bounds, with ``sigma = 0.5`` decaying by ``0.95`` after every episode.

SB3's ``ActionNoise`` interface is ``noise()`` -> an additive perturbation that does not see the action, and SB3
clips ``action + noise`` to [-1, 1] (a *clipped*, not a truncated, normal: mass piles up at the bounds). The
algorithms in :mod:`agents.algos` therefore call :meth:`TruncatedNormalActionNoise.around` with the actor's
(scaled) action, which samples the truncated normal exactly; plain ``noise()`` (used by stock SB3 algorithms)
falls back to a zero-mean normal truncated to ``[-sigma_clip, sigma_clip]`` with ``sigma_clip = hi - lo``.

The schedule is AMC's: in episode ``e`` (0-based, counted over all envs) after ``warmup_episodes`` random ones,
``sigma = sigma0 * decay ** (e - warmup_episodes)``. The algorithms in :mod:`agents.algos` set the episode index
from SB3's episode counter before sampling. Used by a stock SB3 algorithm, the noise counts its ``reset()`` calls
instead, which SB3 makes at every episode end but also once at the start of ``learn()`` (one decay step early).
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri
from stable_baselines3.common.noise import ActionNoise


class TruncatedNormalActionNoise(ActionNoise):
    """Truncated-normal exploration noise with per-episode geometric decay (AMC).

    Args:
        size: action dimension.
        sigma: initial standard deviation (in the scaled action space [-1, 1]).
        decay: sigma is multiplied by this after every episode past the warm-up (AMC: 0.95).
        warmup_episodes: random warm-up episodes (over all envs) before the decay starts.
        low / high: truncation bounds of the scaled action (SB3's scaled space is [-1, 1]).
        min_sigma: floor of the decayed sigma.
    """

    def __init__(self, size: int = 1, sigma: float = 0.5, decay: float = 0.95, warmup_episodes: int = 0,
                 low: float = -1.0, high: float = 1.0, min_sigma: float = 0.0):
        if not (sigma >= 0 and np.isfinite(sigma)):
            raise ValueError(f"sigma={sigma!r} must be a finite number >= 0")
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay!r} must be in (0, 1]")
        if not low < high:
            raise ValueError(f"low={low!r} must be < high={high!r}")
        super().__init__()
        self.size, self.sigma0, self.decay = int(size), float(sigma), float(decay)
        self.warmup_episodes, self.low, self.high = int(warmup_episodes), float(low), float(high)
        self.min_sigma = float(min_sigma)
        self.episode = 0  # index of the current episode (set by agents.algos; else counted by reset())

    def sigma_at(self, episode: int) -> float:
        """``sigma0 * decay ** (episode - warmup_episodes)``, sigma0 during the warm-up, at least ``min_sigma``."""
        return max(self.min_sigma, self.sigma0 * self.decay ** max(0, int(episode) - self.warmup_episodes))

    @property
    def sigma(self) -> float:
        """The standard deviation for the current episode."""
        return self.sigma_at(self.episode)

    def reset(self) -> None:
        """Called by SB3 at each episode end (and at the start of ``learn``)."""
        self.episode += 1

    def _truncated(self, mu: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
        # inverse-CDF sampling from SB3's global numpy RNG (seeded by the algorithm's seed)
        sigma = self.sigma
        if sigma == 0.0:
            return np.clip(mu, lo, hi)
        a, b = ndtr((lo - mu) / sigma), ndtr((hi - mu) / sigma)
        u = np.random.uniform(size=mu.shape)
        x = mu + sigma * ndtri(a + u * (b - a))
        return np.clip(np.nan_to_num(x, nan=0.0), lo, hi)

    def around(self, mu: np.ndarray) -> np.ndarray:
        """A sample of ``TN(mu, sigma^2)`` truncated to ``[low, high]`` (AMC's exploration), shaped like ``mu``."""
        mu = np.clip(np.asarray(mu, dtype=np.float64), self.low, self.high)
        return self._truncated(mu, self.low, self.high).astype(np.float32)

    def __call__(self) -> np.ndarray:
        """Additive fallback for stock SB3 algorithms: zero-mean normal truncated to +-(high - low)."""
        span = self.high - self.low
        return self._truncated(np.zeros(self.size), -span, span).astype(np.float32)

    def __repr__(self) -> str:
        return (f"TruncatedNormalActionNoise(sigma={self.sigma0}, decay={self.decay}, "
                f"warmup_episodes={self.warmup_episodes}, now={self.sigma:.4f})")
