"""Hyperparameter presets (``agents/presets.yaml``, RL-Zoo style) and their resolution into SB3 arguments.

Presets count in episodes where SB3 counts in steps (``n_steps_episodes``, ``warmup_episodes``), so one preset
fits models with different numbers of groups; :func:`resolve` converts them once the episode length is known.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.utils import LinearSchedule
from torch import nn

from .algos import ALGOS, ON_POLICY
from .bounded_policy import BetaMlpPolicy, BoundedMlpPolicy
from .episode_reward import EpisodeRewardReplayBuffer
from .noise import TruncatedNormalActionNoise
from .relative_actions import check_actions
from .self_imitation import check_self_imitation

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
EXTRA_KEYS = {
    "on": ("policy", "actions", "n_steps_episodes", "episode_reward", "baseline_alpha", "final_std",
           "select_every", "final_learning_rate", "self_imitation"),
    "off": ("policy", "actions", "warmup_episodes", "noise", "episode_reward", "baseline_alpha", "select_every",
            "final_learning_rate"),
}
# set by the trainer itself, never by a preset
RESERVED = ("env", "seed", "tensorboard_log", "_init_setup_model", "verbose")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU}
NOISES = ("truncated_normal", "normal")
# a preset's ``policy``: SB3's own names, plus ours for on-policy algos (a class is passed through as it is)
POLICIES = {"on": {"MlpPolicy": "MlpPolicy", "BoundedMlpPolicy": BoundedMlpPolicy, "BetaMlpPolicy": BetaMlpPolicy},
            "off": {"MlpPolicy": "MlpPolicy"}}


def load_presets(path: str | Path | None = None) -> dict[str, Any]:
    """The preset file as a dict (default: the packaged ``agents/presets.yaml``)."""
    path = Path(path) if path is not None else PRESETS_FILE
    if not path.is_file():
        raise ValueError(f"presets={str(path)!r} is not a file")
    data = yaml.safe_load(path.read_text()) or {}
    if "default" not in data:
        raise ValueError(f"presets file {str(path)!r} has no 'default' block")
    return data


def get_preset(algo: str, env_id: str, presets: dict[str, Any] | None = None) -> dict[str, Any]:
    """``default[algo]`` updated (one level deep) by ``presets[env_id][algo]``."""
    presets = load_presets() if presets is None else presets
    hp = copy.deepcopy(presets["default"].get(algo, {}))
    per_env = presets.get(env_id) or presets.get(env_id.removesuffix("-v0")) or {}  # unversioned: older files
    hp.update(copy.deepcopy(per_env.get(algo, {})))
    return hp


def allowed_keys(algo: str) -> list[str]:
    """SB3 constructor arguments of the algorithm (and its bases) plus the preset-only keys."""
    names: list[str] = []
    for cls in ALGOS[algo].__mro__:
        if not (isinstance(cls, type) and issubclass(cls, BaseAlgorithm)) or "__init__" not in cls.__dict__:
            continue
        for n, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or n == "self" or n in RESERVED:
                continue
            if n not in names:
                names.append(n)
    extra = EXTRA_KEYS["on" if algo in ON_POLICY else "off"]
    return names + [k for k in extra if k not in names]


def policy_names(algo: str) -> dict[str, Any]:
    """The preset ``policy`` names the algorithm accepts, each with what SB3 is given for it."""
    return POLICIES["on" if algo in ON_POLICY else "off"]


def check_keys(algo: str, hp: dict[str, Any], where: str) -> None:
    allowed = allowed_keys(algo)
    bad = [k for k in hp if k not in allowed]
    if bad:
        raise ValueError(f"{where}: unknown hyperparameter(s) {', '.join(map(repr, bad))} for algo={algo!r}; "
                         f"allowed: {', '.join(allowed)}")
    names = policy_names(algo)
    if isinstance(hp.get("policy"), str) and hp["policy"] not in names:
        raise ValueError(f"{where}: policy={hp['policy']!r} is not allowed for algo={algo!r}; allowed: "
                         f"{', '.join(names)}")


def _default_of(algo: str, name: str) -> Any:
    for cls in ALGOS[algo].__mro__:
        if "__init__" in cls.__dict__:
            p = inspect.signature(cls.__init__).parameters.get(name)
            if p is not None and p.default is not inspect.Parameter.empty:
                return p.default
    return None


@dataclass
class Resolved:
    """SB3 constructor kwargs plus what the trainer does around them."""

    kwargs: dict[str, Any]
    actions: str = "absolute"  # "relative" / "anchored": the envs are wrapped (agents/relative_actions.py)
    episode_reward: bool = False
    baseline_alpha: float = 0.5
    final_std: float | None = None  # on-policy: the std cap at the run's end (callbacks.ExplorationDecay)
    select_every: int | None = None  # training episodes between policy checks (callbacks.PolicySelection)
    self_imitation: dict[str, Any] | None = None  # on-policy: SIL's settings (self_imitation.SelfImitation)
    record: dict[str, Any] = field(default_factory=dict)  # yaml-safe view of the resolved hyperparameters


def resolve(algo: str, hp: dict[str, Any], episode_len: int, n_envs: int, action_dim: int) -> Resolved:
    """Turn a preset into SB3 arguments for an env whose episodes last ``episode_len`` steps."""
    check_keys(algo, hp, "hyperparameters")
    hp = copy.deepcopy(hp)
    record: dict[str, Any] = {}
    episode_reward = bool(hp.pop("episode_reward", False))
    alpha = float(hp.pop("baseline_alpha", 0.5))
    actions = check_actions(hp.pop("actions", "absolute"))
    final_std = hp.pop("final_std", None)
    if final_std is not None:
        if isinstance(final_std, bool) or not isinstance(final_std, (int, float)) or not 0 < final_std <= 1:
            raise ValueError(f"final_std={final_std!r} must be a number in (0, 1] (a std in the [-1, 1] actions)")
        if hp.get("policy") == "BetaMlpPolicy" or hp.get("policy") is BetaMlpPolicy:
            raise ValueError("final_std caps a Gaussian's std; policy='BetaMlpPolicy' has none")
        final_std = float(final_std)
    select_every = hp.pop("select_every", None)
    if select_every is not None and (isinstance(select_every, bool) or not isinstance(select_every, int)
                                     or select_every < 1):
        raise ValueError(f"select_every={select_every!r} must be a positive integer (training episodes per "
                         "check of the deterministic policy) or null (no checks)")
    self_imitation = hp.pop("self_imitation", None)
    if self_imitation is not None and self_imitation is not False:
        self_imitation = check_self_imitation(self_imitation)
        if episode_reward:  # the critic then learns returns minus a drifting baseline: kept returns go stale
            raise ValueError("self_imitation needs the env's own rewards; it cannot be combined with "
                             "episode_reward=True (AMC's moving baseline)")
    else:
        self_imitation = None
    final_lr = hp.pop("final_learning_rate", None)
    if final_lr is not None:
        start = hp.get("learning_rate", _default_of(algo, "learning_rate"))
        for name, value in (("final_learning_rate", final_lr), ("learning_rate", start)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number when final_learning_rate is set "
                                 "(the learning rate then falls linearly from learning_rate to it over the run)")
        # SB3 calls a schedule with the progress remaining (1 at the start, 0 at the end of learn())
        hp["learning_rate"] = LinearSchedule(float(start), float(final_lr), end_fraction=1.0)
        record["learning_rate"], record["final_learning_rate"] = float(start), float(final_lr)
    hp.setdefault("policy", "MlpPolicy")
    record["policy"] = getattr(hp["policy"], "__name__", hp["policy"])
    if isinstance(hp["policy"], str):
        hp["policy"] = policy_names(algo)[hp["policy"]]

    pk = hp.get("policy_kwargs")
    if pk and isinstance(pk.get("activation_fn"), str):
        name = pk["activation_fn"]
        if name not in ACTIVATIONS:
            raise ValueError(f"policy_kwargs.activation_fn={name!r} is not allowed; allowed: "
                             f"{', '.join(ACTIVATIONS)}")
        pk["activation_fn"] = ACTIVATIONS[name]

    if algo in ON_POLICY:
        n_ep = hp.pop("n_steps_episodes", None)
        if n_ep is not None and "n_steps" not in hp:
            hp["n_steps"] = max(1, int(round(float(n_ep) * episode_len)))
        n_steps = int(hp.get("n_steps", _default_of(algo, "n_steps")))
        if "batch_size" in hp:  # PPO: the largest divisor of the rollout size not above the preset's batch
            rollout = n_steps * n_envs
            want = max(2, min(int(hp["batch_size"]), rollout))
            hp["batch_size"] = next((b for b in range(want, 1, -1) if rollout % b == 0), want)
        if episode_reward:  # Monte-Carlo returns: every step's return is the episode's final reward
            hp["gamma"], hp["gae_lambda"] = 1.0, 1.0
    else:
        warm = hp.pop("warmup_episodes", None)
        if warm is not None and "learning_starts" not in hp:
            hp["learning_starts"] = int(round(float(warm) * episode_len))
        if episode_reward:
            # updates may only start once every env has committed an episode to the buffer
            ls = hp.get("learning_starts", _default_of(algo, "learning_starts"))
            hp["learning_starts"] = max(int(ls), n_envs * episode_len)
            if hp.get("replay_buffer_class") not in (None, EpisodeRewardReplayBuffer):
                raise ValueError("episode_reward=True replaces the replay buffer; do not also set "
                                 "replay_buffer_class")
            hp["replay_buffer_class"] = EpisodeRewardReplayBuffer
            hp["replay_buffer_kwargs"] = {**(hp.get("replay_buffer_kwargs") or {}), "baseline_alpha": alpha}
        tf = hp.get("train_freq")
        if isinstance(tf, (list, tuple)):
            freq, unit = int(tf[0]), str(tf[1])
            if unit == "episode" and n_envs > 1:  # SB3 allows episode units with one env only
                freq, unit = freq * episode_len, "step"
            hp["train_freq"] = (freq, unit)
        noise = hp.pop("noise", None)
        if noise is not None:
            record["noise"] = dict(noise)
            hp["action_noise"] = make_noise(noise, action_dim, episode_len, n_envs,
                                            int(hp.get("learning_starts", _default_of(algo, "learning_starts"))))
    skip = ("action_noise", "policy") + (("learning_rate",) if final_lr is not None else ())  # recorded above
    record.update({k: v for k, v in hp.items() if k not in skip})
    record["episode_reward"], record["baseline_alpha"], record["actions"] = episode_reward, alpha, actions
    for key, value in (("final_std", final_std), ("select_every", select_every),
                       ("self_imitation", self_imitation)):
        if value is not None:
            record[key] = value
    return Resolved(kwargs=hp, actions=actions, episode_reward=episode_reward, baseline_alpha=alpha,
                    final_std=final_std, select_every=select_every, self_imitation=self_imitation,
                    record=record)


def make_noise(spec: dict[str, Any], action_dim: int, episode_len: int, n_envs: int, learning_starts: int):
    """Build the action noise of a preset's ``noise`` block."""
    if not isinstance(spec, dict) or spec.get("type") not in NOISES:
        raise ValueError(f"noise={spec!r} must be a mapping with type in {', '.join(NOISES)}")
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "normal":
        sigma = float(spec.pop("sigma", 0.1))
        if spec:
            raise ValueError(f"noise: unknown key(s) {sorted(spec)} for type 'normal'; allowed: sigma")
        return NormalActionNoise(np.zeros(action_dim), sigma * np.ones(action_dim))
    allowed = ("sigma", "decay", "min_sigma")
    if any(k not in allowed for k in spec):
        raise ValueError(f"noise: unknown key(s) {sorted(set(spec) - set(allowed))} for type 'truncated_normal'; "
                         f"allowed: {', '.join(allowed)}")
    # the decay starts after the random warm-up (counted in episodes over all envs)
    warm = math.ceil(learning_starts / max(episode_len, 1))
    return TruncatedNormalActionNoise(size=action_dim, warmup_episodes=warm, **spec)
