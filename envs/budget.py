"""The cost of a pruning plan and AMC's action wall, as pure functions of channel counts.

A plan is ``kept[i]``, the channels group ``i`` keeps, and in runtime mode ``rt[i]``, the channels each input
computes. :class:`CostModel` turns a plan into costs (MACs, parameters, effective MACs with the runtime gates'
own cost, a latency look-up), checks them against the budget, and decides a step's channel counts under the
wall (the largest count that keeps the budget reachable with every later group at ``min_keep``, He et al.
2018). The env, every baseline's ``fit_to_budget`` and the root-finders (PFP's eps, SCOP's threshold) all ask
this one model, so a plan costs the same wherever it is evaluated.

One action mapping: ``ratio_of_action`` maps an action in [-1, 1] linearly to a keep ratio in
``[min_keep, 1]``, ``action_of_ratio`` is its inverse. Relative actions (``agents.relative_actions``,
``random_search_anchored``) ask for a factor ``SPREAD**a`` of a reference ratio instead.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import brentq

from .groups import GroupGraph, keep_count
from .latency import LatencyTable

TARGETS = ("flops", "params", "latency")
MODES = ("static", "runtime")
SPREAD = 3.0  # a relative action a in [-1, 1] asks for SPREAD**a times its reference ratio
_TOL = 1 + 1e-9  # relative slack for float round-off in "cost <= limit"


def ratio_of_action(action: float, min_keep: float) -> float:
    """Action in [-1, 1] -> keep ratio in [min_keep, 1] (linear; -1 -> min_keep, 1 -> 1)."""
    return min_keep + (float(action) + 1.0) / 2.0 * (1.0 - min_keep)


def action_of_ratio(ratio: float, min_keep: float) -> float:
    """The inverse of :func:`ratio_of_action`, clipped to [-1, 1]."""
    span = 1.0 - min_keep
    return 1.0 if span <= 0 else float(np.clip(2.0 * (ratio - min_keep) / span - 1.0, -1.0, 1.0))


class CostModel:
    """Costs of channel counts, the budget's limits and the action wall for one network and one budget."""

    def __init__(self, graph: GroupGraph, gate_layout: Sequence, gated: Sequence[bool], *, budget: float,
                 target: str = "flops", mode: str = "static", storage_budget: float = 1.0, min_keep: float = 0.1,
                 round_to: int = 1, latency_table: LatencyTable | None = None):
        self.graph, self.gate_layout, self.gated = graph, list(gate_layout), list(gated)
        self.budget, self.target, self.mode = float(budget), target, mode
        self.storage_budget, self.min_keep, self.round_to = float(storage_budget), float(min_keep), int(round_to)
        self.latency_table = latency_table
        self.k_full = [g.num_channels for g in graph.groups]
        self.k_min = [keep_count(self.min_keep, c, self.round_to) for c in self.k_full]
        self.base = {"flops": float(graph.base_macs), "params": float(graph.base_params)}
        if latency_table is not None:
            self.base["latency"] = latency_table.predict(self.k_full)

    def with_budget(self, budget: float) -> "CostModel":
        """The same model with another budget (shares the graph and the latency table)."""
        out = copy.copy(self)
        out.budget = float(budget)
        return out

    # ------------------------------------------------------------------------------------------ costs
    @property
    def constrained(self) -> str:
        """The cost the budget limits: effective MACs in runtime mode, else the target."""
        return "effective" if self.mode == "runtime" else self.target

    def effective_macs(self, kept: Sequence[int], rt: Sequence[int]) -> float:
        """MACs actually computed per input: gated groups at their runtime counts plus each gate's own Linear."""
        macs = float(self.graph.macs(kept, runtime_kept=rt))
        for i, v in enumerate(self.gate_layout):
            if self.gated[i] and rt[i] < kept[i]:
                prod = self.graph.input_group(v[1])
                c_in = kept[prod] if prod is not None else self.graph.model.get_submodule(v[1]).in_channels
                macs += c_in * kept[i]
        return macs

    def costs(self, kept: Sequence[int], rt: Sequence[int] | None = None) -> dict[str, float]:
        """Absolute costs of a plan: ``flops`` (MACs), ``params``, ``effective`` (runtime mode), ``latency``."""
        out = {"flops": float(self.graph.macs(kept)), "params": float(self.graph.params(kept))}
        if self.mode == "runtime":
            out["effective"] = self.effective_macs(kept, rt if rt is not None else kept)
        if self.latency_table is not None:
            out["latency"] = self.latency_table.predict(kept)
        return out

    def ratios(self, kept: Sequence[int], rt: Sequence[int] | None = None) -> dict[str, float]:
        """Costs of a plan relative to the unpruned network (``effective`` relative to its MACs)."""
        return {k: v / self.base["flops" if k == "effective" else k] for k, v in self.costs(kept, rt).items()}

    def limits(self) -> dict[str, float]:
        """Absolute limits the wall enforces."""
        if self.mode == "runtime":
            lim = {"effective": self.budget * self.base["flops"]}
            if self.storage_budget < 1:
                lim["params"] = self.storage_budget * self.base["params"]
            return lim
        return {self.target: self.budget * self.base[self.target]}

    def fits(self, kept: Sequence[int], rt: Sequence[int] | None = None,
             names: Sequence[str] | None = None) -> bool:
        costs, lim = self.costs(kept, rt), self.limits()
        return all(costs[n] <= lim[n] * _TOL for n in (names or lim) if n in lim)

    def min_runtime(self, i: int, k: int) -> int:
        """The fewest channels a gated group computes per input with ``k`` kept (``k`` itself when not gated)."""
        return keep_count(self.min_keep, k, 1) if self.gated[i] else k

    def check_reachable(self) -> None:
        """ValueError when even every group at ``min_keep`` exceeds the budget."""
        rt_min = [self.min_runtime(i, k) for i, k in enumerate(self.k_min)]
        costs = self.costs(self.k_min, rt_min)
        for name, limit in self.limits().items():
            if costs[name] > limit * _TOL:
                base = self.base["flops" if name == "effective" else name]
                raise ValueError(f"budget unreachable: with every group at min_keep={self.min_keep} the {name} "
                                 f"ratio is {costs[name] / base:.3f} > {limit / base:.3f}; raise the budget or "
                                 "lower min_keep")

    # ------------------------------------------------------------------------------------------ plans of ratios
    def count(self, i: int, ratio: float) -> int:
        """Channels group ``i`` keeps for a keep ratio (rounded to ``round_to``, at least ``k_min``)."""
        return keep_count(ratio, self.k_full[i], self.round_to, self.k_min[i])

    def plan_counts(self, ratios: Sequence[float], runtime: Sequence[float] | None = None
                    ) -> tuple[list[int], list[int]]:
        """Channel counts of a plan of keep ratios (and runtime ratios; 1 when not given)."""
        kept = [self.count(i, float(r)) for i, r in enumerate(ratios)]
        rt = [keep_count(float(runtime[i]) if runtime is not None else 1.0, k, 1) if self.gated[i] else k
              for i, k in enumerate(kept)]
        return kept, rt

    def plan_cost(self, ratios: Sequence[float], runtime: Sequence[float] | None = None) -> float:
        """The budgeted cost ratio (the target's; effective MACs in runtime mode) of a plan of keep ratios."""
        return self.ratios(*self.plan_counts(ratios, runtime))[self.constrained]

    def fit_to_budget(self, ratios: Sequence[float], budget: float | None = None) -> np.ndarray:
        """Scale a plan by one factor s, ``r_i(s) = clip(s * r_i, min_keep, 1)``: the largest such plan whose cost
        is within the budget (``fit_parameter``)."""
        r = np.clip(np.asarray(ratios, dtype=np.float64), self.min_keep, 1.0)
        plan = lambda s: np.clip(s * r, self.min_keep, 1.0)  # noqa: E731
        return plan(self.fit_parameter(lambda s: (plan(s), None), 0.0, 1.0 / r.min(), budget))

    def streams_whole(self) -> np.ndarray:
        """Li et al.'s ResNet plan (ICLR 2017, Sec. 4.3): every residual-stream group kept whole, every
        block-internal group at one ratio, the largest within the budget. When even ``min_keep`` inside the blocks
        does not fit, the streams are cut too, by one common factor (``fit_to_budget``); a network with only one
        kind of group gets the uniform plan."""
        stream = np.array([g.kind == "residual" for g in self.graph.groups])
        if stream.all() or not stream.any():  # nothing to keep apart
            return self.fit_to_budget(np.ones(len(stream)))
        plan = lambda u: np.where(stream, 1.0, u)  # noqa: E731
        u = self.fit_parameter(lambda u: (plan(u), None), self.min_keep, 1.0)
        if not self.fits(self.plan_counts(plan(u))[0]):  # the streams alone overspend: cut them too
            return self.fit_to_budget(plan(self.min_keep))
        return plan(u)

    def even_ratio(self, t: int, kept: Sequence[int]) -> float:
        """The keep ratio that, given to every group from ``t`` on (``kept[:t]`` decided, runtime ratio 1), spends
        the budget: the largest such ratio within it (``min_keep`` when even that does not fit)."""
        done = [k / c for k, c in zip(kept[:t], self.k_full)]
        n_rest = len(self.k_full) - t
        return self.fit_parameter(lambda u: (done + [u] * n_rest, None), self.min_keep, 1.0)

    def fill(self, kept: Sequence[int]) -> list[int]:
        """Static counts ``kept`` (within the budget) scaled up by the largest common factor that stays within it
        (``fit_to_budget`` on their ratios, never below them), repeated until the counts stop changing, so that
        filling a filled plan gives it back unchanged (replays are exact)."""
        kept = [int(k) for k in kept]
        while True:
            ratios = self.fit_to_budget([k / c for k, c in zip(kept, self.k_full)])
            more = [max(a, b) for a, b in zip(self.plan_counts(ratios)[0], kept)]
            if more == kept or not self.fits(more):
                return kept
            kept = more

    def fit_parameter(self, plan: Callable[[float], tuple[Sequence[float], Sequence[float] | None]], lo: float,
                      hi: float, budget: float | None = None, xtol: float = 1e-4) -> float:
        """The one budget root-finder: the largest ``u`` in [lo, hi] whose plan ``plan(u)`` = (keep ratios,
        runtime ratios or None) costs at most the budget, for plans whose cost does not fall as ``u`` grows
        (scipy's brentq on cost - budget; channel counts are rounded, so the cost is a step function, and ``u``
        then steps down until it fits). ``hi`` when even plan(hi) fits; ``lo`` when nothing does (check it)."""
        budget = self.budget if budget is None else budget
        excess = lambda u: self.plan_cost(*plan(u)) - budget  # noqa: E731
        if excess(hi) <= 0:
            return hi
        if excess(lo) > 0:
            return lo
        u, step = brentq(excess, lo, hi, xtol=xtol), xtol
        while excess(u) > 0 and u > lo:
            u, step = max(lo, u - step), 2.0 * step
        return u

    # ------------------------------------------------------------------------------------------ the wall
    def decide(self, t: int, keep_ratio: float, runtime_ratio: float, kept: Sequence[int], rt: Sequence[int],
               wall: bool = True) -> tuple[int, int, int]:
        """Step ``t``'s (requested count, kept count, runtime count), given the earlier groups' ``kept[:t]`` and
        ``rt[:t]``; with ``wall`` the counts are the largest that keep the budget reachable."""
        k_asked = self.count(t, keep_ratio)
        k = self._wall_static(t, k_asked, kept, rt) if wall else k_asked
        r = keep_count(runtime_ratio, k, 1, self.min_runtime(t, k)) if self.gated[t] else k
        if wall and self.mode == "runtime":
            k, r = self._wall_runtime(t, k, r, kept, rt)
        return k_asked, k, r

    def budget_left(self, t: int, kept: Sequence[int], rt: Sequence[int]) -> float:
        """Fraction of the remaining reducible cost the budget still allows, with ``kept[:t]`` decided."""
        name = self.constrained
        hi = self.costs(list(kept[:t]) + self.k_full[t:], list(rt[:t]) + self.k_full[t:])[name]
        min_rt = list(rt[:t]) + [self.min_runtime(j, k) for j, k in enumerate(self.k_min[t:], start=t)]
        lo = self.costs(list(kept[:t]) + self.k_min[t:], min_rt)[name]
        return float(np.clip((self.limits()[name] - lo) / max(hi - lo, 1e-12), 0.0, 1.0))

    def _trial(self, t: int, kept: Sequence[int], rt: Sequence[int], k: int, r: int | None = None):
        """Earlier groups as decided, group t at (k, r), every later group at its minimum."""
        later = range(t + 1, len(self.k_full))
        return (list(kept[:t]) + [k] + self.k_min[t + 1:],
                list(rt[:t]) + [k if r is None else r] + [self.min_runtime(j, self.k_min[j]) for j in later])

    def _grid_step(self, t: int) -> int:
        """Grid of static counts the wall searches: multiples of round_to from k_min (every count when the group
        has fewer channels than round_to)."""
        return self.round_to if self.k_min[t] % self.round_to == 0 else 1

    def _wall_static(self, t: int, k: int, kept, rt) -> int:
        names = ["params"] if self.mode == "runtime" else [self.target]
        if k <= self.k_min[t]:
            return k
        return largest_on_grid(self.k_min[t], k, lambda v: self.fits(*self._trial(t, kept, rt, v), names),
                               self._grid_step(t))

    def _wall_runtime(self, t: int, k: int, r: int, kept, rt) -> tuple[int, int]:
        step, eff = self._grid_step(t), ["effective"]
        if not self.gated[t]:
            fits = lambda v: self.fits(*self._trial(t, kept, rt, v, v), eff)  # noqa: E731
            k2 = largest_on_grid(self.k_min[t], k, fits, step)
            return k2, k2
        r_min = self.min_runtime(t, k)
        ok = lambda v: self.fits(*self._trial(t, kept, rt, k, v), eff)  # noqa: E731
        if ok(r_min):
            return k, largest_on_grid(r_min, r, ok)
        # the gate's own cost grows with k: shrink the static count too
        shrunk = lambda v: self.fits(*self._trial(t, kept, rt, v, self.min_runtime(t, v)), eff)  # noqa: E731
        k2 = largest_on_grid(self.k_min[t], k, shrunk, step)
        return k2, self.min_runtime(t, k2)


def largest_on_grid(lo: int, hi: int, ok: Callable[[int], bool], step: int = 1) -> int:
    """Largest v on the grid lo + i*step in [lo, hi] with ok(v), for ok monotone decreasing (ok(lo) holds)."""
    if ok(hi):
        return hi
    lo_i, hi_i = 0, max(0, (hi - lo) // step)
    while lo_i < hi_i:
        mid = (lo_i + hi_i + 1) // 2
        if ok(lo + mid * step):
            lo_i = mid
        else:
            hi_i = mid - 1
    return lo + lo_i * step
