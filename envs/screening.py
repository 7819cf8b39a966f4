"""Racing the reward split: score a plan on its first images, the rest only when it can still win.

A search (an agent's episodes, random search's plans) only needs the full reward-split accuracy of plans that
may become its best. ``Screen`` is successive halving with a racing rule (Maron & Moore, "Hoeffding races", NIPS
1993; Jamieson & Talwalkar, "Non-stochastic best arm identification and hyperparameter optimization", AISTATS
2016): a plan is scored on the first ``rungs[0]`` images of the reward split, then up to each further rung, then on
the whole split, and stops at the first rung where it can no longer win: where the upper confidence bound of its
whole-split accuracy, ``a + z * sqrt(a (1 - a) / n * (N - n) / N)`` after ``n`` of the split's ``N`` images,
is below the best whole-split accuracy this search has seen. ``(N - n) / N`` is the finite-population factor: the
question is the accuracy on *this* split, of which ``n`` images are already known. A stopped plan keeps the
accuracy of the images it was scored on (an unbiased, noisier estimate) and is flagged ``screened``; it cannot be
the search's best, since its score is below the best by construction. The first plan of a search is always scored
in full. Each rung is one more test, so more rungs stop more near-best plans early and, rarely, a plan that would
have won: ``baselines.experiments.screening`` measures both on random plans.

The state (the best full score) belongs to one search: an env owns one ``Screen`` for its lifetime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral


def check_rungs(screen_size: int | Sequence[int]) -> tuple[int, ...]:
    """``screen_size`` as increasing rung sizes; ValueError naming it unless a positive integer or an increasing
    sequence of them."""
    rungs: tuple = ()
    if isinstance(screen_size, Integral):
        rungs = (screen_size,)
    elif isinstance(screen_size, Sequence) and not isinstance(screen_size, str):
        rungs = tuple(screen_size)
    if not (rungs and all(isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 for n in rungs)
            and all(a < b for a, b in zip(rungs, rungs[1:]))):
        raise ValueError(f"screen_size={screen_size!r} must be None (score every plan on the whole reward split), "
                         "a positive integer (images scored first; the rest only for plans that can still win) or "
                         "an increasing list of them (the rungs of the race, e.g. [500, 1000])")
    return tuple(int(n) for n in rungs)


@dataclass
class Screen:
    """The racing rule of one search. ``rungs``: images scored before each test (an int for one rung), ``z``:
    width of the confidence bound."""

    rungs: int | tuple[int, ...]
    z: float = 2.0
    best: float = -math.inf  # best accuracy of a plan scored on the whole split

    def __post_init__(self):
        self.rungs = check_rungs(self.rungs)
        if not (self.z >= 0 and math.isfinite(self.z)):
            raise ValueError(f"screen z={self.z!r} must be a finite number >= 0")

    @property
    def first(self) -> int:
        return self.rungs[0]

    def can_win(self, accuracy: float, scored: int | None = None, total: int | None = None) -> bool:
        """Whether a plan with ``accuracy`` on the first ``scored`` images (default: the first rung) of a split of
        ``total`` (default: infinite, no finite-population factor) may still beat the best full score."""
        n = self.first if scored is None else scored
        var = max(accuracy * (1.0 - accuracy), 1.0 / n) / n  # never a zero-width bound at 0 or 1
        if total is not None:
            var *= max(total - n, 0) / total
        return accuracy + self.z * math.sqrt(var) >= self.best

    def cuts(self, total: int) -> list[int]:
        """Where a split of ``total`` images is cut: the rungs below it, then the whole split."""
        return [n for n in self.rungs if n < total] + [total]

    def record(self, accuracy: float) -> None:
        """A plan was scored on the whole split."""
        self.best = max(self.best, accuracy)


def combine(first: tuple[float, float], n_first: int, rest: tuple[float, float], n_rest: int
            ) -> tuple[float, float]:
    """(accuracy, mean loss) of the whole split from those of its two parts."""
    n = n_first + n_rest
    return tuple((a * n_first + b * n_rest) / n for a, b in zip(first, rest))
