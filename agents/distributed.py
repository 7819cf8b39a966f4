"""Ray for scale-out: connecting to a cluster, and a VecEnv whose environments are Ray actors.

``RayVecEnv`` implements Stable-Baselines3's ``VecEnv`` API with the semantics of SB3's ``SubprocVecEnv`` (each
environment resets itself when its episode ends and returns the last observation in
``info["terminal_observation"]``; ``seed()`` / ``set_options()`` apply at the next ``reset()``), so every SB3
algorithm trains with it unchanged and the same seeds give the same episodes as ``--n-envs K`` locally. Each
actor builds its environment from the shared cache (``$CHANNELPRUNE_CACHE`` on a shared path, or one machine):
the parent builds the env once first so every cache exists, and the actors never train
(``train_if_missing=False``), as with ``SubprocVecEnv``.

Ray is an optional dependency (``pip install -e ".[ray]"``, which ``make setup`` installs); it is imported only
here, when asked for.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

LOCAL = "local"


def connect(address: str | None = LOCAL, **init_kwargs: Any):
    """``ray.init`` once per process: ``"local"`` (or None) starts a local Ray; otherwise ``address`` is an
    existing cluster ("auto", "HOST:PORT", "ray://HOST:PORT"). Returns the ``ray`` module."""
    try:
        import ray
    except ImportError as exc:  # the extra is not installed
        raise ValueError("Ray is not installed: pip install -e '.[ray]' (make setup installs it)") from exc
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": True, **init_kwargs}
        if address not in (None, LOCAL):
            kwargs["address"] = address
        # workers import this project from the driver's directory; CHANNELPRUNE_* settings travel with them
        env_vars = {k: v for k, v in os.environ.items() if k.startswith("CHANNELPRUNE_") or k == "PYTHONPATH"}
        kwargs.setdefault("runtime_env", {"env_vars": env_vars} if env_vars else None)
        ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    return ray


class _EnvWorker:
    """One environment in a Ray actor, answering as SB3's SubprocVecEnv worker does."""

    def __init__(self, factory: Callable[[], gym.Env]):
        self.env = factory()

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = terminated or truncated
        info["TimeLimit.truncated"] = truncated and not terminated
        reset_info: dict = {}
        if done:
            info["terminal_observation"] = obs
            obs, reset_info = self.env.reset()
        return obs, reward, done, info, reset_info

    def reset(self, seed, options):
        return self.env.reset(seed=seed, **({"options": options} if options else {}))

    def get_attr(self, name: str):
        return self.env.get_wrapper_attr(name)

    def set_attr(self, name: str, value) -> None:
        setattr(self.env, name, value)

    def env_method(self, name: str, args, kwargs):
        return self.env.get_wrapper_attr(name)(*args, **kwargs)

    def is_wrapped(self, wrapper_class) -> bool:
        from stable_baselines3.common.env_util import is_wrapped

        return is_wrapped(self.env, wrapper_class)

    def render(self):
        return self.env.render()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        self.env.close()


class RayVecEnv(VecEnv):
    """``len(env_fns)`` environments, each in a Ray actor (``num_cpus`` each) anywhere on the cluster.

    ``address``: see ``connect``. Actor failures are not retried: an env that dies raises in ``step_wait``
    (an RL rollout cannot resume a lost episode).
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], address: str | None = LOCAL,
                 num_cpus: float = 1.0):
        if not env_fns:
            raise ValueError("env_fns is empty; RayVecEnv needs at least one environment")
        ray = connect(address)
        self._ray = ray
        actor = ray.remote(num_cpus=num_cpus)(_EnvWorker)
        self.workers = [actor.remote(fn) for fn in env_fns]
        spaces = ray.get(self.workers[0].get_attr.remote("observation_space")), \
            ray.get(self.workers[0].get_attr.remote("action_space"))
        super().__init__(len(env_fns), *spaces)
        self.render_mode = ray.get(self.workers[0].get_attr.remote("render_mode"))
        self._pending: list | None = None
        self.closed = False

    # -------------------------------------------------------------------------------- stepping
    def step_async(self, actions: np.ndarray) -> None:
        self._pending = [w.step.remote(a) for w, a in zip(self.workers, actions)]

    def step_wait(self) -> VecEnvStepReturn:
        results = self._ray.get(self._pending)
        self._pending = None
        obs, rewards, dones, infos, self.reset_infos = zip(*results)
        return np.stack(obs), np.stack(rewards), np.stack(dones), list(infos)

    def reset(self):
        results = self._ray.get([w.reset.remote(self._seeds[i], self._options[i])
                                 for i, w in enumerate(self.workers)])
        obs, self.reset_infos = zip(*results)
        self._reset_seeds()
        self._reset_options()
        return np.stack(obs)

    def close(self) -> None:
        if self.closed:
            return
        if self._pending is not None:
            self._ray.get(self._pending)
        self._ray.get([w.close.remote() for w in self.workers])
        for w in self.workers:
            self._ray.kill(w)
        self.closed = True

    # -------------------------------------------------------------------------------- attributes
    def _targets(self, indices: VecEnvIndices) -> list:
        return [self.workers[i] for i in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._ray.get([w.get_attr.remote(attr_name) for w in self._targets(indices)])

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._ray.get([w.set_attr.remote(attr_name, value) for w in self._targets(indices)])

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
                   ) -> list[Any]:
        return self._ray.get([w.env_method.remote(method_name, method_args, method_kwargs)
                              for w in self._targets(indices)])

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._ray.get([w.is_wrapped.remote(wrapper_class) for w in self._targets(indices)])

    def get_images(self) -> Iterable[np.ndarray | None]:
        return self._ray.get([w.render.remote() for w in self.workers])

    def node_ids(self) -> list[str]:
        """The Ray node each environment runs on."""
        return self._ray.get([w.node_id.remote() for w in self.workers])

