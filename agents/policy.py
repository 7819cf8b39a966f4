"""``best.json`` as a policy: replay the best episode a training run found.

:class:`BestPolicy` answers SB3's ``predict(observation, state=None, episode_start=None, deterministic=True)``
like the baselines do (:class:`baselines.base.Baseline`), so ``evaluate_policy`` and the benchmark can run it
beside them. The step index is read from ``observation[0] = index / (n_groups - 1)``; the recorded keep ratio
``r`` (kept channels / channels, so the env's rounding gives back the same count) maps to the action
``2 (r - min_keep) / (1 - min_keep) - 1`` with the ``min_keep`` recorded in ``best.json``. In runtime mode the
second action component is the recorded runtime ratio, mapped the same way.

:func:`make_env_from_best` rebuilds the env the episode ran on from the recorded env id and kwargs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the ChannelPrune-* ids)
from envs.episodes import plan_action, step_of

from .common import BEST_FILE, check_env_id


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / BEST_FILE
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a best.json file (nor a run directory holding one)")
    return path


class BestPolicy:
    """A fixed per-group plan of keep ratios (and runtime ratios) with SB3's ``predict``."""

    def __init__(self, keep_ratios, min_keep: float, runtime_ratios=None, mode: str = "static",
                 record: dict[str, Any] | None = None):
        self.keep_ratios = np.asarray(keep_ratios, dtype=np.float64)
        if self.keep_ratios.ndim != 1 or len(self.keep_ratios) == 0:
            raise ValueError(f"keep_ratios must be a non-empty 1-d list; got shape {self.keep_ratios.shape}")
        if not 0 < float(min_keep) <= 1:
            raise ValueError(f"min_keep={min_keep!r} must be in (0, 1]")
        self.min_keep = float(min_keep)
        self.runtime_ratios = None if runtime_ratios is None else np.asarray(runtime_ratios, dtype=np.float64)
        if mode not in ("static", "runtime"):
            raise ValueError(f"mode={mode!r} is not allowed; allowed: static, runtime")
        self.mode = mode
        self.record = dict(record or {})
        self.n_groups = len(self.keep_ratios)

    @classmethod
    def load(cls, path: str | Path) -> "BestPolicy":
        """From a ``best.json`` file (or the run directory holding it)."""
        path = _resolve(path)
        rec = json.loads(path.read_text())
        missing = [k for k in ("keep_ratios", "min_keep") if k not in rec]
        if missing:
            raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}; it was not written by agents.train")
        return cls(rec["keep_ratios"], rec["min_keep"], rec.get("runtime_ratios"), rec.get("mode", "static"), rec)

    def action_for_step(self, t: int) -> np.ndarray:
        if not 0 <= int(t) < self.n_groups:
            raise ValueError(f"step t={t!r} is outside this {self.n_groups}-group plan")
        return plan_action(int(t), self.keep_ratios, self.runtime_ratios, self.min_keep, self.mode == "runtime")

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """SB3's interface: (action or batch of actions, state). An observation of a model with another number
        of groups raises ValueError (``envs.episodes.step_of``)."""
        obs = np.asarray(observation, dtype=np.float64)
        acts = [self.action_for_step(step_of(o, self.n_groups)) for o in obs.reshape(-1, obs.shape[-1])]
        return (acts[0] if obs.ndim == 1 else np.stack(acts)), state


def make_env_from_record(rec: dict[str, Any], where: str = "record", **overrides: Any) -> gym.Env:
    """``gym.make(rec["env_id"], **rec["env_kwargs"], **overrides)``; names the kwargs that must be passed."""
    env_id = check_env_id(rec.get("env_id", ""))
    kwargs = dict(rec.get("env_kwargs") or {})
    kwargs.update(overrides)
    missing = {k: t for k, t in (rec.get("env_kwargs_skipped") or {}).items() if k not in overrides}
    if missing:
        raise ValueError(f"{where} was recorded with env kwargs that could not be written to JSON: "
                         f"{', '.join(f'{k} ({t})' for k, t in missing.items())}; pass them as overrides "
                         f"({next(iter(missing))}=...)")
    return gym.make(env_id, **kwargs)


def make_env_from_best(path: str | Path, **overrides: Any) -> gym.Env:
    """``gym.make`` of the recorded env id with the recorded kwargs (``overrides`` replace or add kwargs).

    Kwargs that were not JSON-serializable (e.g. ``data``, a DatasetSplits) were not recorded: pass them here.
    """
    path = _resolve(path)
    return make_env_from_record(json.loads(path.read_text()), repr(str(path)), **overrides)
