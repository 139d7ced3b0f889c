"""`GraphRunner`: one step function captured at many batch sizes, largest first, into one pool."""
from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from graphrunner import distributed
from graphrunner._native import _C, GraphStateError
from graphrunner.graph import Graph, PoolLike, pool_id, require_cuda, side_stream
from graphrunner.memory import alias
from graphrunner.outputs import clone_tensors, map_tensors
from graphrunner.report import CaptureReport, SizeReport
from graphrunner.schedule import capture_order, checked_capture_sizes

logger = logging.getLogger("graphrunner")


@dataclass(frozen=True)
class StaticInput:
    """One input of the step: its per-row shape, dtype, and the value padding rows get.

    `low`/`high` bound the random values `validate()` draws for it (integers in [low, high), floats
    uniform in [low, high); floats are standard normal when `high` is None).
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    pad: Union[int, float, bool] = 0
    low: float = 0
    high: Optional[float] = None

    def pad_bytes(self) -> bytes:
        return bytes(torch.tensor([self.pad], dtype=self.dtype).view(torch.uint8).tolist())


class _Unusable:
    """Stands in for the native step runner before capture and after close: every call says why."""

    def __init__(self, message: str) -> None:
        self.message = message

    def size_for(self, batch: int) -> int:
        raise GraphStateError(self.message)


_NOT_CAPTURED = _Unusable("GraphRunner.capture() has not run yet; call runner.capture() before the first step")
_CLOSED = _Unusable("this GraphRunner is closed; build a new one (and capture it) to run more steps")


class GraphRunner(_C.StepCall):
    """Runs `fn(**inputs)` through CUDA graphs captured at several batch sizes.

    `runner(**inputs)` pads the batch to the smallest captured size that holds it, stages the inputs and
    launches the graph in one native call: the base class, `_C.StepCall`, takes the call in C++ with no
    Python frame (Python runs only for `before_replay`, `clone_outputs` and eager steps). Returned outputs
    are views into the graph's output memory, valid until the next call (pass `clone_outputs=True` for
    copies). `before_replay` and `clone_outputs` are fixed at construction.
    In a torch.distributed run every rank builds its own runner with the same sizes; `capture()` then
    stops on every rank if one fails, and waits at most `collective_timeout_s` for a silent rank.
    See README.md for the whole contract.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: Dict[str, StaticInput],
        max_batch_size: int,
        capture_sizes: Optional[Sequence[int]] = None,
        pool: PoolLike = None,
        warmup: int = 1,
        fallback: str = "eager",
        on_capture: Optional[Callable[[int], None]] = None,
        before_replay: Optional[Callable[[int, int], None]] = None,
        clone_outputs: bool = False,
        no_grad: bool = True,
        device: Optional[Union[int, str, torch.device]] = None,
        capture_error_mode: str = "global",
        strict: bool = False,
        debug: bool = False,
        collective_timeout_s: float = 300.0,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(inputs, dict) or not inputs:
            raise TypeError("inputs must be a non-empty dict of name -> gr.StaticInput")
        for name, spec in inputs.items():
            if not isinstance(spec, StaticInput):
                raise TypeError(f"inputs[{name!r}] must be a gr.StaticInput, got {type(spec).__name__}")
        if fallback not in ("eager", "error"):
            raise ValueError(f"fallback must be 'eager' or 'error', got {fallback!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.capture_sizes: List[int] = checked_capture_sizes(capture_sizes, max_batch_size)
        self.capture_order: List[int] = capture_order(self.capture_sizes)
        self.fn, self.inputs, self.max_batch_size = fn, dict(inputs), max_batch_size
        self.warmup, self.fallback, self.no_grad = warmup, fallback, no_grad
        self.on_capture, self.before_replay, self.clone_outputs = on_capture, before_replay, clone_outputs
        self.capture_error_mode, self.strict, self.debug = capture_error_mode, strict, debug
        self.collective_timeout_s = collective_timeout_s
        self.device = torch.device("cuda", _device_index(device))
        self._pool_arg = pool
        specs = [(n, list(s.shape), s.dtype, s.pad_bytes()) for n, s in self.inputs.items()]
        self._inputs = _C.StepInputs(specs, max_batch_size, fallback == "eager", self.device.index)
        self._step: Any = _NOT_CAPTURED
        self._forget_capture()

    # -- capture ---------------------------------------------------------------------------------
    def capture(self) -> CaptureReport:
        """Warms up, then captures every size largest first into one pool. Returns a per-size report."""
        if self._step is _CLOSED:
            raise GraphStateError(_CLOSED.message)
        if self.graphs:
            raise GraphStateError("capture() already ran for this runner; close() it and build a new one "
                                  "to capture again")
        require_cuda()
        try:
            with torch.cuda.device(self.device), torch.set_grad_enabled(not self.no_grad):
                return self._capture_all()
        except BaseException:
            self._release()
            raise

    def _capture_all(self) -> CaptureReport:
        self.static_inputs = {n: torch.full((self.max_batch_size, *s.shape), s.pad, dtype=s.dtype,
                                            device=self.device) for n, s in self.inputs.items()}
        step = _C.StepRunner(self._inputs, list(self.static_inputs.values()), self.capture_sizes)
        self.pool = pool_id(self._pool_arg) if self._pool_arg is not None else torch.cuda.graph_pool_handle()
        self._stream = side_stream(self.device)
        # In a distributed run every rank captures the same sizes in the same order, and each stage ends
        # with every rank's outcome, so one rank's failure stops all of them (graphrunner/distributed.py).
        report = self._capture_sizes(step, distributed.agreement(self.collective_timeout_s))
        self._outputs_for_batch = [None] + [self._sliced_outputs(b, step.size_for(b))
                                            for b in range(1, self.max_batch_size + 1)]
        self._step = step
        self._arm(step, self._outputs_for_batch, self.before_replay, clone_tensors if self.clone_outputs else None)
        if distributed.is_rank_zero():
            logger.info("graphrunner: %s", report.summary())
        return report

    def _capture_sizes(self, step: Any, ranks: distributed.Agreement) -> CaptureReport:
        from graphrunner import hazards

        ranks.same_everywhere("capture_order", self.capture_order)
        report = CaptureReport(rank=ranks.rank)
        with ranks.stage("warm-up"):
            report.warmup_ms = self._warm_up()
        guard = hazards.CaptureGuard(self, strict=self.strict, debug=self.debug)
        show = sys.stderr.isatty() and distributed.is_rank_zero()
        # No garbage collection while capturing: a collection frees unrelated tensors mid-capture, which
        # both reorders the pool and hides what a capture kept alive from the guard. No collection
        # beforehand: the guard does not need one, and a full collection costs capture time.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            for size in tqdm(self.capture_order, desc="capturing", unit="size", disable=not show):
                with ranks.stage(f"capture of size {size}"), guard.watch(size):
                    report.sizes.append(self._capture_one(step, size))
        finally:
            if gc_enabled:
                gc.enable()
        report.ranks = ranks.exchange("capture reports", value=report) if ranks.world > 1 else []
        return report

    def _warm_up(self) -> float:
        """Runs fn at the largest size outside any capture, so lazily made workspaces, handles and compiled
        kernels exist, full-sized and outside the pool, before the first capture."""
        start = time.perf_counter()
        largest = self.capture_order[0]
        with torch.cuda.stream(self._stream):
            for _ in range(self.warmup):
                self.fn(**self._static_views(largest))
        self._stream.synchronize()
        torch.cuda.synchronize(self.device)  # in a distributed run, the warm-up stage's exchange is the barrier
        return (time.perf_counter() - start) * 1000

    def _capture_one(self, step: Any, size: int) -> SizeReport:
        if self.on_capture is not None:
            self.on_capture(size)
        reserved = torch.cuda.memory_reserved(self.device)
        graph = Graph()
        start = time.perf_counter()
        with graph.capture(pool=self.pool, stream=self._stream, capture_error_mode=self.capture_error_mode):
            step.stage(size)
            out = self.fn(**self._static_views(size))
            map_tensors(out, lambda name, t: _check_output(name, t, size))
        elapsed_ms = (time.perf_counter() - start) * 1000
        step.add_graph(size, graph)
        # Keep aliases, not the outputs: their blocks go back to the pool for the next, smaller capture.
        self.graphs[size], self.outputs[size] = graph, map_tensors(out, lambda _, t: alias(t))
        del out
        return SizeReport(size, elapsed_ms, torch.cuda.memory_reserved(self.device) - reserved, graph.num_nodes)

    def _static_views(self, size: int) -> Dict[str, torch.Tensor]:
        return {n: buf[:size] for n, buf in self.static_inputs.items()}

    def _sliced_outputs(self, batch: int, size: int) -> Any:
        return map_tensors(self.outputs[size], lambda _, t: t[:batch]) if size else None

    # -- steps -----------------------------------------------------------------------------------
    def _call_unarmed(self, **inputs: torch.Tensor) -> Any:
        """A step before capture() or after close(): the native path is not armed, so say why."""
        raise GraphStateError(self._step.message)

    def _run_eager(self, inputs: Dict[str, torch.Tensor]) -> Any:
        with torch.set_grad_enabled(not self.no_grad):
            return self.fn(**inputs)

    def size_for(self, batch: int) -> int:
        """The captured size a batch runs at; 0 when it runs eagerly."""
        return self._step.size_for(batch)

    def validate(self, steps_per_size: int = 2, scrub: bool = False, guard: bool = False, isolate: bool = False,
                 seed: int = 0, rtol: Optional[float] = None,
                 make_inputs: Optional[Callable[[int, torch.Generator], Dict[str, torch.Tensor]]] = None,
                 ) -> "hazards.ValidationReport":
        """Replays every size in random interleaved order on fresh random inputs against eager.

        scrub: fill the pool's free memory (and other sizes' kept-alive capture allocations) with a NaN /
        INT_MAX pattern before each replay; guard: fail on any write into memory another size owns, or
        into static input rows past the padded size. Raises GraphHazardError naming size and buffer.
        make_inputs(batch, generator): one step's inputs, where inputs depend on each other (distinct
        pages per row, say); by default each input is drawn alone from its StaticInput's range.
        """
        from graphrunner import hazards

        return hazards.validate(self, steps_per_size=steps_per_size, scrub=scrub, guard=guard, isolate=isolate,
                                seed=seed, rtol=rtol, make_inputs=make_inputs)

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroys the graphs and gives their pool memory back (once no returned output is alive)."""
        self._release()
        self._step = _CLOSED
        if torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _release(self) -> None:
        graphs = list(self.graphs.values())
        self._disarm()
        self._step = _NOT_CAPTURED
        self._forget_capture()
        for graph in graphs:
            graph.reset()

    def _forget_capture(self) -> None:
        self.graphs: Dict[int, Graph] = {}
        self.outputs: Dict[int, Any] = {}
        self.static_inputs: Dict[str, torch.Tensor] = {}
        self._outputs_for_batch: List[Any] = []

    def __enter__(self) -> "GraphRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_output(name: str, t: torch.Tensor, size: int) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != size:
        raise ValueError(f"{name} has shape {tuple(t.shape)} when captured at batch size {size}; every output "
                         "needs the batch in dim 0")
    return t


def _device_index(device: Optional[Union[int, str, torch.device]]) -> int:
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    return device.index if device.index is not None else (torch.cuda.current_device()
                                                          if torch.cuda.is_available() else 0)
