"""`GraphRunner`: one step function captured at many batch sizes, largest first, into one pool; and
`capture_all`, which captures several runners of one pool together."""
from __future__ import annotations

import enum
import functools
import gc
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from tqdm import tqdm

from graphrunner import distributed
from graphrunner._native import _C, GraphStateError
from graphrunner.audit import AuditReport, audit
from graphrunner.capture_guard import CaptureGuard
from graphrunner.graph import Graph, PoolLike, capture_stream, pool_id, require_cuda
from graphrunner.inputs import StaticInput
from graphrunner.isolate import validate_in_child
from graphrunner.memory import alias
from graphrunner.outputs import clone_tensors, map_tensors
from graphrunner.record import CaptureRecord, CaptureReport, SizeEntry
from graphrunner.spec import DEFAULT_MAX_LEAD, RunnerSpec, StepInfo, checked_spec
from graphrunner.validate import MakeInputs, Target, ValidationReport, validate
from graphrunner.workspace import workspace_tensors

logger = logging.getLogger("graphrunner")


class RunnerState(enum.Enum):
    """Where a GraphRunner is in its life."""

    UNARMED = "unarmed"  # built (or a capture failed): steps raise until capture() succeeds
    ARMED = "armed"      # captured: every step runs natively
    CLOSED = "closed"    # graphs destroyed: steps, capture() and validate() raise


_REFUSALS = {
    RunnerState.UNARMED: "GraphRunner.capture() has not run yet; call runner.capture() before the first step",
    RunnerState.CLOSED: "this GraphRunner is closed; build a new one (and capture it) to run more steps",
}


class GraphRunner(_C.StepCall):
    """Runs `fn(**inputs)` through CUDA graphs captured at several batch sizes.

    `runner(**inputs)` pads the batch to the smallest captured size that holds it, stages the inputs and
    launches that size's graph in one native call (the base class, `_C.StepCall`, takes the call in C++ with
    no Python frame). It returns views into the graph's output memory, valid until the next step of any
    runner in the pool (pass `clone_outputs=True` for copies, or `out=` buffers the graph writes into).

    Sizes and batches count requests. With `tokens_per_request=K` (a verify step: K tokens per request),
    inputs declared `per_token=True` have K rows per request, and outputs with K rows per request are sliced
    to `batch * K` rows.

    Args:
        fn: the step function (or nn.Module), called as fn(**inputs) with one tensor per input, each with the
            batch in dim 0. It returns a tensor, or a tuple, list or dict of tensors, each with the batch (or
            batch * tokens_per_request) in dim 0, or 0-d (a count, a flag). It must not mix rows: padding rows
            must not change real rows.
        inputs: name -> gr.StaticInput: each input's per-row shape, dtype and pad value.
        max_batch_size: the largest batch a step may have (1..8192). Default: the largest of capture_sizes.
        capture_sizes: the batch sizes to capture; default gr.default_capture_sizes(max_batch_size).
        pool: the allocator pool to capture into: a pool id (torch.cuda.graph_pool_handle()), a
            torch.cuda.MemPool or a gr.Graph; None makes a new one. Runners of one pool capture together
            with gr.capture_all() and must never replay concurrently on different streams.
        warmup: eager runs of fn at the largest size before the first capture (lazy workspaces, handles and
            compiled kernels are made then, outside the pool).
        fallback: "eager" runs batches above max_batch_size eagerly; "error" raises ValueError for them.
        on_capture: on_capture(info), called before each size is captured, with a gr.StepInfo: the size's
            request and token counts and its static input views (a backend builds its per-size state here).
        before_replay: before_replay(info), called before each step, after its inputs are checked, with a
            gr.StepInfo: raw and padded request and token counts, the static views of the size it runs at
            (padded_requests 0 for a step that runs eagerly), and the step's inputs.
        clone_outputs: return copies instead of views into graph memory.
        no_grad: run fn (captured and eager) with autograd off.
        device: the GPU (an index, "cuda:N" or a torch.device); default the current device.
        capture_error_mode: CUDA's stream capture mode: "global", "thread_local" or "relaxed".
        strict: raise GraphHazardError (instead of warning) when a capture leaves an allocation alive in
            the pool.
        debug: record the Python stack of each allocation made while capturing, for the capture guard's
            messages.
        collective_timeout_s: in a torch.distributed run, how long capture() and validate() wait for a
            silent rank before raising on every rank.
        keep: tensors and modules the graphs use that the runner should treat (and keep alive) as
            long-lived: the audit does not report them as borrowed.
        name: the runner's name in reports and hazard messages (useful with several runners in a pool).
        tokens_per_request: rows per request of per-token inputs and outputs (1..1024); steps must have
            exactly this many per request.
        out: buffers the graphs write their outputs into, allocated by the caller outside the pool, so
            results survive the next replay of any runner without a copy: a tensor when fn returns one, or
            a dict of output key -> tensor when fn returns a dict. Each holds at least the largest size's
            rows. The runner keeps them alive.
        capture_inputs: capture_inputs(size) -> a dict of some inputs' values for `size` requests, staged
            before the warm-up and before each size's capture, so fn and on_capture see realistic metadata
            (sequence lengths, say) rather than pad values.
        max_lead: the most steps of this runner the host queues behind the one the GPU is running (1..1024): a
            step waits, in C++ without the GIL, until the step max_lead back has begun. None: no bound. A loop
            that never waits would otherwise fill CUDA's launch queue, and with a deep queue each graph took
            longer on the GPU (docs/design.md). Loops that read each step's result, or run a step or two
            ahead, never wait here.
        verbose: print the capture report and show a progress bar; default from the GRAPHRUNNER_VERBOSE
            environment variable ("1" turns it on). The report is always logged to the "graphrunner"
            logger at INFO.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: Dict[str, StaticInput],
        max_batch_size: Optional[int] = None,
        capture_sizes: Optional[Sequence[int]] = None,
        *,
        pool: PoolLike = None,
        warmup: int = 1,
        fallback: str = "eager",
        on_capture: Optional[Callable[[StepInfo], None]] = None,
        before_replay: Optional[Callable[[StepInfo], None]] = None,
        clone_outputs: bool = False,
        no_grad: bool = True,
        device: Optional[Union[int, str, torch.device]] = None,
        capture_error_mode: str = "global",
        strict: bool = False,
        debug: bool = False,
        collective_timeout_s: float = 300.0,
        keep: Sequence[Union[torch.Tensor, torch.nn.Module]] = (),
        name: Optional[str] = None,
        verbose: Optional[bool] = None,
        tokens_per_request: int = 1,
        out: Union[None, torch.Tensor, Dict[str, torch.Tensor]] = None,
        capture_inputs: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None,
        max_lead: Optional[int] = DEFAULT_MAX_LEAD,
    ) -> None:
        if verbose is None:
            verbose = os.environ.get("GRAPHRUNNER_VERBOSE", "") not in ("", "0")
        spec = checked_spec(fn, inputs, max_batch_size, capture_sizes, pool=pool, warmup=warmup, fallback=fallback,
                            on_capture=on_capture, before_replay=before_replay, clone_outputs=clone_outputs,
                            no_grad=no_grad, device=device, capture_error_mode=capture_error_mode, strict=strict,
                            debug=debug, collective_timeout_s=collective_timeout_s, keep=keep, name=name,
                            verbose=verbose, tokens_per_request=tokens_per_request, out=out,
                            capture_inputs=capture_inputs, max_lead=max_lead)
        self._setup(spec)

    @classmethod
    def from_spec(cls, spec: RunnerSpec) -> "GraphRunner":
        """A runner built from a checked spec (as the isolated validation child builds its own).

        Args:
            spec: what `runner.spec` holds.
        """
        runner = cls.__new__(cls)
        runner._setup(spec)
        return runner

    def _setup(self, spec: RunnerSpec) -> None:
        self.spec = spec
        self.state = RunnerState.UNARMED
        self.record: Optional[CaptureRecord] = None
        self.sizes = _C.SizeTable(list(spec.capture_sizes), spec.max_batch_size)
        self._checker = _C.InputChecker(spec.checker_specs(), spec.max_batch_size, spec.fallback == "eager",
                                        spec.device)
        self._disarm(functools.partial(_refuse, _REFUSALS[RunnerState.UNARMED]))

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.spec.device)

    @property
    def capture_sizes(self) -> List[int]:
        """The captured sizes, ascending."""
        return list(self.spec.capture_sizes)

    @property
    def capture_order(self) -> List[int]:
        """The order sizes are captured in: largest first."""
        return self.spec.capture_order

    def size_for(self, batch: int) -> int:
        """The captured size a batch runs at; 0 when it runs eagerly.

        Args:
            batch: the step's batch size.
        """
        return self.sizes.size_for(batch)

    # -- capture ---------------------------------------------------------------------------------
    def capture(self) -> CaptureReport:
        """Warms up, then captures every size largest first into the pool. Returns the per-size report."""
        return capture_all(self)[0]

    def _begin_capture(self, pool: Any, stream: torch.cuda.Stream) -> CaptureRecord:
        """Makes the static buffers and the launcher, and warms fn up at the largest size outside the pool."""
        spec = self.spec
        rows = spec.rows_per_request
        static = {n: torch.full((spec.max_batch_size * rows[n], *s.shape), s.pad, dtype=s.dtype, device=self.device)
                  for n, s in spec.inputs.items()}
        record = CaptureRecord(spec.name, self.device, pool, static, rows,
                               _C.Launcher(self._checker, list(static.values()), self.sizes, spec.max_lead or 0),
                               state_buffers=spec.state_buffers())
        self._stage_capture_inputs(record, spec.max_batch_size)
        # The buffers were filled on the current stream; the warm-up runs on the capture stream, which must not
        # read them before the fill (recycled memory holds anything until then: an out-of-range index, say).
        stream.wait_stream(torch.cuda.current_stream(self.device))
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(spec.warmup):
                spec.fn(**record.static_views(spec.max_batch_size))
        stream.synchronize()
        record.warmup_ms = (time.perf_counter() - start) * 1000
        return record

    def _capture_size(self, record: CaptureRecord, size: int, stream: torch.cuda.Stream, guard: CaptureGuard) -> None:
        spec = self.spec
        self._stage_capture_inputs(record, size)
        if spec.on_capture is not None:
            tokens = size * spec.tokens_per_request
            spec.on_capture(StepInfo(size, size, tokens, tokens, record.static_views(size)))
        with guard.watch((spec.name, size), record.label(size)) as kept:
            reserved = torch.cuda.memory_reserved(self.device)
            graph = Graph(keep_graph=True)  # the audit reads its nodes
            start = time.perf_counter()
            with graph.capture(pool=record.pool, stream=stream, capture_error_mode=spec.capture_error_mode):
                record.launcher.stage(size)
                out = spec.fn(**record.static_views(size))
                map_tensors(out, lambda name, t: _check_output(name, t, size, spec.tokens_per_request))
                out = self._write_into_buffers(out)
            elapsed_ms = (time.perf_counter() - start) * 1000
            record.launcher.add_graph(size, graph)
            # Keep aliases, not the outputs: their blocks go back to the pool for the next, smaller capture.
            # (Outputs in the caller's buffers are views of memory the caller owns.)
            buffers = spec.out_buffers()
            outputs = map_tensors(out, lambda name, t: t if name in buffers else alias(t))
            del out
            record.entries[size] = SizeEntry(size, graph, outputs, list(graph.footprint), kept, elapsed_ms,
                                             torch.cuda.memory_reserved(self.device) - reserved)

    def _stage_capture_inputs(self, record: CaptureRecord, size: int) -> None:
        """Copies capture_inputs(size) into the static buffers, for the warm-up and the capture of `size`."""
        if self.spec.capture_inputs is None:
            return
        views = record.static_views(size)
        for name, value in self.spec.capture_inputs(size).items():
            if name not in views:
                raise ValueError(f"capture_inputs({size}) returned {name!r}, which is not an input; inputs are "
                                 f"{sorted(views)}")
            views[name].copy_(value)

    def _write_into_buffers(self, out: Any) -> Any:
        """Inside a capture: copies each output that has a caller's buffer into it; returns the outputs with
        those replaced by views of the buffers."""
        buffers = self.spec.out_buffers()

        def into(name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in buffers:
                return t
            buf = buffers[name]
            rows = t.shape[0] if t.dim() else 1
            if buf.dtype != t.dtype or buf.device != t.device or tuple(buf.shape[1:]) != tuple(t.shape[1:]) or \
                    buf.dim() == 0 or buf.shape[0] < rows:
                raise ValueError(f"out buffer for {name} is {tuple(buf.shape)} {buf.dtype} on {buf.device}; the graph "
                                 f"writes {tuple(t.shape)} {t.dtype} on {t.device} there: allocate it with the "
                                 "largest size's rows, the same trailing shape, dtype and device")
            view = buf[:rows] if t.dim() else buf[0]
            view.copy_(t)
            return view

        return map_tensors(out, into)

    def _finish_capture(self, record: CaptureRecord) -> None:
        """Arms the native step on the record's graphs."""
        spec = self.spec
        outputs = [None] + [self._sliced_outputs(record, b) for b in range(1, spec.max_batch_size + 1)]
        before_replay = None
        if spec.before_replay is not None:
            views = {size: record.static_views(size) for size in spec.capture_sizes}
            before_replay = functools.partial(_before_replay, spec.before_replay, views, spec.tokens_per_request)
        self._arm(record.launcher, outputs, before_replay, clone_tensors if spec.clone_outputs else None,
                  self._eager)
        self.record, self.state = record, RunnerState.ARMED

    def _sliced_outputs(self, record: CaptureRecord, batch: int) -> Any:
        size = self.sizes.size_for(batch)
        if not size:
            return None
        tokens = self.spec.tokens_per_request

        def rows(_: str, t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 0:
                return t
            return t[: batch * tokens] if tokens > 1 and t.shape[0] == size * tokens else t[:batch]

        return map_tensors(record.entries[size].outputs, rows)

    # -- steps -----------------------------------------------------------------------------------
    @property
    def _eager(self) -> Callable[..., Any]:
        """A step no captured graph holds, and validate()'s reference. It does not refer back to the runner, so
        a runner dropped without close() is freed at once, not at the next garbage collection."""
        return functools.partial(_run_eagerly, self.spec.fn, self.spec.no_grad)

    def _require_armed(self, what: str) -> CaptureRecord:
        if self.state is not RunnerState.ARMED:
            raise GraphStateError(f"{what} needs captured graphs: " + _REFUSALS[self.state])
        return self.record

    def audit(self) -> AuditReport:
        """Every address the captured graphs hand the GPU, classified: memory the runner owns or keeps alive,
        memory the caller declared (fn's parameters and buffers when fn is a module, keep=, gr.workspace),
        memory borrowed from other code (the report's findings), and memory outside torch's allocator."""
        return _audit([self])

    def validate(self, steps_per_size: int = 2, scrub: bool = False, guard: bool = False, isolate: bool = False,
                 seed: int = 0, rtol: Optional[float] = None, make_inputs: Optional[MakeInputs] = None,
                 ) -> ValidationReport:
        """Audits the graphs, then replays every size in random interleaved order on fresh random inputs against
        eager. Raises GraphHazardError naming the size and the buffer.

        Args:
            steps_per_size: replays per captured size.
            scrub: fill the pool's free memory (and other sizes' kept-alive capture allocations) with a NaN /
                INT_MAX pattern before each replay, so reads of stale state show.
            guard: fail on any write into memory another size owns, or into static input rows past the padded
                size.
            isolate: run the whole check in a child process built from the same spec, so a graph that
                faults cannot take this process's CUDA context down.
            seed: seeds the order, the batches and the inputs.
            rtol: the relative error accepted for every output; None: by dtype (1e-4 for float32, 3e-2 for
                16-bit floats, exact for integers).
            make_inputs: make_inputs(batch, generator) -> one step's inputs, where inputs depend on each other
                (distinct pages per row, say); by default each input is drawn alone from its StaticInput's range.
        """
        if isolate:
            self._require_armed("validate()")
            return validate_in_child(type(self).from_spec, self.spec.without_pool(), steps_per_size=steps_per_size,
                                     scrub=scrub, guard=guard, seed=seed, rtol=rtol, make_inputs=make_inputs)
        return validate_all(self, steps_per_size=steps_per_size, scrub=scrub, guard=guard, seed=seed, rtol=rtol,
                            make_inputs={self.spec.name: make_inputs} if make_inputs is not None else None)

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroys the graphs and gives their memory back: the pool (once no returned output is alive) and the
        workspaces kept for them (once no other runner captured with them is open)."""
        record, self.record = self.record, None
        self.state = RunnerState.CLOSED
        self._disarm(functools.partial(_refuse, _REFUSALS[RunnerState.CLOSED]))
        if torch.cuda.is_available():
            torch.cuda.synchronize(self.device)  # no replay may still use what is freed below
        if record is not None:
            record.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "GraphRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def capture_all(*runners: GraphRunner) -> List[CaptureReport]:
    """Captures several runners into one pool, every size of every runner largest first, so the pool holds
    about what the largest graph of any runner needs. Returns each runner's report, in argument order.

    Runners of one pool share its memory: they must never replay concurrently on different streams.

    Args:
        runners: runners built with the same pool (or all with pool=None: they get one new pool), on one device.
    """
    if not runners or not all(isinstance(r, GraphRunner) for r in runners):
        raise TypeError("capture_all() takes one or more GraphRunner objects")
    for r in runners:
        if r.state is RunnerState.ARMED:
            raise GraphStateError(f"capture() already ran for runner {r.spec.name or '(unnamed)'}; close() it and "
                                  "build a new one to capture again")
        if r.state is RunnerState.CLOSED:
            raise GraphStateError(_REFUSALS[RunnerState.CLOSED])
    pools = {pool_id(r.spec.pool) for r in runners if r.spec.pool is not None}
    devices = {r.spec.device for r in runners}
    names = [r.spec.name for r in runners]
    if len(pools) > 1 or len(devices) > 1:
        raise ValueError("capture_all() captures runners of one pool on one device; these have pools "
                         f"{sorted(pools)} on devices {sorted(devices)}")
    if len(runners) > 1 and len(set(names)) != len(names):
        raise ValueError(f"runners captured together need distinct names (GraphRunner(name=...)), got {names}")
    require_cuda()
    device = torch.device("cuda", runners[0].spec.device)
    records: List[CaptureRecord] = []
    try:
        with torch.cuda.device(device):
            reports = _capture_runners(runners, pools.pop() if pools else torch.cuda.graph_pool_handle(), records)
    except BaseException:
        for record in records:
            record.release()
        raise
    return reports


def _capture_runners(runners: Sequence[GraphRunner], pool: Any, records: List[CaptureRecord]) -> List[CaptureReport]:
    """The schedule: warm every runner up, capture all (runner, size) pairs largest first, keep the workspaces
    the graphs use, arm every runner."""
    spec0 = runners[0].spec
    stream = capture_stream(runners[0].device)
    ranks = distributed.agreement(spec0.collective_timeout_s)
    order = sorted(((size, i) for i, r in enumerate(runners) for size in r.capture_sizes), reverse=True)
    ranks.same_everywhere("capture order", order)
    with ranks.stage("warm-up"):
        for r in runners:
            with torch.set_grad_enabled(not r.spec.no_grad):
                records.append(r._begin_capture(pool, stream))
    guard = CaptureGuard(pool, records[0].device, strict=any(r.spec.strict for r in runners),
                         debug=any(r.spec.debug for r in runners))
    show = distributed.is_rank_zero() and (sys.stderr.isatty() or any(r.spec.verbose for r in runners))
    # No garbage collection while capturing: a collection frees unrelated tensors mid-capture, which both
    # reorders the pool and hides what a capture kept alive from the guard.
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for size, i in tqdm(order, desc="capturing", unit="graph", disable=not show):
            runner, record = runners[i], records[i]
            with ranks.stage(f"capture of {record.label(size)}"), torch.set_grad_enabled(not runner.spec.no_grad):
                runner._capture_size(record, size, stream, guard)
    finally:
        if gc_enabled:
            gc.enable()
    # Every graph above baked in the cuBLAS workspaces torch cached for our private stream during the warm-up:
    # from now on the graphs own them (see csrc/workspaces.h).
    workspaces = _C.WorkspaceHold()
    workspaces.take(stream.cuda_stream)
    reports = []
    for runner, record in zip(runners, records):
        record.workspaces = workspaces
        runner._finish_capture(record)
        report = record.report(rank=ranks.rank)
        report.ranks = ranks.exchange(f"capture report of {runner.spec.name or 'the runner'}", value=report) \
            if ranks.world > 1 else []
        reports.append(report)
        if distributed.is_rank_zero():
            logger.info("graphrunner: %s", report.summary())
            if runner.spec.verbose:
                print(f"graphrunner: {report.summary()}", file=sys.stderr)
    return reports


def validate_all(*runners: GraphRunner, steps_per_size: int = 2, scrub: bool = False, guard: bool = False,
                 seed: int = 0, rtol: Optional[float] = None,
                 make_inputs: Optional[Dict[str, MakeInputs]] = None) -> ValidationReport:
    """Audits the graphs of runners that share one pool, then replays every size of every runner in one
    random interleaved order against eager (see GraphRunner.validate). Scrub and guard treat another runner's
    memory like another size's: a write into it names the writing runner, size and buffer, and the owner.

    Args:
        runners: armed runners of one pool (captured together with capture_all, or alone into a shared pool).
        steps_per_size: replays per captured size of each runner.
        scrub: scrub free pool memory and other graphs' kept-alive allocations before each replay.
        guard: fail on any write outside the replaying graph's own memory.
        seed: seeds the order, the batches and the inputs.
        rtol: the relative error accepted for every output; None: by dtype.
        make_inputs: runner name -> make_inputs(batch, generator), for runners whose inputs depend on each other.
    """
    records = [r._require_armed("validate()") for r in runners]
    if len({tuple(rec.pool) for rec in records}) > 1:
        raise ValueError("validate_all() checks runners of one pool; these use "
                         f"{sorted({tuple(rec.pool) for rec in records})}: validate each pool on its own")
    _audit(runners).check()
    make_inputs = make_inputs or {}
    targets = [Target(rec, r, r._eager, r.spec.inputs, r.spec.tokens_per_request, make_inputs.get(r.spec.name))
               for r, rec in zip(runners, records)]
    return validate(targets, steps_per_size=steps_per_size, scrub=scrub, guard=guard, seed=seed, rtol=rtol,
                    collective_timeout_s=runners[0].spec.collective_timeout_s)


def _audit(runners: Sequence[GraphRunner]) -> AuditReport:
    """The audit of armed runners' graphs, with what their specs and gr.workspace declare long-lived."""
    records = [r._require_armed("audit()") for r in runners]
    return audit(records, [t for r in runners for t in r.spec.declared()] + workspace_tensors())


def _before_replay(hook: Callable[[StepInfo], None], views: Dict[int, Dict[str, torch.Tensor]], tokens: int,
                   batch: int, size: int, inputs: Dict[str, torch.Tensor]) -> None:
    """What the native step calls before a launch: the user's hook, with the step's StepInfo. Like the other
    callables the runner arms, it does not refer back to the runner."""
    hook(StepInfo(batch, size, batch * tokens, size * tokens, views.get(size, {}), inputs))


def _refuse(message: str, **inputs: torch.Tensor) -> Any:
    """Every step while a runner is not armed."""
    raise GraphStateError(message)


def _run_eagerly(fn: Callable[..., Any], no_grad: bool, **inputs: torch.Tensor) -> Any:
    with torch.set_grad_enabled(not no_grad):
        return fn(**inputs)


def _check_output(name: str, t: torch.Tensor, size: int, tokens: int) -> torch.Tensor:
    if t.dim() and t.shape[0] not in (size, size * tokens):
        per_token = f" or {size * tokens} (tokens)" if tokens > 1 else ""
        raise ValueError(f"{name} has shape {tuple(t.shape)} when captured at batch size {size}; every output needs "
                         f"{size} rows (requests){per_token} in dim 0, or no dims at all (a count, a flag)")
    return t
