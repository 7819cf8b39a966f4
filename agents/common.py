"""Shared helpers of the agents package: argument checks, env factories, JSON-safe env kwargs, file writing."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import yaml

import envs  # noqa: F401  (registers the ChannelPrune-* ids)
from envs import resolve_env_id
from envs.cores import CoreShare, WorkerCores
from envs.kwargs import check_kwargs
from envs.paths import atomic_write_text

from .algos import ALGOS
from .relative_actions import wrap_actions

BEST_FILE = "best.json"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.zip"
EPISODES_FILE = "episodes.csv"
SELECTED_MODEL_FILE = "selected.zip"  # the policy snapshot chosen on the reward split (agents.callbacks)
SELECTED_FILE = "selected.json"
SELECTION_FILE = "selection.csv"


# ------------------------------------------------------------------------------------------------ validation
def check_algo(algo: str) -> str:
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} is not allowed; allowed: {', '.join(ALGOS)}")
    return algo


def check_env_id(env_id: str) -> str:
    """The registered ChannelPrune id (an unversioned name means its latest version); ValueError otherwise."""
    return resolve_env_id(env_id)


def check_env_kwargs(env_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Reject unknown keys and bad values before anything is built (a worker's error would surface as EOFError)."""
    env_kwargs = dict(env_kwargs or {})
    if "problem" in env_kwargs:  # a built PruningProblem does not travel to workers or into a run's records
        raise ValueError("env kwarg 'problem' cannot be given here; give the problem's own keywords (model=, "
                         "budget=, ...)")
    check_kwargs(env_kwargs)
    return env_kwargs


def check_writable_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove a file can be written there; a clear ValueError otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise ValueError(f"out={str(out)!r} is not a writable directory ({type(exc).__name__}: {exc}); choose "
                         "another --out") from exc
    return path


# ------------------------------------------------------------------------------------------------ serialization
def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
        return True
    except (TypeError, ValueError):
        return False


def split_serializable(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the JSON-safe kwargs, {key: type name} of the rest) — a DatasetSplits or an nn.Module is not written."""
    ok, skipped = {}, {}
    for k, v in kwargs.items():
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if _jsonable(v):
            ok[k] = v
        else:
            skipped[k] = f"{type(v).__module__}.{type(v).__qualname__}"
    return ok, skipped


def to_builtin(value: Any) -> Any:
    """numpy scalars / arrays / tuples -> JSON- and yaml-safe Python values (others -> repr)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):  # plain types (torch.__version__ is a str subclass yaml cannot write)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write-then-rename, so a reader (or an interrupted run) never sees a half-written file."""
    atomic_write_text(path, json.dumps(to_builtin(data), indent=1) + "\n")


def write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(to_builtin(data), sort_keys=False))


# ------------------------------------------------------------------------------------------------ envs
class EpisodeReturnInfo(gym.Wrapper):
    """Put the episode's exact return (a Python float) in the last step's ``info["episode_return"]``.

    SB3's Monitor rounds its ``info["episode"]["r"]`` to 6 decimals and VecEnvs store rewards as float32; best.json
    records this exact value so that replaying it gives back the same number.
    """

    def reset(self, **kwargs):
        self._return = 0.0
        return self.env.reset(**kwargs)

    last_return: float | None = None  # the last finished episode's exact return

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return = getattr(self, "_return", 0.0) + float(reward)
        if terminated or truncated:
            info = dict(info, episode_return=self._return)
            self.last_return = self._return
        return obs, reward, terminated, truncated, info


@dataclass
class EnvFactory:
    """Picklable env constructor for (Subproc|Dummy)VecEnv: ``gym.make`` (+ ``RelativeActions`` when ``actions``
    is "relative") + exact return in the info + Monitor (+ the on-policy episode-reward baseline).

    ``single_thread`` (set for SubprocVecEnv workers) pins torch to one thread per worker: K workers on K cores
    would otherwise each start a full OpenMP pool and contend. ``cores`` (a slot of an ``envs.cores.CoreShare``)
    lets a worker that evaluates alone take the idle workers' cores.
    """

    env_id: str
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    single_thread: bool = False
    baseline_alpha: float | None = None  # set: wrap in EpisodeBaselineWrapper (on-policy episode-level reward)
    actions: str = "absolute"
    cores: WorkerCores | None = None

    def __call__(self) -> gym.Env:
        if self.single_thread:
            import torch

            torch.set_num_threads(1)
        from stable_baselines3.common.monitor import Monitor

        env = Monitor(EpisodeReturnInfo(wrap_actions(gym.make(self.env_id, **self.env_kwargs), self.actions)))
        if self.cores is not None:
            env.unwrapped.share_cores(self.cores)
        if self.baseline_alpha is not None:
            from .episode_reward import EpisodeBaselineWrapper

            env = EpisodeBaselineWrapper(env, alpha=self.baseline_alpha)
        return env


def worker_kwargs(env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A worker's env kwargs: it only reads the caches the parent built, and prints nothing."""
    return {**env_kwargs, "progress": False, "train_if_missing": False}


def make_vec_env(env_id: str, env_kwargs: dict[str, Any], n_envs: int = 1, baseline_alpha: float | None = None,
                 start_method: str | None = None, ray_address: str | None = None, actions: str = "absolute"):
    """DummyVecEnv for one env, SubprocVecEnv (one torch thread per worker) for several; with ``ray_address``
    ("local" or a cluster's address) a ``RayVecEnv``: each env a Ray actor with one CPU, anywhere on the cluster.

    With workers, the env is built once here first, so the checkpoint, data and predictor caches exist before
    they start; the workers only read them (``train_if_missing=False``, no progress output)."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    if n_envs == 1 and ray_address is None:
        return DummyVecEnv([EnvFactory(env_id, env_kwargs, False, baseline_alpha, actions)])
    gym.make(env_id, **env_kwargs).close()
    kwargs = worker_kwargs(env_kwargs)
    if ray_address is not None:
        from .distributed import RayVecEnv

        return RayVecEnv([EnvFactory(env_id, kwargs, True, baseline_alpha, actions) for _ in range(n_envs)],
                         address=ray_address)
    share = CoreShare(n_envs + 1)  # the workers lend each other idle cores; the last slot: the policy checks'
    vec_env = SubprocVecEnv([EnvFactory(env_id, kwargs, True, baseline_alpha, actions, share.slot(i))
                             for i in range(n_envs)], start_method=start_method)
    vec_env.core_share = share  # the shared block lives as long as the workers
    return vec_env


def make_selection_env(vec_env, env_id: str, env_kwargs: dict[str, Any], actions: str = "absolute"):
    """A one-env VecEnv like the training env, for :class:`agents.callbacks.PolicySelection`. With
    ``screen_size`` it races the checks as its own search (a fresh ``envs.screening.Screen``: a check is scored in
    full only when it may beat the best check so far).

    Beside ``make_vec_env``'s workers it is one more worker (a SubprocVecEnv with the last slot of their
    ``CoreShare``), so a check is scored while training goes on; beside a local env it shares that env's problem
    (no second build); otherwise it is built here from ``env_id`` and ``env_kwargs``."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    share = getattr(vec_env, "core_share", None)
    if share is not None:
        checker = EnvFactory(env_id, worker_kwargs(env_kwargs), True, None, actions, share.slot(share.workers - 1))
        return SubprocVecEnv([checker])
    local = getattr(vec_env, "envs", None)
    if local:
        checks = local[0].unwrapped.derive()  # same settings, its own race
        return DummyVecEnv([lambda: Monitor(EpisodeReturnInfo(wrap_actions(checks, actions)))])
    return DummyVecEnv([EnvFactory(env_id, env_kwargs, False, None, actions)])
