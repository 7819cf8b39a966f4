"""Command-line helpers shared by every entry point (``agents``, ``baselines.experiments``)."""

from __future__ import annotations

from typing import Any, Sequence

import yaml


def parse_key_values(items: Sequence[str] | None, what: str = "--env-kwargs", *,
                     raw: bool = False) -> dict[str, Any]:
    """``["budget=0.5", "width=0.5"]`` -> ``{"budget": 0.5, "width": 0.5}``; values parsed with yaml.safe_load,
    except that a number YAML 1.1 leaves a string (``1e-3``, ``5E+2``: no dot) is a float, as a user means it.

    ``what`` names the flag in the errors (ValueError for an item without ``=`` or with an unparsable value).
    ``raw=True`` keeps every value as the string written (paths, names: ``algo=runs/01`` stays ``"runs/01"``).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what}: {item!r} is not of the form key=value")
        if raw:
            out[key.strip()] = value
            continue
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as exc:
            raise ValueError(f"{what}: cannot parse the value of {item!r}: {exc}") from exc
        out[key.strip()] = _number(parsed) if isinstance(parsed, str) else parsed
    return out


def _number(text: str) -> Any:
    try:
        return float(text) if text.strip().lower() not in ("nan", "inf", "-inf", "infinity") else text
    except ValueError:
        return text
