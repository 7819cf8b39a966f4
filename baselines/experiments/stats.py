"""Means, intervals and honest comparisons over seeds for the benchmark's tables and plots.

Intervals are Student-t 95% intervals of the mean over seeds (``scipy.stats.t``). With the 3-5 seeds a benchmark
can afford, a percentile bootstrap has only a handful of distinct resamples and covers the mean far less often
than it claims; the t interval is the wider, honest choice. A learned method is called better than another only
when its interval lies entirely above the other's; overlapping intervals are a tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with a two-sided ``CONFIDENCE`` interval (``nan`` bounds for a single value)."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, fmt: str = "{:.4f}") -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or not math.isfinite(self.low):
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def estimate(values: Sequence[float]) -> Estimate:
    """Mean and t interval of finite ``values``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if len(x) == 1:
        return Estimate(float(x[0]), math.nan, math.nan, 1)
    sem = float(x.std(ddof=1) / math.sqrt(len(x)))
    if sem == 0.0:
        return Estimate(float(x.mean()), float(x.mean()), float(x.mean()), len(x))
    low, high = stats.t.interval(CONFIDENCE, len(x) - 1, loc=float(x.mean()), scale=sem)
    return Estimate(float(x.mean()), float(low), float(high), len(x))


def compare(a: Estimate, b: Estimate) -> str:
    """">" when a's interval lies above b's, "<" when below, "tie" when they overlap, "n/a" without intervals."""
    if a.n < 2 or b.n < 2:
        return "n/a"
    if a.low > b.high:
        return ">"
    if a.high < b.low:
        return "<"
    return "tie"
