"""Capture across the ranks of a torch.distributed run: every rank agrees on each phase, or every rank raises.

A graph with NCCL collectives is captured on every rank at the same sizes in the same order. If one rank
fails (an exception in fn, an out-of-memory), the others must not go on to wait forever in the next
collective. So each phase of the capture (the warm-up, each size) ends with an exchange of every rank's
outcome through the process group's store: no GPU work, so it works whatever state a rank's GPU is in,
and a wait with a timeout, so a rank that died or hung is named within bounded time. (A timed-out gloo
collective would stay pending in the background and abort the process when its peer goes away.)
"""
from __future__ import annotations

import contextlib
import itertools
import pickle
from datetime import timedelta
from typing import Any, Iterator, List, Optional, Union

import torch.distributed as dist

from graphrunner.errors import DistributedCaptureError

_captures = itertools.count()  # every rank captures in the same order, so this numbers them alike


def in_distributed_run() -> bool:
    """Whether torch.distributed is available and initialized (a world of one counts)."""
    return dist.is_available() and dist.is_initialized()


def is_rank_zero() -> bool:
    """True outside a distributed run, and on rank 0 in one: the rank that shows progress and logs."""
    return not in_distributed_run() or dist.get_rank() == 0


class RankAgreement:
    """Outcome exchanges among all ranks of the default group (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.rank, self.world = timeout_s, dist.get_rank(), dist.get_world_size()
        # torch exposes the default group's store only through this private name (stable since 1.x);
        # the store is what every rank already rendezvoused through.
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = f"graphrunner/capture{next(_captures)}/"
        self.exchanges = itertools.count()

    def exchange(self, phase: str, error: Optional[BaseException] = None, value: Any = None) -> List[Any]:
        """Every rank's `value`, in rank order, once every rank has reported; raises on every rank if any
        rank reports an error or does not report within the timeout."""
        mine = (None if error is None else f"{type(error).__name__}: {error}", value)
        exchange = next(self.exchanges)
        keys = [f"{self.prefix}{exchange}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], pickle.dumps(mine))
        default_timeout = self.store.timeout  # the store is shared: its own timeout goes back afterwards
        self.store.set_timeout(timedelta(seconds=self.timeout_s))
        try:
            self.store.wait(keys)
        except RuntimeError as exc:
            silent = [r for r, key in enumerate(keys) if not self.store.check([key])]
            raise DistributedCaptureError(
                f"{phase}: no word from rank(s) {', '.join(map(str, silent))} within {self.timeout_s:g} s; they may "
                f"have died or hung (GraphRunner(collective_timeout_s=...) sets this limit)") from error or exc
        finally:
            self.store.set_timeout(default_timeout)
        everyone = [pickle.loads(self.store.get(key)) for key in keys]
        failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e is not None]
        if failed:
            raise DistributedCaptureError(f"{phase} failed on {len(failed)} of {self.world} ranks, so every rank "
                                          f"stops: " + "; ".join(failed)) from error
        return [v for _, v in everyone]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Runs one phase on this rank, then waits for every rank's outcome."""
        try:
            yield
        except Exception as exc:
            self.exchange(name, exc)
            raise  # exchange() has raised already; kept for readers and linters
        self.exchange(name)

    def same_everywhere(self, name: str, value: Any) -> None:
        """Raises on every rank unless every rank passes an equal `value`."""
        values = self.exchange(name, value=value)
        if any(v != values[0] for v in values):
            raise DistributedCaptureError(f"ranks disagree on {name}: " + "; ".join(
                f"rank {r}: {v}" for r, v in enumerate(values)) + ". Build every rank's runner with the same "
                "max_batch_size and capture_sizes")


class SoloAgreement:
    """The same interface for a process that is not part of a distributed run: nothing to agree on."""

    rank, world = 0, 1

    def exchange(self, phase: str, error: Optional[BaseException] = None, value: Any = None) -> List[Any]:
        return [value]

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def same_everywhere(self, name: str, value: Any) -> None:
        pass


Agreement = Union[RankAgreement, SoloAgreement]


def agreement(timeout_s: float) -> Agreement:
    """A RankAgreement in a distributed run, else a SoloAgreement."""
    return RankAgreement(timeout_s) if in_distributed_run() else SoloAgreement()
