"""Every exception and warning graphrunner raises, and the fixes its hazard messages suggest.

CudaError (a CUDA call failed, naming the call and the error) and GraphStateError (a Graph or runner used in a
state that does not allow it) are raised by the native core, graphrunner._C, and re-exported here.
"""
from __future__ import annotations

from typing import Tuple

from graphrunner._native import CudaError, GraphStateError

__all__ = ["BORROW_FIX", "BREAK_OUT_FIX", "BREAK_WRITE_FIX", "STATE_FIX", "WRITE_FIX", "CaptureGuardWarning",
           "CudaError", "DistributedCaptureError", "GraphHazardError", "GraphStateError", "WorkspaceError"]

# The fixes hazard messages suggest, shared by the capture guard, validation and the audit.
WRITE_FIX = ("an op writes past a buffer it allocated, typically per-batch metadata (page table, KV indices, "
             "top-k rows) sized for fewer rows than its kernel writes: size it for the padded batch, or allocate "
             "it once with gr.workspace()")
STATE_FIX = ("a kernel reads state it expects to persist between replays (a counter reset on exit, a table "
             "computed once) from memory allocated inside the capture, which other sizes reuse: keep such state "
             "in gr.workspace(name, nbytes, zero=..., init=...), made before capture")
BORROW_FIX = ("declare memory that outlives the runner (GraphRunner(keep=[tensor or module, ...]), or make fn an "
              "nn.Module that owns it as a parameter or buffer, or allocate it with gr.workspace()), so that "
              "nothing else in the process frees it while the graph uses it")
BREAK_OUT_FIX = ("write the result into out= on every path of the op, the replay's (step set) too: out.copy_(result) "
                 "or the kernel's own out= argument, then return out or None")
BREAK_WRITE_FIX = ("a break op writes into its out= boundary buffer and nowhere else in the pool: allocate out= for "
                   "every row its kernel writes (rows rounded up to a tile, a second output next to the first), or "
                   "size what the kernel writes to out's shape")


class GraphHazardError(RuntimeError):
    """A captured graph is unsafe in the shared pool; the message names the size, the buffer and a fix.

    Attributes:
        size: the captured size at fault, where one is known.
        buffer: the buffer at fault (an output's name, a block's label), where one is known.
        offset: the byte offset of the first bad byte in that buffer, where one is known.
        runner: the name of the runner whose graph is at fault, where one is known.
        owner: the graph whose memory was written, as (runner name, size), where it belongs to one; size 0 for
            memory every size of that runner uses (its static inputs, its state buffers).
        overrun: for a write out of bounds, the writer's own buffer that ends where the write starts (the one
            its kernel most likely overran), where there is one.
        op: the break op at fault (a piecewise size's eager op between two segments), where one is.
    """

    def __init__(self, message: str, size: "int | None" = None, buffer: "str | None" = None,
                 offset: "int | None" = None, runner: "str | None" = None,
                 owner: "Tuple[str, int] | None" = None, overrun: "str | None" = None,
                 op: "str | None" = None) -> None:
        super().__init__(message)
        self.size, self.buffer, self.offset, self.runner, self.owner = size, buffer, offset, runner, owner
        self.overrun, self.op = overrun, op


class CaptureGuardWarning(UserWarning):
    """A capture left an allocation alive in the shared pool (GraphRunner(strict=True) raises instead)."""


class WorkspaceError(RuntimeError):
    """A workspace was first requested inside a capture, or with a size its first request did not cover."""


class DistributedCaptureError(RuntimeError):
    """A phase of capture() or a step of validate() failed on some rank; raised on every rank, naming the
    ranks and their errors (the failing rank's own error is the `__cause__` there)."""


class OverBudget(Exception):
    """A capture kept within a budget measured over it; its graphs were destroyed (capture_within retries)."""

    def __init__(self, measured: int, budget: int) -> None:
        super().__init__(f"the capture took {measured} bytes, over its budget of {budget}")
        self.measured, self.budget = measured, budget
