"""ChannelPruneEnv: learn per-group keep ratios of a pretrained CNN (static and runtime channel pruning)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from .data import DatasetSplits, load_dataset
from .groups import GroupGraph, keep_count
from .importance import SCORERS, ImportanceContext, ImportancePredictors, Scorer, gate_layout, make_scorer
from .inference import inference_context, resolve_precision
from .latency import LatencyTable
from .machine import resolve_device
from .pretrain import Recipe, checkpoint_path, evaluate, get_pretrained
from .runtime import GateSpec, install_gates

TARGETS = ("flops", "params", "latency")
MODES = ("static", "runtime")
REWARDS = ("acc", "acc_flops", "relative_ce")
REWARD_ALIASES = {"paper7": "relative_ce"}  # the name earlier versions used (paper 7 of the reading list)
BUDGET_MODES = ("wall", "penalty")
OBS_FEATURES = (
    "index", "is_residual", "c_in", "c_out", "stride", "kernel", "in_size", "group_macs", "reduced", "rest",
    "prev_action", "budget_left", "static_q10", "static_q25", "static_q50", "static_q75", "static_q90",
    "static_top25_mass", "runtime_top25_mass", "runtime_top50_mass", "runtime_spread", "gated", "budget",
)


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
    linearly to the static keep ratio in ``[min_keep, 1]`` (-1 -> ``min_keep``, 1 -> keep all); component 1 (runtime
    mode) maps to the runtime keep ratio in ``[min_keep, 1]``, the fraction of the statically kept channels each
    input computes. Out-of-range actions are **clipped** to [-1, 1]; non-finite actions raise ``ValueError``.
    Channel counts are rounded to multiples of ``round_to``. In the default ``budget_mode="wall"`` the ratio is
    then clamped (AMC's action wall) so that the budget stays reachable with every later group at ``min_keep``:
    the final model never exceeds the budget. ``info["clamped"]`` says by how much. Residual-stream groups have no
    runtime gate: their runtime ratio is ignored (always 1).

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
    | 18  | runtime_top25_mass   | mean per-input share of runtime saliency in its top quarter (0 if no gate) |
    | 19  | runtime_top50_mass   | same for the top half                                                      |
    | 20  | runtime_spread       | input dependence: 1 - mean rank correlation of two inputs' saliencies      |
    | 21  | gated                | 1 if the group has a runtime gate                                          |
    | 22  | budget               | the budget (fraction of the target cost kept)                              |

    ## Rewards

    0 at every step but the last. At the last step, by ``reward``:

    * ``"acc"`` (default, AMC with the action wall): accuracy on the reward split, in [0, 1].
    * ``"acc_flops"`` (AMC's R_FLOPs): ``-error * log(MACs)`` (effective MACs in runtime mode).
    * ``"relative_ce"`` (Chen, Chen & Pan 2020; alias ``"paper7"``): ``-CE / running mean CE`` (the running mean
      is an exponential average over episodes).

    With ``budget_mode="penalty"`` there is no wall and ``penalty_coef * (exp(excess) - 1)`` is subtracted, where
    ``excess = max(0, cost ratio / budget - 1)`` summed over the constrained costs (paper 7's exponential penalty).

    ## Starting State

    The first group of the unpruned network. Nothing is random: ``reset(seed=...)`` only seeds ``np_random``.

    ## Episode End

    Terminated after one step per group. Registered ids add a ``TimeLimit`` of the same number of steps.

    ## Info

    Every step: ``group`` (name), ``group_index``, ``action`` (the action after clipping to [-1, 1]),
    ``requested_keep_ratio`` (what the action asked for), ``keep_ratio`` (applied after the wall),
    ``runtime_ratio`` (runtime mode), ``clamped`` (keep ratio removed by the wall, >= 0; channel rounding is
    not counted). At the end also: ``accuracy``,
    ``loss``, ``flops_ratio`` (static MACs), ``params_ratio``, ``effective_flops_ratio`` (per-input MACs actually
    computed, gates included; equal to ``flops_ratio`` in static mode), ``latency_ratio`` (look-up-table
    prediction; when ``target="latency"`` or ``latency=True``), ``keep_ratios``, ``runtime_ratios``,
    ``kept_channels`` (indices per group), ``clamp_total``, ``eval_seconds``, ``eval_precision``.

    ## Arguments

    ``model`` (zoo name or ``nn.Module``), ``dataset`` ("fashion-mnist", "cifar10", "imagefolder"), ``data_dir``,
    ``checkpoint`` (a file; default: the cache, trained when missing unless ``train_if_missing=False``),
    ``width``, ``budget`` in (0, 1], ``target`` in {flops, params, latency}, ``mode`` in {static, runtime},
    ``storage_budget`` (runtime mode: parameters kept), ``reward`` in {acc, acc_flops, relative_ce},
    ``budget_mode`` in {wall, penalty}, ``reward_size``, ``calib_size``, ``split_seed``, ``min_keep`` in (0, 1], ``round_to``,
    ``scorer`` ("learned", "l1", "bn", "taylor" or an object with ``scores(ctx)``), ``internal_only``,
    ``compensate`` (None, "merge" for neuron merging, or a callable), ``render_mode`` ("ansi", "rgb_array"),
    ``eval_batch_size``, ``eval_precision`` ("auto": bfloat16 autocast where the machine has fast bf16 kernels,
    about 2.3x faster on an AVX-512 BF16 CPU, accuracies within ~0.1 point of float32; "fp32"; "bf16"; see
    ``envs.inference``), ``device`` ("auto": CUDA when available, else CPU; "cpu"; "cuda"; "cuda:N"): where
    evaluation, BN recalibration, runtime gates and the predictors' training run (the base model stays on the CPU
    and is never modified; memory format and precision are probed per machine, see ``envs.machine``).
    A user model needs ``example_input`` and ``data`` (a ``DatasetSplits``).

    ## Example

    >>> import gymnasium as gym, envs
    >>> env = gym.make("ChannelPrune-ResNet18", budget=0.5)
    >>> obs, info = env.reset(seed=0)
    >>> done = False
    >>> while not done:
    ...     obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    ...     done = terminated or truncated
    >>> info["flops_ratio"] <= 0.5
    True
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        model: str | nn.Module = "resnet18",
        dataset: str = "fashion-mnist",
        data_dir: str | None = None,
        checkpoint: str | None = None,
        width: float = 1.0,
        budget: float = 0.5,
        target: str = "flops",
        mode: str = "static",
        storage_budget: float = 1.0,
        reward: str = "acc",
        budget_mode: str = "wall",
        penalty_coef: float = 5.0,
        reward_size: int = 2000,
        calib_size: int = 512,
        split_seed: int = 0,
        min_keep: float = 0.1,
        round_to: int = 1,
        scorer: str | Scorer = "learned",
        internal_only: bool = False,
        compensate: str | Callable | None = None,
        latency: bool = False,
        latency_batch: int = 1,
        train_if_missing: bool = True,
        pretrain_epochs: int | None = None,
        pretrain_max_train: int | None = None,
        importance_samples: int = 8,
        eval_batch_size: int = 250,
        eval_precision: str = "auto",
        device: str = "auto",
        example_input: torch.Tensor | None = None,
        data: DatasetSplits | None = None,
        render_mode: str | None = None,
        progress: bool = True,
    ):
        super().__init__()
        reward = REWARD_ALIASES.get(reward, reward)
        self._check_args(budget, target, mode, reward, budget_mode, min_keep, round_to, scorer, storage_budget,
                         render_mode)
        self.budget, self.target, self.mode, self.reward_kind = float(budget), target, mode, reward
        self.storage_budget, self.budget_mode, self.penalty_coef = float(storage_budget), budget_mode, penalty_coef
        self.min_keep, self.round_to, self.render_mode = float(min_keep), int(round_to), render_mode
        self.eval_batch_size, self.compensate_spec, self.want_latency = eval_batch_size, compensate, bool(latency)
        self.device = resolve_device(device)
        self.eval_precision = resolve_precision(eval_precision, self.device)
        self._init_kwargs = dict(
            model=model, dataset=dataset, data_dir=data_dir, checkpoint=checkpoint, width=width, budget=budget,
            target=target, mode=mode, storage_budget=storage_budget, reward=reward, budget_mode=budget_mode,
            penalty_coef=penalty_coef, reward_size=reward_size, calib_size=calib_size, split_seed=split_seed,
            min_keep=min_keep, round_to=round_to, scorer=scorer, internal_only=internal_only,
            compensate=compensate, latency=latency, latency_batch=latency_batch, train_if_missing=train_if_missing,
            pretrain_epochs=pretrain_epochs, pretrain_max_train=pretrain_max_train,
            importance_samples=importance_samples, eval_batch_size=eval_batch_size, eval_precision=eval_precision,
            device=device, render_mode=render_mode, progress=progress,
        )

        # --- data and base model (cached; never modified)
        self._data_given = data is not None
        if data is None:
            data = load_dataset(dataset, data_dir, reward_size=reward_size, calib_size=calib_size,
                                split_seed=split_seed)
        self.data = data
        self.checkpoint_file = None
        if isinstance(model, nn.Module):
            if example_input is None:
                example_input = data.example_input(1)
            self.model_name = type(model).__name__
            base = model
            self.base_meta: dict = {}
        else:
            recipe = Recipe()
            if pretrain_epochs is not None or pretrain_max_train is not None:
                recipe = Recipe(epochs=pretrain_epochs or recipe.epochs, max_train=pretrain_max_train)
            base, self.base_meta = get_pretrained(model, data.name, data_dir, width, split_seed, recipe, checkpoint,
                                                  train_if_missing, data, progress, device=self.device)
            self.model_name = model
            self.checkpoint_file = checkpoint or checkpoint_path(model, data.name, width, split_seed, recipe)
            example_input = data.example_input(1)
        self.base_model = base.eval()  # never modified: every episode prunes a copy
        self.example_input = example_input
        self.graph = GroupGraph(self.base_model, example_input, internal_only=internal_only)
        self.groups = self.graph.groups
        self.n_groups = len(self.groups)

        # --- importance (static order per group; runtime gates)
        ctx = ImportanceContext(self.base_model, self.graph, data.calib, data.train, device=self.device)
        self.predictors: ImportancePredictors | None = None
        need_pred = scorer == "learned" or mode == "runtime"
        if need_pred:
            self.predictors = ImportancePredictors.load_or_train(
                ctx, self.checkpoint_file, progress=progress, per_group=importance_samples)
        self.scorer = make_scorer(scorer, self.predictors) if isinstance(scorer, str) else scorer
        scores = self.scorer.scores(ctx)
        self.static_scores = [np.asarray(s, dtype=np.float64) for s in scores]
        for g, s in zip(self.groups, self.static_scores):
            if s.shape != (g.num_channels,) or not np.all(np.isfinite(s)):
                raise ValueError(f"scorer {getattr(self.scorer, 'name', self.scorer)!r} returned scores of shape "
                                 f"{s.shape} (or non-finite) for group {g.index} ({g.name}); expected ({g.num_channels},)")
        # stable descending order: ties broken by channel index, so keep sets are deterministic
        self.order = [np.lexsort((np.arange(len(s)), -s)) for s in self.static_scores]
        self.gate_layout = gate_layout(self.graph)
        self.gated = [mode == "runtime" and v is not None and self.predictors is not None and self.predictors.has_gate(i)
                      for i, v in enumerate(self.gate_layout)]

        # --- cost model
        self.latency_table = None
        if target == "latency" or latency:
            self.latency_table = LatencyTable(self.graph, batch_size=latency_batch, device=self.device)
        self.k_min = [keep_count(self.min_keep, g.num_channels, self.round_to) for g in self.groups]
        self.k_full = [g.num_channels for g in self.groups]
        self._base_cost = {
            "flops": float(self.graph.base_macs),
            "params": float(self.graph.base_params),
        }
        if self.latency_table is not None:
            self._base_cost["latency"] = self.latency_table.predict(self.k_full)
        self._check_reachable()
        self._obs_static = self._static_observation_features()

        # --- spaces
        n_act = 2 if mode == "runtime" else 1
        self.action_space = spaces.Box(-1.0, 1.0, shape=(n_act,), dtype=np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBS_FEATURES),), dtype=np.float32)
        self._t: int | None = None
        self._ce_mean: float | None = None
        self.last_info: dict = {}
        self._done_info: dict = {}

    # ------------------------------------------------------------------------------------------ validation
    @staticmethod
    def _check_args(budget, target, mode, reward, budget_mode, min_keep, round_to, scorer, storage_budget,
                    render_mode) -> None:
        if not (isinstance(budget, (int, float)) and 0 < budget <= 1 and math.isfinite(budget)):
            raise ValueError(f"budget={budget!r} must be in (0, 1] (the fraction of the target cost kept)")
        if not (isinstance(storage_budget, (int, float)) and 0 < storage_budget <= 1):
            raise ValueError(f"storage_budget={storage_budget!r} must be in (0, 1]")
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not allowed; allowed: {', '.join(TARGETS)}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not allowed; allowed: {', '.join(MODES)}")
        if mode == "runtime" and target != "flops":
            raise ValueError(f"target={target!r} with mode='runtime' is not supported; runtime mode budgets "
                             "effective FLOPs (target='flops') and parameters through storage_budget")
        if reward not in REWARDS:
            raise ValueError(f"reward={reward!r} is not allowed; allowed: {', '.join(REWARDS)}")
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode={budget_mode!r} is not allowed; allowed: {', '.join(BUDGET_MODES)}")
        if not (isinstance(min_keep, (int, float)) and 0 < min_keep <= 1):
            raise ValueError(f"min_keep={min_keep!r} must be in (0, 1]")
        if not (isinstance(round_to, int) and round_to >= 1):
            raise ValueError(f"round_to={round_to!r} must be an integer >= 1")
        if isinstance(scorer, str) and scorer not in SCORERS:
            raise ValueError(f"scorer={scorer!r} is not allowed; allowed: {', '.join(SCORERS)} or an object "
                             "with scores(ctx)")
        if not isinstance(scorer, str) and not hasattr(scorer, "scores"):
            raise ValueError(f"scorer={scorer!r} must be a name ({', '.join(SCORERS)}) or have scores(ctx)")
        if render_mode is not None and render_mode not in ChannelPruneEnv.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not allowed; allowed: None, 'ansi', 'rgb_array'")

    def _check_reachable(self) -> None:
        rt_min = [keep_count(self.min_keep, k, 1) if self.gated[i] else k for i, k in enumerate(self.k_min)]
        costs = self._costs(self.k_min, rt_min)
        for name, limit in self._limits().items():
            if costs[name] > limit * (1 + 1e-9):
                raise ValueError(
                    f"budget unreachable: with every group at min_keep={self.min_keep} the {name} ratio is "
                    f"{costs[name] / self._base_cost[name]:.3f} > {limit / self._base_cost[name]:.3f}; raise the "
                    f"budget or lower min_keep"
                )

    # ------------------------------------------------------------------------------------------ cost
    def _effective_macs(self, kept: Sequence[int], rt: Sequence[int]) -> float:
        macs = float(self.graph.macs(kept, runtime_kept=rt))
        for i, v in enumerate(self.gate_layout):
            if self.gated[i] and rt[i] < kept[i]:
                prod = self.graph.input_group(v[1])
                c_in = kept[prod] if prod is not None else self.graph.model.get_submodule(v[1]).in_channels
                macs += c_in * kept[i]  # the gate's Linear on the pooled input
        return macs

    def _costs(self, kept: Sequence[int], rt: Sequence[int] | None = None) -> dict[str, float]:
        out = {"flops": float(self.graph.macs(kept)), "params": float(self.graph.params(kept))}
        if self.mode == "runtime":
            out["effective"] = self._effective_macs(kept, rt if rt is not None else kept)
        if self.latency_table is not None:
            out["latency"] = self.latency_table.predict(kept)
        return out

    def _limits(self) -> dict[str, float]:
        """Absolute limits the wall enforces."""
        if self.mode == "runtime":
            lim = {"effective": self.budget * self._base_cost["flops"]}
            if self.storage_budget < 1:
                lim["params"] = self.storage_budget * self._base_cost["params"]
            return lim
        return {self.target: self.budget * self._base_cost[self.target]}

    def _ratio(self, r: float) -> float:
        return self.min_keep + (r + 1.0) / 2.0 * (1.0 - self.min_keep)

    # ------------------------------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._kept = list(self.k_full)
        self._rt = list(self.k_full)
        self._requested: list[float] = []
        self._applied: list[float] = []
        self._rt_ratios: list[float] = []
        self._clamps: list[float] = []
        self._prev = 1.0
        self._done_info: dict = {}  # this episode's final info (``last_info`` keeps the last finished one)
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
            raise ValueError(f"step {self._t}: non-finite action {action!r}; actions must be finite numbers in [-1, 1]")
        a = np.clip(a, -1.0, 1.0)
        t, g = self._t, self.groups[self._t]
        want = self._ratio(float(a[0]))
        k_asked = keep_count(want, g.num_channels, self.round_to, self.k_min[t])
        rt_want = self._ratio(float(a[1])) if self.mode == "runtime" else 1.0
        k = self._wall_static(t, k_asked) if self.budget_mode == "wall" else k_asked
        r = keep_count(rt_want, k, 1, keep_count(self.min_keep, k, 1)) if self.gated[t] else k
        if self.budget_mode == "wall" and self.mode == "runtime":
            k, r = self._wall_runtime(t, k, r)
        self._kept[t], self._rt[t] = k, r
        applied = k / g.num_channels
        clamped = (k_asked - k) / g.num_channels  # what the wall removed (channel rounding is not counted)
        self._requested.append(want)
        self._applied.append(applied)
        self._rt_ratios.append(r / k)
        self._clamps.append(clamped)
        self._prev = applied
        self._t += 1
        terminated = self._t >= self.n_groups
        reward = 0.0
        info = {"group": g.name, "group_index": t, "action": a.astype(np.float32).tolist(),
                "requested_keep_ratio": want, "keep_ratio": applied,
                "runtime_ratio": r / k, "clamped": clamped}
        if terminated:
            reward, final = self._finish()
            info.update(final)
            self.last_info = dict(info)
            self._done_info = self.last_info
        obs = self._get_obs() if not terminated else self._terminal_obs()
        return obs, float(reward), terminated, False, info

    # ------------------------------------------------------------------------------------------ the wall
    def _trial(self, t: int, k: int, r: int | None = None) -> tuple[list[int], list[int]]:
        kept = self._kept[:t] + [k] + self.k_min[t + 1 :]
        rt = self._rt[:t] + [r if r is not None else k] + [
            keep_count(self.min_keep, km, 1) if self.gated[j] else km
            for j, km in enumerate(self.k_min[t + 1 :], start=t + 1)
        ]
        return kept, rt

    def _fits(self, kept, rt, names: Sequence[str]) -> bool:
        costs = self._costs(kept, rt)
        lim = self._limits()
        return all(costs[n] <= lim[n] * (1 + 1e-9) for n in names if n in lim)

    def _largest(self, lo: int, hi: int, ok: Callable[[int], bool], step: int = 1) -> int:
        """Largest value v in [lo, hi] on the grid lo + i*step with ok(v) (ok is monotone decreasing)."""
        if ok(hi):
            return hi
        lo_i, hi_i = 0, max(0, (hi - lo) // step)
        while lo_i < hi_i:  # invariant: ok(lo + lo_i*step) holds (guaranteed by reachability)
            mid = (lo_i + hi_i + 1) // 2
            if ok(lo + mid * step):
                lo_i = mid
            else:
                hi_i = mid - 1
        return lo + lo_i * step

    def _static_step(self, t: int) -> int:
        """Grid of static counts the wall searches: multiples of round_to, from k_min (itself a multiple unless the
        group has fewer channels than round_to, where every count is allowed)."""
        return self.round_to if self.k_min[t] % self.round_to == 0 else 1

    def _wall_static(self, t: int, k: int) -> int:
        names = ["params"] if self.mode == "runtime" else [self.target]
        if k <= self.k_min[t]:
            return k
        return self._largest(self.k_min[t], k, lambda v: self._fits(*self._trial(t, v), names), self._static_step(t))

    def _wall_runtime(self, t: int, k: int, r: int) -> tuple[int, int]:
        step = self._static_step(t)  # shrinking the static count must keep it on the round_to grid
        if not self.gated[t]:
            k2 = self._largest(self.k_min[t], k, lambda v: self._fits(*self._trial(t, v, v), ["effective"]),
                               step)
            return k2, k2
        r_min = keep_count(self.min_keep, k, 1)
        ok = lambda v: self._fits(*self._trial(t, k, v), ["effective"])  # noqa: E731
        if ok(r_min):
            return k, self._largest(r_min, r, ok)
        # the gate's own cost grows with k: shrink the static count too
        k2 = self._largest(self.k_min[t], k, lambda v: self._fits(
            *self._trial(t, v, keep_count(self.min_keep, v, 1)), ["effective"]), step)
        return k2, keep_count(self.min_keep, k2, 1)

    # ------------------------------------------------------------------------------------------ evaluation
    def kept_channels(self, kept: Sequence[int] | None = None) -> list[np.ndarray]:
        kept = self._kept if kept is None else kept
        return [np.sort(self.order[i][:k]) for i, k in enumerate(kept)]

    def build_pruned(self, kept: Sequence[int] | None = None, rt: Sequence[int] | None = None,
                     sparse: bool = False) -> nn.Module:
        """The physically pruned (and, in runtime mode, gated) network for channel counts ``kept``."""
        keep_idx = self.kept_channels(kept)
        pruned = self.graph.prune_copy(keep_idx)
        if self.compensate_spec is not None:
            self._compensate(pruned, keep_idx)
        if self.mode == "runtime":
            install_gates(pruned, self._gate_specs(keep_idx, rt if rt is not None else self._rt), sparse=sparse)
        return pruned

    def _compensate(self, pruned: nn.Module, keep_idx: list[np.ndarray]) -> None:
        fn = self.compensate_spec
        if fn == "merge":
            from baselines.neuron_merging import merge_compensation as fn  # lazy: optional baseline dependency
        if not callable(fn):
            raise ValueError(f"compensate={self.compensate_spec!r} must be None, 'merge' or a callable")
        fn(self.graph, self.base_model, pruned, keep_idx)

    def _gate_specs(self, keep_idx: list[np.ndarray], rt: Sequence[int]) -> list[GateSpec]:
        specs = []
        for i, v in enumerate(self.gate_layout):
            if not self.gated[i]:
                continue
            _, prod, bn, cons = v
            w = self.predictors.gates[f"gate{i}.weight"][torch.as_tensor(keep_idx[i])]
            in_g = self.graph.input_group(prod)
            if in_g is not None:
                w = w[:, torch.as_tensor(keep_idx[in_g])]
            b = self.predictors.gates[f"gate{i}.bias"][torch.as_tensor(keep_idx[i])]
            specs.append(GateSpec(prod, bn, cons, w.contiguous(), b.contiguous(), int(rt[i])))
        return specs

    @torch.no_grad()
    def recalibrate_bn(self, model: nn.Module) -> None:
        """Reset BN statistics and re-estimate them (cumulative average) on the calibration split."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with inference_context(model, self.eval_precision, self.device) as dev:
            for x, _ in self.data.calib.batches(256):
                model(x.to(dev))
        model.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "reward") -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on a split ("reward", "calib" or "test"); leaves ``model`` in eval mode.

        Precision and memory format follow ``eval_precision`` (``envs.inference``)."""
        if split not in ("reward", "calib", "test"):
            raise ValueError(f"split={split!r} is not allowed; allowed: reward, calib, test")
        acc_loss = evaluate(model, getattr(self.data, split), self.eval_batch_size, self.eval_precision, self.device)
        model.eval()
        return acc_loss

    def _finish(self) -> tuple[float, dict]:
        t0 = time.perf_counter()
        pruned = self.build_pruned()
        self.recalibrate_bn(pruned)
        acc, loss = self.evaluate(pruned)
        costs = self._costs(self._kept, self._rt)
        flops_ratio = costs["flops"] / self._base_cost["flops"]
        eff_ratio = costs.get("effective", costs["flops"]) / self._base_cost["flops"]
        info = {
            "accuracy": acc, "loss": loss, "flops_ratio": flops_ratio,
            "params_ratio": costs["params"] / self._base_cost["params"], "effective_flops_ratio": eff_ratio,
            "keep_ratios": [k / g.num_channels for k, g in zip(self._kept, self.groups)],
            "runtime_ratios": [r / k for r, k in zip(self._rt, self._kept)],
            "kept_counts": list(self._kept),
            "kept_channels": [c.tolist() for c in self.kept_channels()],
            "requested_ratios": list(self._requested),
            "clamp_total": float(sum(self._clamps)),
        }
        if "latency" in costs:
            info["latency_ratio"] = costs["latency"] / self._base_cost["latency"]
        if self.reward_kind == "acc":
            reward = acc
        elif self.reward_kind == "acc_flops":
            reward = -(1.0 - acc) * math.log(max(costs.get("effective", costs["flops"]), 2.0))
        else:
            self._ce_mean = loss if self._ce_mean is None else 0.9 * self._ce_mean + 0.1 * loss
            reward = -loss / self._ce_mean
        if self.budget_mode == "penalty":
            excess = sum(max(0.0, costs[name] / lim - 1.0) for name, lim in self._limits().items())
            info["budget_excess"] = excess
            reward -= self.penalty_coef * (math.exp(excess) - 1.0)
        info["eval_seconds"] = time.perf_counter() - t0
        info["eval_precision"] = self.eval_precision
        return reward, info

    # ------------------------------------------------------------------------------------------ observation
    def _static_observation_features(self) -> np.ndarray:
        mods = dict(self.base_model.named_modules())
        widest = max(max(getattr(m, "out_channels", 0), getattr(m, "in_channels", 0)) for m in mods.values()
                     if isinstance(m, nn.Conv2d))
        total = float(self.graph.base_macs)
        sizes = self._input_sizes()
        feats = np.zeros((self.n_groups, len(OBS_FEATURES)), dtype=np.float64)
        macs_pm = self.graph.base_macs_per_module
        producer_macs = [sum(macs_pm.get(n, 0) for n in g.producers + g.depthwise) for g in self.groups]
        for i, g in enumerate(self.groups):
            root = mods[g.producers[0]]
            c_in = root.in_channels if isinstance(root, nn.Conv2d) else root.in_features
            stride = max(getattr(mods[n], "stride", (1,))[0] for n in g.producers)
            kernel = getattr(root, "kernel_size", (1,))[0]
            dep = sum(macs_pm.get(n, 0) for n in set(g.producers + g.consumers + g.depthwise))
            s = self.static_scores[i]
            sn = s / (np.abs(s).max() + 1e-12)
            top = np.sort(s)[::-1]
            top25 = top[: max(1, len(top) // 4)].clip(min=0).sum() / (top.clip(min=0).sum() + 1e-12)
            feats[i, 0] = i / max(self.n_groups - 1, 1)
            feats[i, 1] = float(g.kind == "residual")
            feats[i, 2] = c_in / widest
            feats[i, 3] = g.num_channels / widest
            feats[i, 4] = min(stride / 2.0, 1.0)
            feats[i, 5] = min(kernel / 7.0, 1.0)
            feats[i, 6] = min(sizes.get(g.producers[0], 1.0), 1.0)
            feats[i, 7] = dep / total
            feats[i, 9] = sum(producer_macs[i + 1 :]) / total
            feats[i, 12:17] = np.quantile(sn, [0.1, 0.25, 0.5, 0.75, 0.9])
            feats[i, 17] = top25
        feats[:, 18:21] = self._runtime_summaries()
        feats[:, 21] = np.array(self.gated, dtype=float)
        feats[:, 22] = self.budget
        return np.clip(feats, 0.0, 1.0)

    def _input_sizes(self) -> dict[str, float]:
        sizes: dict[str, float] = {}
        mods = dict(self.base_model.named_modules())
        hooks = [mods[g.producers[0]].register_forward_pre_hook(
            lambda m, inp, n=g.producers[0]: sizes.__setitem__(n, inp[0].shape[-1] / self.example_input.shape[-1]))
            for g in self.groups]
        with torch.no_grad():
            self.base_model(self.example_input)
        for h in hooks:
            h.remove()
        return sizes

    @torch.no_grad()
    def _runtime_summaries(self) -> np.ndarray:
        out = np.zeros((self.n_groups, 3))
        if self.predictors is None:
            return out
        from .importance import _collect_gate_data

        data = _collect_gate_data(self.base_model, self.graph, self.data.calib.x[:128])
        for i, (xin, _y) in data.items():
            if not self.predictors.has_gate(i):
                continue
            sal = (xin @ self.predictors.gates[f"gate{i}.weight"].T + self.predictors.gates[f"gate{i}.bias"]).clamp_min(0)
            srt = sal.sort(1, descending=True).values
            c = sal.shape[1]
            tot = srt.sum(1).clamp_min(1e-12)
            out[i, 0] = (srt[:, : max(1, c // 4)].sum(1) / tot).mean().item()
            out[i, 1] = (srt[:, : max(1, c // 2)].sum(1) / tot).mean().item()
            ranks = sal.argsort(1).argsort(1).float()
            ranks = ranks - ranks.mean(1, keepdim=True)
            ranks = ranks / ranks.norm(dim=1, keepdim=True).clamp_min(1e-12)
            corr = (ranks[::2][: len(ranks) // 2] * ranks[1::2][: len(ranks) // 2]).sum(1).mean().item()
            out[i, 2] = 1.0 - corr
        return out

    def _get_obs(self) -> np.ndarray:
        t = min(self._t or 0, self.n_groups - 1)
        obs = self._obs_static[t].copy()
        total = float(self.graph.base_macs)
        now = self._costs(self._kept[:t] + self.k_full[t:])
        obs[8] = (total - now["flops"]) / total
        obs[10] = self._prev
        obs[11] = self._budget_left(t)
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def _terminal_obs(self) -> np.ndarray:
        obs = self._obs_static[-1].copy()
        obs[10] = self._prev
        return np.clip(obs, 0.0, 1.0).astype(np.float32)

    def _budget_left(self, t: int) -> float:
        name = "effective" if self.mode == "runtime" else self.target
        full_kept = self._kept[:t] + self.k_full[t:]
        min_kept = self._kept[:t] + self.k_min[t:]
        min_rt = self._rt[:t] + [keep_count(self.min_keep, k, 1) if self.gated[j + t] else k
                                 for j, k in enumerate(self.k_min[t:])]
        hi = self._costs(full_kept, self._rt[:t] + self.k_full[t:])[name]
        lo = self._costs(min_kept, min_rt)[name]
        limit = self._limits()[name]
        return float(np.clip((limit - lo) / max(hi - lo, 1e-12), 0.0, 1.0))

    def _get_info(self) -> dict[str, Any]:
        t = self._t or 0
        if t < self.n_groups:
            return {"group": self.groups[t].name, "group_index": t}
        return dict(self._done_info)

    # ------------------------------------------------------------------------------------------ rendering
    def render(self):
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; pass render_mode='ansi' or 'rgb_array'")
            return None
        t = self._t or 0
        ratios = [self._applied[i] if i < len(self._applied) else float("nan") for i in range(self.n_groups)]
        if self.render_mode == "ansi":
            lines = [f"{'#':>3} {'group':<28} {'kind':<9} {'C':>5} {'keep':>6} {'runtime':>8}"]
            for i, g in enumerate(self.groups):
                rt = self._rt_ratios[i] if i < len(self._rt_ratios) else float("nan")
                mark = ">" if i == t else " "
                lines.append(f"{mark}{i:>2} {g.name:<28} {g.kind:<9} {g.num_channels:>5} {ratios[i]:>6.2f} {rt:>8.2f}")
            if self._done_info:
                d = self._done_info
                lines.append(f"accuracy {d['accuracy']:.4f}  flops {d['flops_ratio']:.3f}  params {d['params_ratio']:.3f}")
            return "\n".join(lines) + "\n"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
        ax.bar(range(self.n_groups), np.nan_to_num(ratios), color=["C1" if g.kind == "residual" else "C0"
                                                                   for g in self.groups])
        ax.set_ylim(0, 1)
        ax.set_xlabel("group")
        ax.set_ylabel("keep ratio")
        fig.tight_layout()
        fig.canvas.draw()
        img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return img

    # ------------------------------------------------------------------------------------------ helpers
    def derive(self, **overrides) -> "ChannelPruneEnv":
        """A new env with the same settings except ``overrides`` (e.g. a baseline's fine-tuned ``model``)."""
        kwargs = dict(self._init_kwargs)
        kwargs.update(overrides)
        if isinstance(kwargs.get("model"), nn.Module):
            kwargs.setdefault("example_input", self.example_input)
        kwargs.setdefault("data", self.data)
        return ChannelPruneEnv(**kwargs)

    def __getstate__(self):
        # Pickles as its constructor arguments (the checkpoint and predictors are reloaded from the cache); a
        # user-supplied model travels with its data and example input.
        extra = {}
        if isinstance(self._init_kwargs["model"], nn.Module):
            extra = {"data": self.data, "example_input": self.example_input}
        elif self._data_given:
            extra = {"data": self.data}
        return {"kwargs": {**self._init_kwargs, **extra}}

    def __setstate__(self, state):
        self.__init__(**state["kwargs"])


def run_actions(env: gym.Env, actions: Sequence[Any], seed: int = 0) -> dict:
    """Reset ``env`` with ``seed``, take ``actions`` in order until the episode ends; returns the last info."""
    env.reset(seed=seed)
    info: dict = {}
    for a in actions:
        _, _, term, trunc, info = env.step(a)
        if term or trunc:
            break
    return info
