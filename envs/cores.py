"""Cores shared by evaluation workers: a worker whose siblings are idle scores with their cores too.

Parallel envs (``agents.train --n-envs K``: SubprocVecEnv workers, one torch thread each) step together, and an
episode ends with its evaluation. In a raced search (``screen_size``) most plans stop at the first rung while a
few are scored in full, so at the end of most steps one worker evaluates while the others wait for it with their
cores idle. ``CoreShare`` is a named shared-memory block (one byte per worker: busy or not) that the workers'
problems read before each part of an evaluation (``PruningProblem.evaluate_plan``): past the first rung a worker
takes ``cores // busy`` threads (at least its own), so the last worker of a step scores on all the cores.

The score should not change with the thread count. BN recalibration, whose batch statistics do depend on it,
and the first rung run at the worker's own count; the forward passes after it gave the same accuracy and loss at
1 and 2 threads to the last bit on the test model (tests/test_cores.py, on every machine CI runs on) and on
ResNet-18 plans on an AVX2 EPYC (docs/agents/thread_invariance.py). A machine whose kernels split sums by thread
could differ in the last bits. A worker only takes thread counts whose probed backend (``envs.machine.backend``:
memory format, precision) equals its own count's.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from multiprocessing import shared_memory

import torch


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CoreShare:
    """Who of ``workers`` processes is evaluating now: one byte each in a named shared-memory block, released
    when this object is collected (keep it as long as the workers run). Give worker ``i`` ``slot(i)``; a slot
    pickles as the block's name, so it travels to a worker however the worker is started."""

    def __init__(self, workers: int, cores: int | None = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r} must be a positive integer")
        cores = available_cores() if cores is None else cores
        if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
            raise ValueError(f"cores={cores!r} must be a positive integer")
        self.workers, self.cores = workers, cores
        self._block = shared_memory.SharedMemory(create=True, size=workers)
        self._block.buf[:workers] = bytes(workers)
        weakref.finalize(self, _release, self._block)

    def slot(self, index: int) -> "WorkerCores":
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.workers:
            raise ValueError(f"index={index!r} must be an integer in [0, {self.workers})")
        return WorkerCores(self._block.name, index, self.workers, self.cores)


def _release(block: shared_memory.SharedMemory) -> None:
    block.close()
    block.unlink()


class WorkerCores:
    """One worker's view of a ``CoreShare``: ``with cores.busy():`` around an evaluation, ``cores.fit()`` before
    each part of it (sets torch's threads to this worker's share of the cores; outside ``busy`` the worker keeps
    the thread count it had)."""

    def __init__(self, name: str, index: int, workers: int, cores: int):
        self.name, self.index, self.workers, self.cores = name, index, workers, cores
        self._block: shared_memory.SharedMemory | None = None
        self._base: int | None = None  # the worker's own thread count, read when it first evaluates
        self._same_arithmetic: dict[int, bool] = {}

    def __getstate__(self) -> dict:
        return {"name": self.name, "index": self.index, "workers": self.workers, "cores": self.cores}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def _flags(self) -> memoryview:
        if self._block is None:  # attached on first use, in the process that uses it
            self._block = shared_memory.SharedMemory(name=self.name)
        return self._block.buf

    def share(self) -> int:
        """This worker's share of the cores now: ``cores // busy workers`` (at least 1)."""
        busy = max(1, sum(self._flags[:self.workers]))
        return max(1, self.cores // busy)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._base = self._base or torch.get_num_threads()
        self._flags[self.index] = 1
        try:
            yield
        finally:
            self._flags[self.index] = 0
            if torch.get_num_threads() != self._base:
                torch.set_num_threads(self._base)

    def fit(self) -> int:
        """Set torch's threads to this worker's share (never below its own count, only to counts with the same
        backend); returns the count set."""
        base = self._base or torch.get_num_threads()
        n = max(base, self.share())
        if n != base and not self._same_backend(base, n):
            n = base
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    def _same_backend(self, base: int, n: int) -> bool:
        """Whether the probed backend at ``n`` threads equals that at ``base`` (formats and precision)."""
        if n not in self._same_arithmetic:
            from .machine import backend

            was = torch.get_num_threads()
            seen = []
            for threads in (base, n):
                torch.set_num_threads(threads)
                be = backend("cpu")
                seen.append((be.eval_channels_last, be.train_channels_last, be.bf16))
            torch.set_num_threads(was)
            self._same_arithmetic[n] = seen[0] == seen[1]
        return self._same_arithmetic[n]
