"""Where cached artefacts (checkpoints, predictors, unpacked datasets) live."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "CHANNELPRUNE_CACHE"


def cache_dir() -> Path:
    """``$CHANNELPRUNE_CACHE`` if set, else ``~/.cache/channelprune``; created on first use."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "channelprune")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: readers never see half a file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike, opener=open) -> None:
    """Copy the stream ``opener(src, "rb")`` (``open``, or ``gzip.open`` to unpack) to ``path`` through a temporary
    file and a rename, so that processes building envs at once (``--n-envs``, Ray workers) never clobber each
    other."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with opener(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    tmp.replace(path)
