"""Piecewise capture: graphs around ops that cannot be captured.

Some ops cannot live in a graph: varlen attention whose kernel needs host-side lengths, routing that syncs
with the host, kernels that plan per call. Mark such an op with `gr.breaking_op`; the model calls it as usual.
Outside a capture the op just runs. While graphrunner captures a size, calling it ends the current segment
(one graph), runs the op once, records the call (the op, its tensors at the addresses the graphs use, its
boundary buffer `out=`) and starts the next segment, into the same pool. A step at that size then runs, in
one native call, segment 0 (staging included), break 1, segment 1, ... (csrc/py_step.cpp, Note [breaks]).

The contract of a break op: it writes its result into the tensor passed as `out=` (the boundary buffer the
next segment reads, allocated by the model before the call, so it lives in the graph pool) and returns it or
None; it takes a keyword `step`: the step's gr.StepInfo while a runner replays it (with the step's inputs,
a ragged runner's split still on the host), None when it runs eagerly. An op that returns fresh memory is
refused at capture: the next segment would read the boundary buffer, which nothing wrote (vllm #37363).
"""
from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from graphrunner.graph import Graph, PoolId
from graphrunner.memory import alias

_active = threading.local()  # .segments: the Segments capture this thread is in, if any


@dataclass(frozen=True)
class Break:
    """One recorded break: what a replay calls between two segments.

    Attributes:
        op: the break op's function (unwrapped).
        name: how messages name it.
        args: its positional arguments as captured (tensors at the addresses the graphs use).
        kwargs: its keyword arguments as captured, `out` among them (`step` is set per step).
    """

    op: Callable[..., Any]
    name: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


class BreakOp:
    """An op a captured graph breaks around (see the module's docstring). Made by `gr.breaking_op`.

    Args:
        fn: the op: fn(*args, out=tensor, step=StepInfo or None, **kwargs) writes its result into out.
        name: how messages name it; default fn's qualified name.
    """

    def __init__(self, fn: Callable[..., Any], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise TypeError(f"breaking_op() takes a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "step" in kwargs:
            raise TypeError(f"break op {self.name} was called with step=...; graphrunner passes step itself (the "
                            "StepInfo while replaying, None eagerly)")
        segments: Optional[Segments] = getattr(_active, "segments", None)
        if segments is None:
            return self.fn(*args, step=None, **kwargs)
        return segments.break_here(self, args, kwargs)


def breaking_op(fn: Optional[Callable[..., Any]] = None, *, name: Optional[str] = None) -> Any:
    """Marks an op that cannot be captured: graphs of every runner break around each call of it.

    Use as `@gr.breaking_op` or `gr.breaking_op(fn, name="varlen_attention")`.

    Args:
        fn: the op: fn(*args, out=tensor, step=StepInfo or None, **kwargs) writes its result into out (see the
            module graphrunner.piecewise for the contract).
        name: how messages and reports name it; default fn's qualified name.
    """
    if fn is None:
        return functools.partial(breaking_op, name=name)
    return BreakOp(fn, name)


@dataclass
class Segments:
    """The capture of one size as segments, a new graph after each break (graphrunner.capture uses it for
    every size: a size whose fn calls no break op is one segment, a plain graph).

    Args:
        pool: the pool every segment allocates from.
        stream: the capture stream (current while the block runs).
        capture_error_mode: CUDA's stream capture mode.
        long_lived: storages (data_ptr -> bytes) a break's tensors may live in besides this capture's own
            allocations: static input buffers, the caller's declared tensors.
        label: how messages name the size ("size 8 of runner 'mixed'").
        shared: with share_segments, the graph that instantiated each segment structure's executable, by
            `Graph.structure()`, over the runner's sizes captured so far (filled in here): a segment after the first
            of its size shares the executable of its structure where the driver accepts it, and instantiates its
            own otherwise (Note [shared executables] in csrc/graph.cpp). None: every segment instantiates its own.
    """

    pool: PoolId
    stream: torch.cuda.Stream
    capture_error_mode: str
    long_lived: Dict[int, int]
    label: str
    shared: Optional[Dict[bytes, Graph]] = None
    graphs: List[Graph] = field(default_factory=list)
    breaks: List[Break] = field(default_factory=list)

    def __enter__(self) -> "Segments":
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        self._stream_ctx = torch.cuda.stream(self.stream)
        self._stream_ctx.__enter__()
        try:
            self._begin()
        except BaseException:  # __exit__ does not run for an __enter__ that raises: leave the stream as it was
            self._stream_ctx.__exit__(*sys.exc_info())
            raise
        _active.segments = self
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        _active.segments = None
        try:
            if kind is None:
                self._end()
            elif self.graphs and self.graphs[-1].capturing:
                self.graphs[-1].abort_capture()
        finally:
            self._stream_ctx.__exit__(kind, exc, tb)
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def _begin(self) -> None:
        graph = Graph(keep_graph=True)  # the audit reads its nodes (and a shared executable loads it)
        graph.capture_begin(self.pool, self.capture_error_mode)
        self.graphs.append(graph)

    def _end(self) -> None:
        """Ends the current segment's capture and gives it an executable: its own, or, sharing, the one of its
        structure's first segment. Segment 0 never shares: the launcher sets its staging node's argument on its
        executable every step."""
        graph = self.graphs[-1]
        if self.shared is None or len(self.graphs) == 1:
            graph.capture_end()
            return
        graph.capture_end(instantiate=False)  # a shared segment is never instantiated at all
        structure = graph.structure()
        owner = self.shared.get(structure)
        if owner is None or not graph.share(owner):
            graph.instantiate()
            self.shared.setdefault(structure, graph)

    def break_here(self, op: BreakOp, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Ends the current segment at a call of `op`, runs it once, records it and begins the next segment."""
        out = kwargs.get("out")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"break op {op.name} was called without out=: a break op writes its result into a "
                            "boundary buffer the next segment reads; allocate it before the call (out=torch.empty"
                            "(...)) and pass it as out=")
        self._end()
        produced = _allocated(self.graphs)
        for where, t in tensors_in(args, kwargs):
            if not (_inside(t, produced) or _inside(t, self.long_lived)):
                raise ValueError(
                    f"break op {op.name} at {self.label} got {where}, a tensor of {tuple(t.shape)} at "
                    f"0x{t.data_ptr():x} that neither this capture made nor the runner holds (a static input, "
                    "fn's parameters and buffers, keep=): a replay would call the op on whatever is there then. "
                    "Pass tensors the segment before the break computed, or declare long-lived ones with keep=")
        # Note [ops at capture]: the op runs once now, for its result's check, on what the segment before it
        # computes: that segment is replayed first (it was only recorded), so the op reads real data (its static
        # inputs as capture left them), never uninitialised pool memory. It gets step=None, as it does eagerly:
        # there is no step's host metadata at capture, and outside a graph it may read what it needs from the device.
        self.graphs[-1].replay()
        result = run_at_capture(op, self.label, args, kwargs)
        if result is not None and not (isinstance(result, torch.Tensor) and result.data_ptr() == out.data_ptr()
                                       and result.shape == out.shape):
            shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(
                f"break op {op.name} at {self.label} returned {shape} in fresh memory instead of writing its out= "
                f"buffer {tuple(out.shape)}: the next segment reads the out= buffer, which nothing would write on "
                "replay. Write the result into out (out.copy_(result), or the kernel's own out= argument) and "
                "return out or None")
        # Aliases, not the tensors: a recorded break must not keep this capture's blocks allocated, or the next,
        # smaller capture could not reuse them (the memory stays the pool's, as the graphs' own does).
        self.breaks.append(Break(op.fn, op.name, tuple(_aliased(a) for a in args),
                                 {k: _aliased(v) for k, v in kwargs.items()}))
        self._begin()
        return out


def run_at_capture(op: BreakOp, label: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """Runs a break op once as capture does (Note [ops at capture]), with step=None; returns its result. An op
    that raises is re-raised with what capture knows: the op, the size, the out= buffer's and the arguments'
    shapes, and the usual fix; the same exception type where it can be made from a message (else RuntimeError),
    the op's own exception chained as its cause.

    Args:
        op: the break op.
        label: how messages name the size ("size 8 of runner 'mixed'").
        args: its positional arguments.
        kwargs: its keyword arguments, out= among them.
    """
    try:
        return op.fn(*args, step=None, **kwargs)
    except Exception as exc:
        out = kwargs.get("out")
        tensors = ", ".join(f"{where} {tuple(t.shape)} {t.dtype}" for where, t in tensors_in(args, kwargs)
                            if t is not out) or "no tensors"
        shown = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        message = (f"break op {op.name} at {label} raised when capture ran it once (on what the segment before it "
                   f"computed, step=None), with out= {shown} and {tensors}: {type(exc).__name__}: {exc}. Where the "
                   "op writes another shape than out='s (a boundary buffer of the wrong shape), allocate out= with "
                   "the shape the op writes; otherwise the op fails on these arguments outside capture too: call fn "
                   "once eagerly at this size to see it")
        try:
            wrapped: Exception = type(exc)(message)
        except Exception:  # a type that is not made from one message
            wrapped = RuntimeError(message)
        raise wrapped from exc


def _aliased(value: Any) -> Any:
    """`value` with every tensor in it (also inside lists, tuples and dicts) replaced by a non-owning alias."""
    if isinstance(value, torch.Tensor):
        return alias(value)
    if isinstance(value, list):
        return [_aliased(v) for v in value]
    if isinstance(value, tuple):  # a namedtuple's constructor takes its fields one by one
        items = [_aliased(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: _aliased(v) for k, v in value.items()}
    return value


def tensors_in(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Tuple[str, torch.Tensor]]:
    """Every tensor among a call's arguments, also inside lists, tuples and dicts (not inside other objects: pass
    a break op its tensors as arguments, so they are checked and recorded as aliases), named for messages
    ("argument 0", "argument out=", "argument 1[2]"), in argument order.

    Args:
        args: the call's positional arguments.
        kwargs: its keyword arguments.
    """
    # A work list, not a recursive closure: a nested function that calls itself is a reference cycle (it holds
    # its own cell), which would keep the list it fills, and so the op's tensors, allocated in the pool until the
    # garbage collector runs: no later segment or size could reuse their blocks.
    found: List[Tuple[str, torch.Tensor]] = []
    todo: List[Tuple[str, Any]] = [(f"argument {i}", a) for i, a in enumerate(args)]
    todo += [(f"argument {k}=", v) for k, v in kwargs.items()]
    todo.reverse()
    while todo:
        where, value = todo.pop()
        if isinstance(value, torch.Tensor):
            found.append((where, value))
        elif isinstance(value, (list, tuple)):
            todo += reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)])
        elif isinstance(value, dict):
            todo += reversed([(f"{where}[{k!r}]", v) for k, v in value.items()])
    return found


def _allocated(graphs: Sequence[Graph]) -> Dict[int, int]:
    """What the segments captured so far allocated in the pool: address -> bytes."""
    return {address: nbytes for g in graphs for address, nbytes in g.footprint}


def _inside(t: torch.Tensor, ranges: Dict[int, int]) -> bool:
    start = t.untyped_storage().data_ptr()
    return any(a <= start < a + n for a, n in ranges.items())
