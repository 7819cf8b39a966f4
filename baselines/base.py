"""What every baseline shares: the policy interface, the registry, budget fitting.

A baseline is built from an env (``ChannelPruneEnv`` or a wrapper of it), computes a per-group plan of keep
ratios, and answers SB3's ``predict(observation, state=None, episode_start=None, deterministic=True)`` per step,
so ``stable_baselines3.common.evaluation.evaluate_policy`` runs baselines and agents alike. A method that changes
the network (a regularized fine-tune), the channel choice (its own scorer) or adds a compensation step does it in
``prepare()``, which returns the env to evaluate on (``env.derive(model=..., scorer=..., compensate=...)``).

Where the arithmetic runs: a method's own forward / backward passes (sensitivities, calibration, learned scores,
regularised fine-tunes) run on ``env.device`` ("auto": CUDA when available, else the CPU), on a copy of the network
moved there (``on_device``); the env's base model stays on the CPU, and plans, scores and statistics come back as
CPU tensors / numpy arrays. Envs derived with ``env.derive`` inherit the device (it is one of the env's kwargs).
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from envs.channel_prune import ChannelPruneEnv
from envs.episodes import plan_action, step_of, unwrap
from envs.observation import PER_STEP

REGISTRY: dict[str, type["Baseline"]] = {}


def register(name: str) -> Callable[[type["Baseline"]], type["Baseline"]]:
    def deco(cls: type["Baseline"]) -> type["Baseline"]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` itself when its parameters are already on ``device`` (or it has none), else a deep copy moved
    there: the caller's model (an env's base model) is never moved."""
    dev = torch.device(device)
    first = next(model.parameters(), None)
    if first is None or (first.device.type == dev.type and (dev.index is None or first.device.index == dev.index)):
        return model
    return copy.deepcopy(model).to(dev)


def synchronize(device: str | torch.device) -> None:
    """Wait for the queued kernels of a CUDA ``device`` (before reading a clock); nothing on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Baseline:
    """Base class: subclasses implement ``plan()`` (and optionally ``prepare()``)."""

    name = "baseline"
    runtime = False  # a runtime-mode baseline also plans runtime ratios

    def __init__(self, env, seed: int = 0, **kwargs):
        self.env: ChannelPruneEnv = unwrap(env)
        self.seed = int(seed)
        self.options = kwargs
        self.rng = np.random.default_rng(self.seed)
        self.eval_env: ChannelPruneEnv | None = None
        self.ratios: np.ndarray | None = None
        self.runtime_ratios: np.ndarray | None = None
        self.cpu_seconds = 0.0  # process CPU time of prepare() + plan() (GPU work is not in it)
        self.wall_seconds = 0.0  # wall-clock time of prepare() + plan(), CUDA work included

    # -- to override
    def prepare(self) -> ChannelPruneEnv:
        """The env this method is evaluated on (default: the given env, unchanged)."""
        return self.env

    def plan(self) -> np.ndarray:
        """Keep ratio per group, shape (n_groups,)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def own_network(self) -> tuple[nn.Module, Callable[[nn.Module, str], dict]] | None:
        """For a method that runs its own network rather than a plan of the env (Channel Gating's activation-level
        gates): the network, BN recalibrated, and ``measure(net, split)`` giving its ``accuracy`` and
        ``effective_flops_ratio`` there. None (the default): the method is its plan."""
        return None

    # -- shared
    def setup(self) -> "Baseline":
        """Run ``prepare`` and ``plan`` once, timing them (process CPU time and wall-clock time)."""
        if self.ratios is None:
            t0, w0 = time.process_time(), time.perf_counter()
            self.eval_env = self.prepare()
            plan = np.asarray(self.plan(), dtype=np.float64)
            if plan.ndim == 2:  # (n_groups, 2): static and runtime ratios
                self.ratios, self.runtime_ratios = plan[:, 0], plan[:, 1]
            else:
                self.ratios = plan
            n = self.eval_env.n_groups
            if self.ratios.shape != (n,):
                raise ValueError(f"{self.name}: plan has shape {self.ratios.shape}; expected ({n},)")
            synchronize(getattr(self.env, "device", "cpu"))
            self.cpu_seconds = time.process_time() - t0
            self.wall_seconds = time.perf_counter() - w0
        return self

    def action_for_step(self, t: int) -> np.ndarray:
        self.setup()
        return plan_action(t, self.ratios, self.runtime_ratios, self.eval_env.min_keep,
                           self.eval_env.mode == "runtime")

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """SB3's policy interface; the step index is read from observation[0] (index / (n_groups - 1)).

        The plan is for ``self.eval_env`` (which may differ from the env given: a fine-tuned model, the method's
        own channel order); an observation from any other env raises ValueError instead of playing a plan made
        for something else."""
        self.setup()
        obs = np.asarray(observation, dtype=np.float64)
        acts = [self.action_for_step(self._step_of(o)) for o in obs.reshape(-1, obs.shape[-1])]
        return (acts[0] if obs.ndim == 1 else np.stack(acts)), state

    def _step_of(self, obs: np.ndarray) -> int:
        try:
            t = step_of(obs, self.eval_env.n_groups)
        except ValueError:
            t = None
        expected = self.eval_env.problem.features[t if t is not None else 0]
        fixed = [i for i in range(len(expected)) if i not in PER_STEP]
        if t is None or obs.shape != expected.shape or not np.allclose(obs[fixed], expected[fixed], atol=1e-5):
            raise ValueError(f"{self.name}: this observation does not come from the env the plan was made for "
                             "(another model, channel order, budget or mode); evaluate the baseline on "
                             "baseline.setup().eval_env, e.g. evaluate_policy(b, b.eval_env)")
        return t


def cost_of_ratios(env: ChannelPruneEnv, ratios: Sequence[float], runtime: Sequence[float] | None = None) -> float:
    """Cost ratio of the target (effective FLOPs in runtime mode) for a plan of keep ratios (``CostModel``)."""
    return unwrap(env).cost.plan_cost(ratios, runtime)


def fit_to_budget(env: ChannelPruneEnv, ratios: Sequence[float], budget: float | None = None) -> np.ndarray:
    """Scale a plan's ratios by one factor so its cost meets the budget (``CostModel.fit_to_budget``)."""
    return unwrap(env).cost.fit_to_budget(ratios, budget)
