"""Racing the reward split: score a plan on its first images, the rest only when it can still win.

A search (an agent's episodes, random search's plans) only needs the full reward-split accuracy of plans that
may become its best. ``Screen`` is two-rung successive halving with a racing rule (Maron & Moore, "Hoeffding
races", NIPS 1993; Jamieson & Talwalkar, "Non-stochastic best arm identification and hyperparameter optimization",
AISTATS 2016): every plan is scored on the first ``first`` images of the reward split; it is scored on the rest
only if the upper confidence bound of its accuracy, ``a + z * sqrt(a (1 - a) / first)``, reaches the best
full-split accuracy this search has seen. A plan stopped at the first rung keeps its first-rung accuracy (an
unbiased, noisier estimate) as its score and is flagged ``screened``; it cannot be the search's best, since its
score is below the best by construction. The first plan of a search is always scored in full.

The state (the best full score) belongs to one search: an env owns one ``Screen`` for its lifetime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Screen:
    """The racing rule of one search; ``first``: images scored first, ``z``: width of the confidence bound."""

    first: int
    z: float = 2.0
    best: float = -math.inf  # best accuracy of a plan scored on the whole split

    def __post_init__(self):
        if not (isinstance(self.first, int) and self.first >= 1):
            raise ValueError(f"screen_size={self.first!r} must be a positive integer (images scored first) or "
                             "None")
        if not (self.z >= 0 and math.isfinite(self.z)):
            raise ValueError(f"screen z={self.z!r} must be a finite number >= 0")

    def can_win(self, accuracy: float) -> bool:
        """Whether a plan with ``accuracy`` on the first rung may still beat the best full score."""
        var = max(accuracy * (1.0 - accuracy), 1.0 / self.first)  # never a zero-width bound at 0 or 1
        return accuracy + self.z * math.sqrt(var / self.first) >= self.best

    def record(self, accuracy: float) -> None:
        """A plan was scored on the whole split."""
        self.best = max(self.best, accuracy)


def combine(first: tuple[float, float], n_first: int, rest: tuple[float, float], n_rest: int
            ) -> tuple[float, float]:
    """(accuracy, mean loss) of the whole split from those of its two parts."""
    n = n_first + n_rest
    return tuple((a * n_first + b * n_rest) / n for a, b in zip(first, rest))
