"""Scrub and guard around each segment and each break op of a piecewise size, for validate().

Note [checked breaks]: a step at a piecewise size runs segment 0, break 1, segment 1, ... in one native call
(csrc/py_step.cpp, Note [breaks]), which reads each break, (op, args, kwargs), from the list the runner armed
(`Target.pieces`). For its own scrubbed or guarded steps, validate() puts a checked call in place of each of the
size's ops in that list, and puts the recorded ops back after the step, whatever it raised: every other step,
and the native fast path itself, run exactly as armed, at no cost. The checked call of the op after segment k
(messages call it break k + 1, between segments k and k + 1):

- with guard, checks the copies validate took before the step as it checks them after a whole graph: a change
  outside the size's footprint was made by segment k (the copies were clean at the previous break), and the
  finding names that segment; then copies the same memory again, with the step's own static input rows, for
  the op;
- with scrub, fills the op's out= boundary buffer with the poison pattern (below) before the op, and after it
  counts the elements of the step's own rows that still hold it: an op that left out= unwritten (it computed
  into fresh memory and returned None, or returned the fresh tensor, which a replay discards; vllm #37363,
  #53915) is named with its size and buffer, instead of as a wrong output far downstream;
- with guard, after the op, names the first byte it changed outside out= (out's whole span, for a strided out=),
  its owner, and out= where the write starts within the allocator's 512-byte rounding past its end;
- returns what the op returned.

After the step validate checks the copies once more, for the last segment. Free pool memory is scrubbed once a
step, before segment 0, not between segments: the size's own intermediates are free pool memory between steps,
and those that cross a break (written by segment k, read by segment k + 1) must survive it. Memory the size
never allocated keeps the scrub pattern through the step unless something writes it, which guard names.

The elements an op must write: the step's own rows where out='s dim 0 has the size's padded token or request
count (the fewer of the two where it has both: padding rows are no request's, and an op may leave them), all of
out otherwise. A break whose out= shares a storage with another of its tensor arguments (an in-place op, called
as op(x, out=x)) reads out=, so it is not poisoned. The pattern is a NaN in every float type of its width and an
unlikely integer, with a payload no arithmetic produces (CUDA's canonical NaNs are 0x7FFFFFFF and 0x7FFF), so
an op whose result holds a NaN is not taken for one that wrote nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from graphrunner.errors import BREAK_OUT_FIX, GraphHazardError
from graphrunner.piecewise import tensors_in
from graphrunner.pool import Block
from graphrunner.pool_view import PoolView
from graphrunner.record import CaptureRecord
from graphrunner.spec import StepInfo

# The poison pattern by element size in bytes, and the integer type its elements are compared as.
POISON = {1: 0x7F, 2: 0x7FAD, 4: 0x7FBADBAD, 8: 0x7FFBADBADBADBADB}
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

ArmedBreak = Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]  # (op, args, kwargs), as the step reads it


class BreakChecks:
    """The checks around the segments and break ops of one validated step at a piecewise size (Note [checked
    breaks]).

    Args:
        record: the runner's capture record.
        view: the pool's owners, scrub and guard.
        size: the size the step runs at.
        batch: the step's requests, for messages.
        scrub: poison each op's out= before it and name an op that leaves it unwritten.
        guard: name a segment that writes outside the size's footprint and an op that writes outside its out=.
        armed: the size's entry of the runner's armed breaks (the list the native step reads), changed in place
            while `checking` runs.
    """

    def __init__(self, record: CaptureRecord, view: PoolView, size: int, batch: int, scrub: bool, guard: bool,
                 armed: List[ArmedBreak]) -> None:
        self.record, self.view, self.size, self.batch = record, view, size, batch
        self.scrub, self.guard, self.armed = scrub, guard, armed
        self.names = [b.name for b in record.entries[size].breaks]
        self.copies: Optional[List[Tuple[Block, torch.Tensor]]] = None

    @contextlib.contextmanager
    def checking(self, copies: Optional[List[Tuple[Block, torch.Tensor]]]) -> Iterator[None]:
        """While the block runs the step, each break runs checked; the recorded ops are back afterwards.

        Args:
            copies: what guard copied before the step (PoolView.guarded), or None without guard.
        """
        recorded = list(self.armed)
        self.copies = copies
        self.armed[:] = [(self._checked(k, op), args, kwargs) for k, (op, args, kwargs) in enumerate(recorded)]
        try:
            yield
        finally:
            self.armed[:] = recorded
            self.copies = None

    def _checked(self, k: int, op: Callable[..., Any]) -> Callable[..., Any]:
        """Break k's op, checked: called as the native step calls an op, with the op's own arguments only (a
        keyword of the op may have any name)."""
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(k, op, args, kwargs)

        return call

    def _call(self, k: int, op: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Break k with the step's arguments (kwargs hold out= and step=), checked."""
        out, step = kwargs["out"], kwargs["step"]
        before = None
        if self.guard:
            self.view.check_guarded(self.copies, self.record, self.size, self.batch, segment=k)
            before = self.view.guarded(self.record, self.size, own_rows=True)
        poisoned = self.scrub and out.element_size() in POISON and not _shares_storage(out, args, kwargs)
        if poisoned:
            _bits(out).fill_(POISON[out.element_size()])
        result = op(*args, **kwargs)
        if poisoned:
            self._check_written(k, out, step, result)
        if before is not None:
            self.view.check_break(before, self.record, self.size, self.batch, k, self.names[k], out)
        return result

    def _check_written(self, k: int, out: torch.Tensor, step: StepInfo, result: Any) -> None:
        """Raises GraphHazardError if elements of the step's rows of out= still hold the poison."""
        rows = _own_rows(out, step)
        left = int((_bits(rows) == POISON[out.element_size()]).sum())
        if not left:
            return
        name = self.names[k]
        if isinstance(result, torch.Tensor) and result.data_ptr() != out.data_ptr():
            why = f"it returned a {tuple(result.shape)} tensor in fresh memory, which a replay discards"
        else:
            why = "it most likely computed its result into fresh memory and returned None"
        raise GraphHazardError(
            f"break op {name} (break {k + 1} of {len(self.names)} of {self.record.label(self.size)}, batch "
            f"{self.batch}) left {left} of the {rows.numel()} elements of the step's rows of its out= boundary buffer "
            f"{tuple(out.shape)} {out.dtype} unwritten: they still hold the pattern validate put there before the "
            "call. The next segment reads out=, so a replay hands it whatever that memory held last (the capture's "
            f"values, another size's intermediates); {why} (vllm #37363, #53915). Fix: {BREAK_OUT_FIX}.",
            size=self.size, buffer=f"out= {tuple(out.shape)} of break op {name}", runner=self.record.name, op=name)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's elements reinterpreted as integers of their width (any layout)."""
    return t.view(_BITS[t.element_size()])


def _own_rows(out: torch.Tensor, step: StepInfo) -> torch.Tensor:
    """The part of out= a break op must write: the step's own rows (Note [checked breaks])."""
    if out.dim() == 0:
        return out
    real = [count for padded, count in ((step.padded_tokens, step.tokens), (step.padded_requests, step.requests))
            if out.shape[0] == padded]
    return out[: min(real)] if real else out


def _shares_storage(out: torch.Tensor, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether a tensor argument other than out= (also inside lists, tuples and dicts) lies in out='s storage."""
    storage = out.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    for _, t in tensors_in(args, {k: v for k, v in kwargs.items() if k not in ("out", "step")}):
        s = t.untyped_storage()
        if s.data_ptr() < hi and lo < s.data_ptr() + s.nbytes():
            return True
    return False
