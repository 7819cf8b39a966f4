"""PruningProblem: everything about "prune this pretrained network to this budget" that an episode does not change.

Built once from a model, its data and its checkpoint: the coupled channel groups (Torch-Pruning's
DependencyGraph), the static importance order and the runtime gates, the cost model with the action wall
(``envs.budget.CostModel``), and the evaluator (physical pruning, BN recalibration on the calibration split,
accuracy on a split). ``ChannelPruneEnv`` is a Gymnasium layer over one problem; baselines, the export and the
benchmark use the same problem, so a plan is pruned, costed and evaluated the same way everywhere.

A missing checkpoint is never trained silently: a shipped checkpoint (ResNet-18, ResNet-56) is used when it
matches, otherwise the first build prints what it trains and how long that takes on this machine
(``envs.pretrain``), and with ``train_if_missing=False`` (what parallel workers get) it raises ``CheckpointError``
with the command to run.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .budget import MODES, TARGETS, CostModel
from .cores import WorkerCores
from .data import DatasetSplits, Split, load_dataset
from .groups import GroupGraph
from .gates import DEFAULT_GATE_STEPS, DEFAULT_RUNTIME_GATES, check_gate_training, gate_layout
from .importance import (DEFAULT_SCORER, SCORERS, ImportanceContext, ImportancePredictors, Scorer,
                         check_importance_samples, make_scorer)
from .inference import inference_context, resolve_precision
from .latency import LatencyTable
from .machine import resolve_device
from .observation import BUDGET, group_features
from .pretrain import Recipe, checkpoint_path, evaluate, get_pretrained
from .runtime import GateSpec, install_gates
from .screening import Screen, combine

SPLITS = ("reward", "calib", "test")
Compensation = Callable[[GroupGraph, nn.Module, nn.Module, list], None]


SCORES_KEPT = 4096  # parts of plans whose scores a problem remembers (least recently used dropped first)


def check_settings(budget: float = 0.5, target: str = "flops", mode: str = "static", storage_budget: float = 1.0,
                   min_keep: float = 0.1, round_to: int = 1, scorer: str | Scorer = DEFAULT_SCORER,
                   compensate: Compensation | None = None) -> None:
    """ValueError naming the argument, its value and what is allowed; nothing is built."""
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
    if not (isinstance(min_keep, (int, float)) and 0 < min_keep <= 1):
        raise ValueError(f"min_keep={min_keep!r} must be in (0, 1]")
    if not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"round_to={round_to!r} must be an integer >= 1")
    if isinstance(scorer, str) and scorer not in SCORERS:
        raise ValueError(f"scorer={scorer!r} is not allowed; allowed: {', '.join(SCORERS)} or an object "
                         "with scores(ctx)")
    if not isinstance(scorer, str) and not hasattr(scorer, "scores"):
        raise ValueError(f"scorer={scorer!r} must be a name ({', '.join(SCORERS)}) or have scores(ctx)")
    if compensate is not None and not callable(compensate):
        raise ValueError(f"compensate={compensate!r} must be None or a callable (graph, base_model, pruned, "
                         "keep_idx), e.g. baselines.neuron_merging.merge_compensation")


class PruningProblem:
    """A pretrained network, its data splits, coupled groups, importance, cost model and evaluator.

    The keyword arguments are those of ``ChannelPruneEnv`` that describe the problem (see its docstring);
    ``kwargs`` keeps them so an equal problem can be rebuilt (``derive``, pickling).
    """

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
        reward_size: int = 2000,
        calib_size: int = 512,
        test_size: int | None = None,
        split_seed: int = 0,
        min_keep: float = 0.1,
        round_to: int = 1,
        scorer: str | Scorer = DEFAULT_SCORER,
        internal_only: bool = False,
        compensate: Compensation | None = None,
        latency: bool = False,
        latency_batch: int = 1,
        train_if_missing: bool = True,
        pretrain_epochs: int | None = None,
        pretrain_max_train: int | None = None,
        importance_samples: int = 4,
        runtime_gates: str = DEFAULT_RUNTIME_GATES,
        gate_steps: int = DEFAULT_GATE_STEPS,
        eval_batch_size: int = 250,
        eval_precision: str = "auto",
        device: str = "auto",
        example_input: torch.Tensor | None = None,
        data: DatasetSplits | None = None,
        progress: bool = True,
    ):
        self.kwargs = {k: v for k, v in locals().items() if k in PROBLEM_KWARGS}
        check_settings(budget, target, mode, storage_budget, min_keep, round_to, scorer, compensate)
        check_importance_samples(importance_samples)  # checked even when no predictor is trained
        check_gate_training(runtime_gates, gate_steps)
        self.mode, self.compensate, self.progress = mode, compensate, bool(progress)
        self.eval_batch_size = eval_batch_size
        self.device = resolve_device(device)
        self.eval_precision = resolve_precision(eval_precision, self.device)

        # --- data and base model (cached; never modified)
        self.data = data if data is not None else load_dataset(dataset, data_dir, reward_size=reward_size,
                                                               calib_size=calib_size, split_seed=split_seed,
                                                               test_size=test_size)
        self.checkpoint_file = None
        self.base_meta: dict = {}
        if isinstance(model, nn.Module):
            base, self.model_name = model, type(model).__name__
        else:
            recipe = Recipe()
            if pretrain_epochs is not None or pretrain_max_train is not None:
                recipe = Recipe(epochs=pretrain_epochs or recipe.epochs, max_train=pretrain_max_train)
            base, self.base_meta = get_pretrained(model, self.data.name, data_dir, width, split_seed, recipe,
                                                  checkpoint, train_if_missing, self.data, progress,
                                                  device=self.device)
            self.model_name = model
            self.checkpoint_file = checkpoint or checkpoint_path(model, self.data.name, width, split_seed, recipe)
            example_input = None
        self.base_model = base.eval()  # never modified: every plan prunes a copy
        self.example_input = example_input if example_input is not None else self.data.example_input(1)
        self.graph = GroupGraph(self.base_model, self.example_input, internal_only=internal_only)
        self.groups = self.graph.groups
        self.n_groups = len(self.groups)

        # --- importance: a static order per group, runtime gates in runtime mode
        ctx = ImportanceContext(self.base_model, self.graph, self.data.calib, self.data.train, device=self.device)
        self.predictors: ImportancePredictors | None = None
        if scorer == "learned" or mode == "runtime":
            self.predictors = ImportancePredictors.load_or_train(
                ctx, self.checkpoint_file, progress=progress, per_group=importance_samples,
                static=scorer == "learned", runtime=mode == "runtime", runtime_gates=runtime_gates,
                gate_steps=gate_steps)
        self.scorer = make_scorer(scorer, self.predictors) if isinstance(scorer, str) else scorer
        self.static_scores = [np.asarray(s, dtype=np.float64) for s in self.scorer.scores(ctx)]
        for g, s in zip(self.groups, self.static_scores):
            if s.shape != (g.num_channels,) or not np.all(np.isfinite(s)):
                raise ValueError(f"scorer {getattr(self.scorer, 'name', self.scorer)!r} returned scores of shape "
                                 f"{s.shape} (or non-finite) for group {g.index} ({g.name}); expected "
                                 f"({g.num_channels},)")
        # stable descending order: ties broken by channel index, so keep sets are deterministic
        self.order = [np.lexsort((np.arange(len(s)), -s)) for s in self.static_scores]
        self.gate_layout = gate_layout(self.graph)
        self.gated = [mode == "runtime" and v is not None and self.predictors is not None
                      and self.predictors.has_gate(i) for i, v in enumerate(self.gate_layout)]

        # --- cost model and the action wall
        latency_table = None
        if target == "latency" or latency:
            latency_table = LatencyTable(self.graph, batch_size=latency_batch, device=self.device)
        self.cost = CostModel(self.graph, self.gate_layout, self.gated, budget=budget, target=target, mode=mode,
                              storage_budget=storage_budget, min_keep=min_keep, round_to=round_to,
                              latency_table=latency_table)
        self.cost.check_reachable()
        self._features: np.ndarray | None = None
        self._scores: OrderedDict[tuple, tuple[float, float]] = OrderedDict()  # (split, plan, part) -> score
        self.cores: WorkerCores | None = None  # set by share_cores (parallel workers)

    def share_cores(self, cores: WorkerCores | None) -> None:
        """Evaluate on this worker's share of the machine's cores (``envs.cores``): past the first rung of a race,
        a plan takes the cores of the workers that have stopped. ``None``: the process's own threads."""
        if cores is not None and not isinstance(cores, WorkerCores):
            raise ValueError(f"cores={cores!r} must be None or an envs.cores.WorkerCores (CoreShare.slot(i))")
        self.cores = cores

    # ------------------------------------------------------------------------------------------ variants
    def with_budget(self, budget: float) -> "PruningProblem":
        """The same problem at another budget, sharing the network, data, scores and gates (nothing rebuilt)."""
        check_settings(budget, self.cost.target, self.mode, self.cost.storage_budget, self.cost.min_keep,
                       self.cost.round_to)
        out = copy.copy(self)
        out.cost = self.cost.with_budget(budget)
        out.cost.check_reachable()
        out.kwargs = {**self.kwargs, "budget": float(budget)}
        if self._features is not None:  # only the budget column changes
            out._features = self._features.copy()
            out._features[:, BUDGET] = out.cost.budget
        return out

    def with_gates(self, gates: dict) -> "PruningProblem":
        """The same runtime-mode problem with other runtime gates (``"gate{i}.weight"`` / ``"gate{i}.bias"``
        for the same gated groups, e.g. from ``envs.gates.train_gates_end_to_end``); nothing else is rebuilt."""
        if self.mode != "runtime" or self.predictors is None:
            raise ValueError(f"with_gates needs a problem built with mode='runtime' (this one: "
                             f"mode={self.mode!r})")
        if set(gates) != set(self.predictors.gates):
            raise ValueError(f"gates has keys {sorted(gates)}; expected this problem's "
                             f"{sorted(self.predictors.gates)}")
        out = copy.copy(self)
        out.predictors = copy.copy(self.predictors)
        out.predictors.gates = dict(gates)
        out._scores = OrderedDict()  # other gates, other scores (a budget does not change a plan's score)
        return out

    def derive(self, **overrides) -> "PruningProblem":
        """A problem with the same settings except ``overrides`` (e.g. a baseline's fine-tuned ``model``)."""
        if set(overrides) <= {"budget"}:
            return self.with_budget(overrides.get("budget", self.cost.budget))
        kwargs = {**self.kwargs, **overrides}
        if isinstance(kwargs["model"], nn.Module) and kwargs["example_input"] is None:
            kwargs["example_input"] = self.example_input
        if "data" not in overrides:
            new_splits = set(overrides) & {"dataset", "data_dir", "reward_size", "calib_size", "test_size",
                                            "split_seed"}
            kwargs["data"] = None if new_splits else self.data  # the same splits are not loaded again
        return PruningProblem(**kwargs)

    @property
    def features(self) -> np.ndarray:
        """Per-group observation features (``envs.observation``), computed on first use."""
        if self._features is None:
            self._features = group_features(self)
        return self._features

    # ------------------------------------------------------------------------------------------ plans -> networks
    def kept_channels(self, kept: Sequence[int]) -> list[np.ndarray]:
        """The channel indices each group keeps for counts ``kept``: the top of the static importance order."""
        return [np.sort(self.order[i][:k]) for i, k in enumerate(kept)]

    def build_pruned(self, kept: Sequence[int], rt: Sequence[int] | None = None, sparse: bool = False,
                     gates: bool = True) -> nn.Module:
        """The physically pruned (compensated, and in runtime mode with ``gates`` gated) network for ``kept``."""
        keep_idx = self.kept_channels(kept)
        pruned = self.graph.prune_copy(keep_idx)
        if self.compensate is not None:
            self.compensate(self.graph, self.base_model, pruned, keep_idx)
        if self.mode == "runtime" and gates:
            install_gates(pruned, list(self.gate_specs(kept, rt).values()), sparse=sparse)
        return pruned

    def gate_specs(self, kept: Sequence[int], rt: Sequence[int] | None = None) -> dict[int, GateSpec]:
        """Per gated group index, its gate sliced to the kept channels of ``kept`` and computing ``rt`` of them
        per input (``envs.runtime.install_gates`` installs them on ``build_pruned(kept, rt, gates=False)``)."""
        keep_idx = self.kept_channels(kept)
        rt = rt if rt is not None else kept
        specs = {}
        for i, v in enumerate(self.gate_layout):
            if not self.gated[i]:
                continue
            _, prod, bn, cons = v
            w = self.predictors.gates[f"gate{i}.weight"][torch.as_tensor(keep_idx[i])]
            in_g = self.graph.input_group(prod)
            if in_g is not None:
                w = w[:, torch.as_tensor(keep_idx[in_g])]
            b = self.predictors.gates[f"gate{i}.bias"][torch.as_tensor(keep_idx[i])]
            specs[i] = GateSpec(prod, bn, cons, w.contiguous(), b.contiguous(), int(rt[i]))
        return specs

    # ------------------------------------------------------------------------------------------ evaluator
    @torch.no_grad()
    def recalibrate_bn(self, model: nn.Module) -> None:
        """Reset BN statistics and re-estimate them (cumulative average) on the calibration split."""
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
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
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
        acc_loss = self.evaluate_on(model, getattr(self.data, split))
        model.eval()
        return acc_loss

    def evaluate_plan(self, kept: Sequence[int], rt: Sequence[int] | None = None, split: str = "reward",
                      screen: Screen | None = None) -> dict:
        """Prune, recalibrate and evaluate a plan of channel counts: accuracy, loss, cost ratios and the number of
        images scored. With ``screen`` (reward split only) the plan is raced (``envs.screening``): scored rung by
        rung, further only while it can still beat the search's best; ``screened`` says it stopped early. The
        evaluator is deterministic, so a part of a split this problem has scored the plan on is not scored again
        (a converged policy, or consecutive policy checks, often replay a plan)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
        data, screened = getattr(self.data, split), False
        gated = tuple(int(r) for r in (rt if rt is not None else kept)) if self.mode == "runtime" else None
        plan = (split, tuple(int(k) for k in kept), gated)  # static mode: ``rt`` changes no network
        pruned = None

        def score(start: int, stop: int) -> tuple[float, float]:
            """(accuracy, loss) of the plan on images start:stop, pruned and recalibrated on first need."""
            nonlocal pruned
            part = plan + (start, stop)
            if part in self._scores:
                self._scores.move_to_end(part)
                return self._scores[part]
            if pruned is None:
                pruned = self.build_pruned(kept, rt)
                self.recalibrate_bn(pruned)  # at the worker's own threads: BN statistics depend on the count
            if start > 0 and cores is not None:  # every worker scores a first part; later ones may be alone
                cores.fit()
            self._scores[part] = self.evaluate_on(pruned, data.part(start, stop))
            if len(self._scores) > SCORES_KEPT:
                self._scores.popitem(last=False)
            return self._scores[part]

        raced = screen is not None and split == "reward"
        cores = self.cores if self.device.type == "cpu" else None
        acc, loss, scored = 0.0, 0.0, 0
        with cores.busy() if cores is not None else contextlib.nullcontext():
            for stop in screen.cuts(len(data)) if raced else [len(data)]:
                part = score(scored, stop)
                acc, loss = combine((acc, loss), scored, part, stop - scored) if scored else part
                scored = stop
                if scored < len(data) and not screen.can_win(acc, scored, len(data)):
                    screened = True
                    break
        if raced and not screened:
            screen.record(acc)
        r = self.cost.ratios(kept, rt)
        out = {"accuracy": acc, "loss": loss, "flops_ratio": r["flops"], "params_ratio": r["params"],
               "effective_flops_ratio": r.get("effective", r["flops"]),
               "images_scored": scored, "screened": screened}
        if "latency" in r:
            out["latency_ratio"] = r["latency"]
        return out

    def evaluate_on(self, model: nn.Module, data: Split) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of ``model`` on any ``Split`` (e.g. a part of one), by the evaluator."""
        return evaluate(model, data, self.eval_batch_size, self.eval_precision, self.device)


PROBLEM_KWARGS = tuple(p for p in inspect.signature(PruningProblem.__init__).parameters if p != "self")
