"""The benchmark's grid: its cells, what they share, and its rows (``results.csv``), for the serial loop in
``benchmark`` and the Ray executor in ``ray_grid`` alike."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

FIELDS = [
    "method", "kind", "budget", "seed", "status", "reward_acc_before_ft", "test_acc_before_ft", "test_acc",
    "flops_ratio", "params_ratio", "effective_flops_ratio", "clamp_total", "latency_b64_ms", "speedup_b64",
    "latency_b64_ms_device", "speedup_b64_device", "evaluations", "search_seconds", "finetune_seconds",
    "keep_ratios", "error", "device", "machine", "cpu_machine", "test_images",
]


def read_rows(path: Path) -> list[dict]:
    """The rows of a results.csv (none when it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append one row to results.csv (an older file is first rewritten with today's columns)."""
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:  # a results.csv from an older version: rewrite it with today's columns
            old = read_rows(path)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in FIELDS} for r in old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})


@dataclass(frozen=True)
class Cell:
    """One (method, budget, seed) of the grid; ``methods`` are its rows still to run (an agent gives two)."""

    budget: float
    seed: int
    kind: str  # "baseline" | "agent"
    name: str
    methods: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """What every cell of one benchmark run shares."""

    env_id: str
    env_kwargs: dict
    episodes: int
    finetune_steps: int
    out: str
    agent_runs: dict
    progress: bool
    latency: str
    latency_rounds: int = 3
    search_samples: int | None = None  # a search's evaluations (None: ``episodes``): the agents' episodes + checks


def error_row(cell: Cell, method: str, error: str, seconds: float = 0.0, where: dict | None = None) -> dict:
    return {"method": method, "kind": cell.kind, "budget": cell.budget, "seed": cell.seed, "status": "error",
            "error": error, "search_seconds": seconds, **(where or {})}
