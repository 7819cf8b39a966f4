"""ChannelPruneEnv: learn per-group keep ratios of a pretrained CNN (static and runtime channel pruning).

A thin Gymnasium layer over ``envs.problem.PruningProblem`` (network, data, groups, importance, cost model with
the action wall, evaluator): this file holds only the episode (spaces, reset, step, reward, observation, info,
render).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from torch import nn

from .budget import ratio_of_action
from .cores import WorkerCores
from .kwargs import RENDER_MODES, REWARD_ALIASES, check_kwargs
from .observation import BUDGET_LEFT, OBS_FEATURES, PREV_ACTION, REDUCED
from .problem import PruningProblem
from .screening import Screen


class ChannelPruneEnv(gym.Env):
    """
    ## Description

    An episode prunes a pretrained CNN, one coupled channel group per step, in forward order (AMC's episode shape,
    He et al. 2018). Groups come from Torch-Pruning's DependencyGraph: a block-internal conv with its BN and the
    next conv's inputs, or a whole residual stream (every conv adding into it, their BNs, every reader). The
    agent picks how many channels each group keeps; *which* channels is decided by the static importance
    predictor (dataset-wide, for storage). In ``mode="runtime"`` the agent also picks the fraction of the kept
    channels that each input computes, chosen per input by the runtime importance predictor (Chen, Chen & Pan,
    "Storage Efficient and Dynamic Flexible Runtime Channel Pruning via Deep RL", NeurIPS 2020). After the last
    step the physically pruned network (Torch-Pruning; the base model is never modified) has its BatchNorm
    statistics recalibrated on the calibration split and is evaluated on the held-out reward split (carved from
    the training set; never the test set).

    ## Action Space

    ``Box(-1, 1, (1,), float32)`` in static mode, ``Box(-1, 1, (2,), float32)`` in runtime mode. Component 0 maps
    linearly to the static keep ratio in ``[min_keep, 1]`` (-1 -> ``min_keep``, 1 -> keep all); component 1
    (runtime mode) maps to the runtime keep ratio in ``[min_keep, 1]``, the fraction of the statically kept
    channels each input computes. Out-of-range actions are **clipped** to [-1, 1]; non-finite actions raise
    ``ValueError``. Channel counts are rounded to multiples of ``round_to``. In the default ``budget_mode="wall"``
    the ratio is then clamped (AMC's action wall) so that the budget stays reachable with every later group at
    ``min_keep``: the final model never exceeds the budget. ``info["clamped"]`` says by how much. With
    ``budget_mode="fill"`` (static mode) the wall acts the same and, at the episode's end, the plan is scaled up
    by the largest common factor that stays within the budget (``CostModel.fill``, the scaling random search
    applies to its draws), so every plan spends the budget and the actions decide only how it is shared among
    the groups; ``info["keep_ratios"]`` is the filled plan and ``info["fill_total"]`` what the fill added.
    Residual-stream groups have no runtime gate: their runtime ratio is ignored (always 1). During an episode
    ``env.even_keep_ratio()`` is the ratio that, asked of this group and every later one, spends the budget
    (``agents.relative_actions.RelativeActions`` lets an agent act relative to it).

    ## Observation Space

    ``Box(0, 1, (23,), float32)``, the same length for every model:

    | Num | Observation          | Meaning                                                                    |
    |-----|----------------------|----------------------------------------------------------------------------|
    | 0   | index                | group index / (number of groups - 1)                                       |
    | 1   | is_residual          | 1 for a residual-stream group, 0 for a block-internal conv                 |
    | 2   | c_in                 | input channels of the root conv / widest layer                             |
    | 3   | c_out                | channels of the group / widest layer                                       |
    | 4   | stride               | stride of the root conv / 2 (clipped)                                      |
    | 5   | kernel               | kernel size of the root conv / 7 (clipped)                                 |
    | 6   | in_size              | input feature-map side of the root conv / image side                       |
    | 7   | group_macs           | MACs that depend on this group / total MACs                                |
    | 8   | reduced              | MACs removed by the previous steps / total MACs                            |
    | 9   | rest                 | MACs of the later groups' producers / total MACs                           |
    | 10  | prev_action          | keep ratio applied at the previous step (1 at the first step)              |
    | 11  | budget_left          | fraction of the remaining reducible cost that the budget still allows      |
    | 12-16 | static_q10..q90    | quantiles of the group's static importance / its maximum                   |
    | 17  | static_top25_mass    | share of static importance in the top quarter of the channels              |
    | 18  | runtime_top25_mass   | per-input share of activation mass in the gate's top quarter (0: no gate)  |
    | 19  | runtime_top50_mass   | same for the gate's top half                                               |
    | 20  | runtime_spread       | input dependence: 1 - mean rank correlation of two inputs' gate scores     |
    | 21  | gated                | 1 if the group has a runtime gate                                          |
    | 22  | budget               | the budget (fraction of the target cost kept)                              |

    ## Rewards

    0 at every step but the last. At the last step, by ``reward``:

    * ``"acc"`` (default, AMC with the action wall): accuracy on the reward split, in [0, 1].
    * ``"acc_flops"`` (AMC's R_FLOPs): ``-error * log(MACs)`` (effective MACs in runtime mode).
    * ``"relative_ce"`` (Chen, Chen & Pan 2020; aliases ``"chen2020"`` and the old ``"paper7"``):
      ``-CE / running mean CE`` (the running mean is an exponential average over episodes).

    With ``screen_size=n`` the reward split is raced (``envs.screening``): the plan is scored on its first ``n``
    images, and on the rest only if it can still beat the best plan this env has scored in full; otherwise the
    reward uses the first ``n`` images (``info["screened"]``). ``screen_size=[500, 1000]`` races in more rungs:
    500 images, 1,000 if it can still win, then the whole split. Episodes get cheaper; the best plan is always
    scored in full. No plan is scored twice on the same images: the evaluator is deterministic, so the problem
    (shared by envs made with ``derive``) remembers each plan's scores and a replayed plan costs nothing.

    With ``budget_mode="penalty"`` there is no wall and ``penalty_coef * (exp(excess) - 1)`` is subtracted, where
    ``excess = max(0, cost ratio / budget - 1)`` summed over the constrained costs (Chen et al.'s exponential
    penalty).

    ## Starting State

    The first group of the unpruned network. Nothing is random: ``reset(seed=...)`` only seeds ``np_random``.

    ## Episode End

    Terminated after one step per group (``env.n_groups``, model-dependent); never truncated (no ``TimeLimit``).

    ## Info

    Every step: ``group`` (name), ``group_index``, ``action`` (the action after clipping to [-1, 1]),
    ``requested_keep_ratio`` (what the action asked for), ``keep_ratio`` (applied after the wall),
    ``runtime_ratio`` (runtime mode), ``clamped`` (keep ratio removed by the wall, >= 0; channel rounding is not
    counted). At the end also: ``accuracy``, ``loss``, ``flops_ratio`` (static MACs), ``params_ratio``,
    ``effective_flops_ratio`` (per-input MACs computed, gates included), ``latency_ratio`` (look-up table; with
    ``target="latency"`` or ``latency=True``), ``keep_ratios``, ``runtime_ratios``, ``kept_counts``,
    ``kept_channels`` (indices per group), ``clamp_total``, ``images_scored``, ``screened``, ``eval_seconds``,
    ``eval_precision``.

    ## Arguments

    Episode: ``reward`` (above), ``budget_mode`` in {wall, penalty, fill}, ``penalty_coef``, ``screen_size``
    (None, or images of the reward split every plan is scored on first; above), ``render_mode`` ("ansi",
    "rgb_array").
    Problem (``envs.problem.PruningProblem``, or pass a built one as ``problem``): ``model`` (zoo
    name or ``nn.Module``; a user model needs ``example_input`` and ``data``, a ``DatasetSplits``), ``dataset``
    ("fashion-mnist", "cifar10", "imagefolder"), ``data_dir``, ``checkpoint`` (default: the cache or the shipped
    file, trained when missing unless ``train_if_missing=False``), ``width``, ``budget`` in (0, 1], ``target`` in
    {flops, params, latency}, ``mode`` in {static, runtime}, ``storage_budget`` (runtime mode: parameters kept),
    ``reward_size``, ``calib_size``, ``test_size`` (None: the whole test split), ``split_seed``, ``min_keep`` in
    (0, 1], ``round_to``, ``scorer`` ("taylor", the default; "l1", "bn", "fpgm", "learned" or an object with
    ``scores(ctx)``), ``importance_samples`` (keep sets the learned static predictor measures per group and keep
    ratio; 4), ``runtime_gates`` (runtime mode: "trained", the default, gates trained through the frozen network
    for ``gate_steps`` steps, 100, from "ridge", gates regressed onto activations; ``envs.gates``),
    ``internal_only``, ``compensate`` (None or a callable ``(graph, base_model, pruned, keep_idx)``, e.g.
    ``baselines.neuron_merging.merge_compensation``),
    ``eval_precision`` ("auto": bf16 autocast where the machine has fast bf16 kernels; "fp32"; "bf16"),
    ``device`` ("auto": CUDA when available, else CPU; "cpu"; "cuda:N": where evaluation, BN recalibration, gates
    and predictor training run; the base model stays on the CPU, never modified; see ``envs.machine``).

    ## Example

    >>> import gymnasium as gym, envs
    >>> env = gym.make("ChannelPrune-ResNet18-v0", budget=0.5)
    >>> obs, info = env.reset(seed=0)
    >>> done = False
    >>> while not done:
    ...     obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    ...     done = terminated or truncated
    >>> info["flops_ratio"] <= 0.5
    True
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 4}

    def __init__(self, problem: PruningProblem | None = None, *, reward: str = "acc", budget_mode: str = "wall",
                 penalty_coef: float = 5.0, render_mode: str | None = None,
                 screen_size: int | Sequence[int] | None = None, **problem_kwargs: Any):
        super().__init__()
        if problem is not None and problem_kwargs:
            raise ValueError(f"problem= is given, so {', '.join(sorted(problem_kwargs))} must not be: derive the "
                             "problem instead (problem.derive(...))")
        check_kwargs(dict(reward=reward, budget_mode=budget_mode, render_mode=render_mode, screen_size=screen_size,
                          **problem_kwargs))
        self.problem = problem if problem is not None else PruningProblem(**problem_kwargs)
        self.reward_kind = REWARD_ALIASES.get(reward, reward)
        self.budget_mode, self.penalty_coef, self.render_mode = budget_mode, float(penalty_coef), render_mode
        self.env_kwargs = dict(reward=reward, budget_mode=budget_mode, penalty_coef=penalty_coef,
                               render_mode=render_mode, screen_size=screen_size)
        self.screen = Screen(screen_size) if screen_size is not None else None  # this env's search: one race
        n_act = 2 if self.problem.mode == "runtime" else 1
        self.action_space = spaces.Box(-1.0, 1.0, shape=(n_act,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBS_FEATURES),), dtype=np.float32)
        self._t: int | None = None
        self._ce_mean: float | None = None
        self.last_info: dict = {}  # the last finished episode's final info
        self._done_info: dict = {}

    # the problem's facts, read-only (``env.problem`` has the rest)
    (base_model, data, graph, groups, n_groups, device, predictors, static_scores, gated, mode, cost, evaluate,
     recalibrate_bn) = (property(lambda self, n=n: getattr(self.problem, n)) for n in (
        "base_model", "data", "graph", "groups", "n_groups", "device", "predictors", "static_scores", "gated",
        "mode", "cost", "evaluate", "recalibrate_bn"))
    budget, target, min_keep, round_to, storage_budget = (
        property(lambda self, n=n: getattr(self.problem.cost, n))
        for n in ("budget", "target", "min_keep", "round_to", "storage_budget"))

    def kept_channels(self, kept: Sequence[int] | None = None) -> list[np.ndarray]:
        """Kept channel indices per group for counts ``kept`` (default: this episode's)."""
        return self.problem.kept_channels(self._kept if kept is None else kept)

    def share_race_best(self, accuracy: float) -> None:
        """Another env of the same search (``--n-envs``) scored a plan in full at ``accuracy``: this env's race
        (``screen_size``) then stops plans that cannot beat it, as one env's race would. No-op without a race."""
        if self.screen is not None:
            self.screen.record(float(accuracy))

    def share_cores(self, cores: WorkerCores | None) -> None:
        """Evaluate on this worker's share of the machine's cores (``envs.cores.CoreShare.slot(i)``; parallel
        workers of one search): ``PruningProblem.share_cores``."""
        self.problem.share_cores(cores)

    def even_keep_ratio(self) -> float:
        """The keep ratio that, given to this step's group and every later one, spends the budget with the earlier
        groups as decided (``CostModel.even_ratio``): what a uniform allocation of what is left would ask for."""
        if self._t is None or self._t >= self.n_groups:
            raise RuntimeError("even_keep_ratio() is defined during an episode: call env.reset() first")
        return self.cost.even_ratio(self._t, self._kept)

    def build_pruned(self, kept: Sequence[int] | None = None, rt: Sequence[int] | None = None,
                     sparse: bool = False) -> nn.Module:
        """The pruned network for counts ``kept`` and runtime counts ``rt`` (each defaults to this episode's):
        ``PruningProblem.build_pruned``."""
        kept = self._kept if kept is None else kept
        rt = rt if rt is not None else (self._rt if self._t is not None else None)
        return self.problem.build_pruned(kept, rt, sparse=sparse)

    # ------------------------------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t, self._prev = 0, 1.0
        self._kept, self._rt = list(self.cost.k_full), list(self.cost.k_full)
        self._requested, self._applied, self._rt_ratios, self._clamps = [], [], [], []  # per step
        self._done_info = {}
        return self._get_obs(), self._get_info()

    def step(self, action):
        if self._t is None:
            raise RuntimeError("step() called before reset(); call env.reset() first")
        if self._t >= self.n_groups:
            raise RuntimeError("step() called after the episode ended; call env.reset()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.action_space.shape[0]:
            raise ValueError(f"step {self._t}: action {action!r} has {a.shape[0]} components; expected "
                             f"{self.action_space.shape[0]} (mode={self.mode!r})")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"step {self._t}: non-finite action {action!r}; actions must be finite numbers in "
                             "[-1, 1]")
        a = np.clip(a, -1.0, 1.0)
        t, c = self._t, self.groups[self._t].num_channels
        want = ratio_of_action(a[0], self.min_keep)
        rt_want = ratio_of_action(a[1], self.min_keep) if self.mode == "runtime" else 1.0
        k_asked, k, r = self.cost.decide(t, want, rt_want, self._kept, self._rt,
                                         wall=self.budget_mode in ("wall", "fill"))
        self._kept[t], self._rt[t] = k, r
        self._prev = k / c
        self._requested.append(want)
        self._applied.append(k / c)
        self._rt_ratios.append(r / k)
        self._clamps.append((k_asked - k) / c)  # what the wall removed (channel rounding is not counted)
        self._t += 1
        terminated = self._t >= self.n_groups
        reward = 0.0
        info = {"group": self.groups[t].name, "group_index": t, "action": a.astype(np.float32).tolist(),
                "requested_keep_ratio": want, "keep_ratio": k / c, "runtime_ratio": r / k,
                "clamped": self._clamps[-1]}
        if terminated:
            reward, final = self._finish()
            info.update(final)
            self.last_info = self._done_info = dict(info)
        return self._get_obs(), float(reward), terminated, False, info

    def _finish(self) -> tuple[float, dict]:
        t0 = time.perf_counter()
        fill = {}
        if self.budget_mode == "fill":  # spend what the wall left: one common scale-up (static mode only)
            walled = sum(self._applied)
            self._kept = self.cost.fill(self._kept)
            self._rt = list(self._kept)
            self._applied = [k / g.num_channels for k, g in zip(self._kept, self.groups)]
            fill["fill_total"] = sum(self._applied) - walled
        info = self.problem.evaluate_plan(self._kept, self._rt, screen=self.screen)
        acc, loss = info["accuracy"], info["loss"]
        info.update(keep_ratios=list(self._applied), runtime_ratios=[r / k for r, k in zip(self._rt, self._kept)],
                    kept_counts=list(self._kept), kept_channels=[c.tolist() for c in self.kept_channels()],
                    requested_ratios=list(self._requested), clamp_total=float(sum(self._clamps)), **fill)
        costs = self.cost.costs(self._kept, self._rt)
        if self.reward_kind == "acc":
            reward = acc
        elif self.reward_kind == "acc_flops":
            reward = -(1.0 - acc) * math.log(max(costs.get("effective", costs["flops"]), 2.0))
        else:
            self._ce_mean = loss if self._ce_mean is None else 0.9 * self._ce_mean + 0.1 * loss
            reward = -loss / self._ce_mean
        if self.budget_mode == "penalty":
            excess = sum(max(0.0, costs[name] / lim - 1.0) for name, lim in self.cost.limits().items())
            info["budget_excess"] = excess
            reward -= self.penalty_coef * (math.exp(excess) - 1.0)
        info["eval_seconds"] = time.perf_counter() - t0
        info["eval_precision"] = self.problem.eval_precision
        return reward, info

    # ------------------------------------------------------------------------------------------ observation, info
    def _get_obs(self) -> np.ndarray:
        t = min(self._t or 0, self.n_groups - 1)
        obs = self.problem.features[t].copy()
        obs[PREV_ACTION] = self._prev
        if self._t < self.n_groups:  # the terminal observation carries only the last action
            now = self.cost.costs(self._kept[:t] + self.cost.k_full[t:])["flops"]
            obs[REDUCED] = 1.0 - now / self.cost.base["flops"]
            obs[BUDGET_LEFT] = self.cost.budget_left(t, self._kept, self._rt)
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def _get_info(self) -> dict[str, Any]:
        t = self._t or 0
        if t < self.n_groups:
            return {"group": self.groups[t].name, "group_index": t}
        return dict(self._done_info)

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; pass render_mode='ansi' or 'rgb_array'")
            return None
        from .render import render_ansi, render_rgb

        ratios = [self._applied[i] if i < len(self._applied) else float("nan") for i in range(self.n_groups)]
        if self.render_mode == "ansi":
            runtime = [self._rt_ratios[i] if i < len(self._rt_ratios) else float("nan")
                       for i in range(self.n_groups)]
            return render_ansi(self.groups, ratios, runtime, self._t or 0, self._done_info)
        return render_rgb(self.groups, ratios)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments that rebuild an equal env (problem keywords included)."""
        return {**self.problem.kwargs, **self.env_kwargs}

    def derive(self, **overrides) -> "ChannelPruneEnv":
        """A new env with the same settings except ``overrides`` (e.g. a baseline's fine-tuned ``model``); the
        problem is shared when only the budget changes."""
        env_over = {k: overrides.pop(k) for k in list(overrides) if k in self.env_kwargs}
        problem = self.problem.derive(**overrides) if overrides else self.problem
        return ChannelPruneEnv(problem, **{**self.env_kwargs, **env_over})

    def __getstate__(self):
        # Pickles as its constructor arguments: the checkpoint and predictors are reloaded from the cache; a user
        # model travels with its data and example input.
        return {"kwargs": self.kwargs}

    def __setstate__(self, state):
        self.__init__(**state["kwargs"])

