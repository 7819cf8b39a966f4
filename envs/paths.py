"""Where cached artefacts (checkpoints, predictors, unpacked datasets) live."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "CHANNELPRUNE_CACHE"


def cache_dir() -> Path:
    """``$CHANNELPRUNE_CACHE`` if set, else ``~/.cache/channelprune``; created on first use."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "channelprune")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (named by this process) to write; then rename it onto ``path``, so
    readers never see half a file and processes writing at once (``--n-envs``, Ray workers) never clobber each
    other's copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    yield tmp
    tmp.replace(path)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file and a rename."""
    import torch

    with _replacing(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with _replacing(path) as tmp:
        tmp.write_text(text)


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike, opener=open) -> None:
    """Copy the stream ``opener(src, "rb")`` (``open``, or ``gzip.open`` to unpack) to ``path`` through a temporary
    file and a rename."""
    with _replacing(path) as tmp, opener(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
