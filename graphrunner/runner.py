"""`GraphRunner`: one step function captured at many batch sizes, largest first, into one pool; and
`capture_all`, which captures several runners of one pool together."""
from __future__ import annotations

import enum
import functools
import gc
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from graphrunner import capture as schedule
from graphrunner._native import _C, GraphStateError
from graphrunner.audit import AuditReport, audit
from graphrunner.graph import PoolLike, pool_id, require_cuda
from graphrunner.inputs import StaticInput
from graphrunner.isolate import validate_in_child
from graphrunner.outputs import clone_tensors, map_tensors
from graphrunner.plan import CapturePlan, capture_within, check_budget, measure
from graphrunner.record import CaptureRecord, CaptureReport
from graphrunner.spec import RunnerSpec, StepInfo
from graphrunner.validate import MakeInputs, Target, ValidationReport, validate
from graphrunner.workspace import workspace_tensors

_D = RunnerSpec  # the defaults below are RunnerSpec's (dataclass fields with defaults are class attributes)


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

    Two kinds, one class (docs/design.md, "Keys"):

    - Uniform (the default): sizes and batches count requests. With `tokens_per_request=K` (a verify step: K
      tokens per request), inputs declared `per_token=True` have K rows per request, and outputs with K rows
      per request are sliced to `batch * K` rows.
    - Ragged (`split` names an input): sizes count tokens, as serving engines key mixed prefill and decode
      steps. Size T holds up to T tokens over up to `max_requests[T]` requests (R); per-token inputs have T
      rows, the others R. A step runs at the smallest T that holds its tokens and requests; padding tokens get
      each input's pad value and padding requests a split of 0. The split (each request's token count) is
      passed as a CPU tensor: the runner checks it on the host and stages it in the graph. Outputs have one
      row per request (R at capture), sliced to the step's requests.

    Args:
        fn: the step function (or nn.Module), called as fn(**inputs) with one tensor per input, each with the
            batch in dim 0. It returns a tensor, or a tuple, list or dict of tensors, each with the batch (or
            batch * tokens_per_request) in dim 0, or 0-d (a count, a flag). It must not mix rows: padding rows
            must not change real rows.
        inputs: name -> gr.StaticInput: each input's per-row shape, dtype and pad value.
        max_batch_size: the largest batch a step may have (1..8192), in tokens for a ragged runner. Default: the
            largest of capture_sizes.
        capture_sizes: the sizes to capture (requests; tokens for a ragged runner); default
            gr.default_capture_sizes(max_batch_size).
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
            (padded_requests 0 for a step that runs eagerly), and the step's inputs (a ragged runner's split
            still on the host: the hook may read it without a device sync).
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
        split: makes the runner ragged: the name of the per-request input that holds each request's token count
            this step (int32 or int64, pad 0; passed as a CPU tensor, each value >= 1, summing to the per-token
            inputs' rows). None: a uniform runner.
        max_requests: a ragged runner's requests per size: an int R (size T holds min(T, R) requests), a dict
            of size -> requests, or None (size T holds T requests).
        max_lead: the most steps of this runner the host queues behind the one the GPU is running (1..1024): a
            step waits, in C++ without the GIL, until the step max_lead back has begun. None: no bound. A loop
            that never waits would otherwise fill CUDA's launch queue, and with a deep queue each graph took
            longer on the GPU (docs/design.md). Loops that read each step's result, or run a step or two
            ahead, never wait here.
        verbose: print the capture report and show a progress bar; default from the GRAPHRUNNER_VERBOSE
            environment variable ("1" turns it on). The report is always logged to the "graphrunner"
            logger at INFO.
        share_segments: a piecewise runner's segments of one structure (the same kernels with the same grids,
            blocks and shared memory, the same memset and memcpy shapes and edges: the layers between attention
            breaks, say), at any of its sizes, run on one executable (cudaGraphExec_t) instead of one each: the
            first of a structure is instantiated, the others are never instantiated and load their parameters
            into it with cudaGraphExecUpdate, which must accept them (else they get their own). Saves the
            executables' device memory (the report says executables, nodes and bytes with and without sharing).
            Off by default: every launch of a segment whose executable holds another segment's parameters costs
            an update first, host time per break (a step of L identical layers pays about L updates). Segment 0
            (it holds the staging node) and segments that draw random numbers never share.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: Dict[str, StaticInput],
        max_batch_size: Optional[int] = _D.max_batch_size,
        capture_sizes: Optional[Sequence[int]] = _D.capture_sizes,
        *,
        pool: PoolLike = _D.pool,
        warmup: int = _D.warmup,
        fallback: str = _D.fallback,
        on_capture: Optional[Callable[[StepInfo], None]] = _D.on_capture,
        before_replay: Optional[Callable[[StepInfo], None]] = _D.before_replay,
        clone_outputs: bool = _D.clone_outputs,
        no_grad: bool = _D.no_grad,
        device: Optional[Union[int, str, torch.device]] = _D.device,
        capture_error_mode: str = _D.capture_error_mode,
        strict: bool = _D.strict,
        debug: bool = _D.debug,
        collective_timeout_s: float = _D.collective_timeout_s,
        keep: Sequence[Union[torch.Tensor, torch.nn.Module]] = _D.keep,
        name: Optional[str] = _D.name,
        verbose: Optional[bool] = None,
        tokens_per_request: int = _D.tokens_per_request,
        out: Union[None, torch.Tensor, Dict[str, torch.Tensor]] = _D.out,
        capture_inputs: Optional[Callable[[int], Dict[str, torch.Tensor]]] = _D.capture_inputs,
        max_lead: Optional[int] = _D.max_lead,
        split: Optional[str] = _D.split,
        max_requests: Union[None, int, Mapping[int, int]] = _D.max_requests,
        share_segments: bool = _D.share_segments,
    ) -> None:
        if verbose is None:
            verbose = os.environ.get("GRAPHRUNNER_VERBOSE", "") not in ("", "0")
        spec = RunnerSpec(fn, inputs, max_batch_size, capture_sizes, pool=pool, warmup=warmup, fallback=fallback,
                          on_capture=on_capture, before_replay=before_replay, clone_outputs=clone_outputs,
                          no_grad=no_grad, device=device, capture_error_mode=capture_error_mode, strict=strict,
                          debug=debug, collective_timeout_s=collective_timeout_s, keep=keep, name=name,
                          verbose=verbose, tokens_per_request=tokens_per_request, out=out,
                          capture_inputs=capture_inputs, max_lead=max_lead, split=split, max_requests=max_requests,
                          share_segments=share_segments)
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

    def _setup(self, spec: RunnerSpec, max_size: Optional[int] = None) -> None:
        """Builds the runner, unarmed, from a checked spec.

        Args:
            spec: the spec.
            max_size: the largest step the size table covers, when above the largest captured size (a budget
                kept fewer sizes: steps above them run eagerly); default spec.max_batch_size.
        """
        self.spec = spec
        self.state = RunnerState.UNARMED
        self.record: Optional[CaptureRecord] = None
        self._pieces: Optional[List[Any]] = None  # the breaks armed (validate checks them: graphrunner.break_checks)
        sizes, bound = list(spec.capture_sizes), max_size or spec.max_batch_size
        self.sizes = (_C.SizeTable(sizes, bound, [spec.requests_of(t) for t in sizes]) if spec.ragged
                      else _C.SizeTable(sizes, bound))
        self._checker = _C.InputChecker(spec.checker_specs(), self.sizes, spec.fallback == "eager", spec.device,
                                        1 if spec.ragged else spec.tokens_per_request)
        self._disarm(functools.partial(_refuse, _REFUSALS[RunnerState.UNARMED]))

    @property
    def device(self) -> torch.device:
        """The runner's GPU."""
        return torch.device("cuda", self.spec.device)

    @property
    def capture_sizes(self) -> List[int]:
        """The captured sizes, ascending."""
        return list(self.spec.capture_sizes)

    @property
    def capture_order(self) -> List[int]:
        """The order sizes are captured in: largest first."""
        return self.spec.capture_order

    def size_for(self, requests: int, tokens: Optional[int] = None) -> int:
        """The captured size a step runs at; 0 when it runs eagerly.

        Args:
            requests: the step's requests (its batch size).
            tokens: the step's tokens; a ragged runner needs it, a uniform one ignores it.
        """
        if not self.spec.ragged:
            return self.sizes.size_for(requests)
        if tokens is None:
            raise TypeError("a ragged runner's size_for() needs the step's tokens: size_for(requests, tokens)")
        return self.sizes.size_for_step(requests, tokens)

    # -- capture ---------------------------------------------------------------------------------
    def capture(self) -> CaptureReport:
        """Warms up, then captures every size largest first into the pool. Returns the per-size report."""
        return capture_all(self)[0]

    def _arm_on(self, record: CaptureRecord) -> None:
        """Arms the native step on the record's graphs."""
        spec = self.spec
        outputs: List[Any] = [None] * self.sizes.output_slots
        if spec.ragged:  # a slot per (size, requests): outputs sliced to the step's requests
            for size in spec.capture_sizes:
                for requests in range(1, spec.requests_of(size) + 1):
                    outputs[self.sizes.output_slot(size, requests)] = _sliced(record, size, requests, 0)
        else:  # a slot per batch: outputs of the size it runs at, sliced to its requests (and tokens)
            for batch in range(1, spec.max_batch_size + 1):
                size = self.sizes.size_for(batch)
                if size:
                    outputs[batch] = _sliced(record, size, batch, batch * spec.tokens_per_request)
        sizes = {size: (spec.requests_of(size), spec.tokens_of(size), record.static_views(size))
                 for size in spec.capture_sizes}
        step_info = functools.partial(_step_info, sizes)
        before_replay = None
        if spec.before_replay is not None:
            before_replay = functools.partial(_before_replay, spec.before_replay, step_info)
        pieces = None  # a piecewise size's breaks, as the native step calls them (csrc/py_step.cpp, Note [breaks])
        if any(entry.breaks for entry in record.entries.values()):
            pieces = [None] * (self.sizes.max_size + 1)  # the table's bound: a budget may have kept fewer sizes
            for size, entry in record.entries.items():
                if entry.breaks:
                    pieces[size] = [(b.op, b.args, dict(b.kwargs)) for b in entry.breaks]
        self._arm(record.launcher, outputs, before_replay, clone_tensors if spec.clone_outputs else None,
                  self._eager, pieces, step_info if pieces is not None else None)
        self.record, self.state, self._pieces = record, RunnerState.ARMED, pieces

    # -- steps -----------------------------------------------------------------------------------
    @property
    def _eager(self) -> Callable[..., Any]:
        """A step no captured graph holds, and validate()'s reference. It does not refer back to the runner, so
        a runner dropped without close() is freed at once, not at the next garbage collection."""
        return functools.partial(_run_eagerly, self.spec.fn, self.spec.no_grad, self.spec.split, self.device)

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
                 eager_at: str = "batch", restore_state: bool = False) -> ValidationReport:
        """Audits the graphs, then replays every size in random interleaved order on fresh random inputs against
        eager. Raises GraphHazardError naming the size and the buffer.

        What it writes: each checked step runs fn eagerly and then replays its graph, on random inputs, so any
        state fn writes (a KV cache's rows, a position counter such as Hugging Face's StaticCache keeps, the
        runner's state buffers) is written twice a step, as the capture's warm-up wrote it `warmup` times.
        Nothing is undone afterwards: reset such state before real steps (StaticCache.reset() and a prefill, a
        counter re-seeded). See docs/huggingface.md.

        Args:
            steps_per_size: replays per captured size.
            scrub: fill the pool's free memory (and other sizes' kept-alive capture allocations) with a NaN /
                INT_MAX pattern before each replay, so reads of stale state show; at a piecewise size, also poison
                each break op's out= before the op, and fail when the op leaves the step's rows of it unwritten.
            guard: fail on any write into memory another size owns, or into static input rows past the padded
                size; at a piecewise size, checked after each segment (naming it), and around each break op, which
                must write nothing outside its out=.
            isolate: run the whole check in a child process built from the same spec, so a graph that
                faults cannot take this process's CUDA context down.
            seed: seeds the order, the batches and the inputs.
            rtol: the relative error accepted for every output; None: by dtype (1e-4 for float32, 3e-2 for
                16-bit floats, exact for integers).
            make_inputs: make_inputs(batch, generator) -> one step's inputs (a ragged runner: make_inputs(tokens,
                requests, generator), the split on the host), where inputs depend on each other
                (distinct pages per row, say); by default each input is drawn alone from its StaticInput's range.
            eager_at: "batch": the eager reference runs on the step's batch; "size": on the batch padded to the
                captured size (each input's pad value in the padding rows), as the graph runs, comparing the
                step's rows only. For steps that only run at their captured sizes (a cache built for one batch).
            restore_state: put the runner's state buffers (RunnerSpec.state_buffers: module buffers, keep=,
                out=, the non-parameter tensors fn holds, such as a KV cache object's tensors and counter) back
                after each eager reference step, so the replay starts from the same state. For steps that advance
                state of their own on each call; it costs a copy of those buffers per step.
        """
        if isolate:
            self._require_armed("validate()")
            return validate_in_child(type(self).from_spec, self.spec.without_pool(), steps_per_size=steps_per_size,
                                     scrub=scrub, guard=guard, seed=seed, rtol=rtol, make_inputs=make_inputs,
                                     eager_at=eager_at, restore_state=restore_state)
        return validate_all(self, steps_per_size=steps_per_size, scrub=scrub, guard=guard, seed=seed, rtol=rtol,
                            make_inputs={self.spec.name: make_inputs} if make_inputs is not None else None,
                            eager_at=eager_at, restore_state=restore_state)

    # -- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Destroys the graphs and gives their memory back: the pool (once no returned output is alive) and the
        workspaces kept for them (once no other runner captured with them is open)."""
        record, self.record, self._pieces = self.record, None, None
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


def capture_all(*runners: GraphRunner, max_bytes: Optional[int] = None,
                plan: Optional[CapturePlan] = None) -> List[CaptureReport]:
    """Captures several runners into one pool, every size of every runner largest first, so the pool holds
    about what the largest graph of any runner needs. Returns each runner's report, in argument order: per size
    and in total, every byte the graphs hold (pool growth, executables, first-use bytes, workspaces, static inputs,
    other bytes) and the driver's own figure for the whole capture; it logs a line per runner and one for the pool.

    Runners of one pool share its memory: they must never replay concurrently on different streams.

    With `max_bytes`, the capture keeps the sizes that fit, dropping the largest first: every runner keeps its sizes
    up to the largest limit whose predicted bytes fit (`plan.bytes_for`), and is rebuilt on them
    (`runner.capture_sizes` lists what was kept; the reports' `dropped`, what was not). Steps of batches above the
    largest kept size run eagerly, up to the max_batch_size the runner was built with. The capture is measured (the
    driver's free memory, torch's cache emptied on both sides, as gr.dry_run measures) and, were it over the
    budget, captured again with fewer sizes: the capture kept never exceeds max_bytes. A budget that even the
    smallest sizes exceed raises ValueError. See graphrunner.plan.capture_within.

    Args:
        runners: runners built with the same pool (or all with pool=None: they get one new pool), on one device.
        max_bytes: the most bytes the capture may keep (a positive int), or None: every size.
        plan: the gr.dry_run plan of these runners (made before the engine's big buffers, with a stand-in for
            them). Without one, a budgeted capture first dry-runs the runners themselves, which needs the memory
            of capturing every size while it runs.
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
    check_budget(max_bytes, plan, runners)
    require_cuda()
    if max_bytes is not None and plan is None:  # needs the memory of capturing every size while it runs
        specs = [r.spec for r in runners]
        plan = dry_run(lambda: [type(r).from_spec(spec.without_pool()) for r, spec in zip(runners, specs)])
        plan.check(runners)
    with torch.cuda.device(torch.device("cuda", runners[0].spec.device)):
        pool = pools.pop() if pools else torch.cuda.graph_pool_handle()
        records = schedule.capture([schedule.Capture(r.spec, r._checker, r.sizes) for r in runners], pool) \
            if max_bytes is None else capture_within(runners, pool, max_bytes, plan)
    try:
        for runner, record in zip(runners, records):
            runner._arm_on(record)
    except BaseException:  # arming failed after a capture that succeeded: give every graph back
        for runner, record in zip(runners, records):
            runner._disarm(functools.partial(_refuse, _REFUSALS[RunnerState.UNARMED]))
            runner.record, runner.state, runner._pieces = None, RunnerState.UNARMED, None
            record.release()
        raise
    return [record.capture_report for record in records]


def dry_run(build: Callable[[], Union[GraphRunner, Sequence[GraphRunner]]], ladder: bool = True) -> CapturePlan:
    """Captures every size of the runners `build()` makes, measures what the capture keeps, gives everything
    back, and returns the plan: the bytes the real capture of the same runners will take. An engine calls it
    before sizing its KV cache.

    `build()` makes the runners (and whatever model they run) and returns them, a GraphRunner or a list of the
    runners to capture together. They must be identical to the real ones (same fn and layers, inputs, capture
    sizes, names, tokens_per_request, max_requests, out= shapes, options) except for the engine's big buffers, which
    may be small stand-ins: a few pages of KV cache, as long as fn runs on them at every size with the static
    inputs' pad values (and capture_inputs, if given), as the capture's warm-up runs it. The weights may be the
    real ones: they are allocated before the measurement starts. Anything whose size depends on a big buffer's
    size and is allocated inside fn (or by on_capture) would be mispredicted.

    Measured: the fall of the driver's free memory across `capture_all` (synchronized, torch's cache emptied on
    both sides, from right after build()), which `capture_all` reads the same way for the real capture. Not
    counted: build()'s own
    allocations, and what fn's warm-up leaves in torch's cache (the engine's activation headroom covers that while
    capturing). Then, with `ladder`, each shorter ladder's bytes (every runner keeping its sizes up to a limit, for
    a budget): the full measurement less what the dropped sizes added: their executables (measured), their static
    rows (computed) and the pool they needed beyond the kept sizes. That pool part is measured by running each
    limit's steps eagerly, in capture order, on graphrunner's capture stream, into a scratch pool (the same
    allocations as capturing them), one limit after another; this costs an eager step per size and limit (36 x 37
    / 2 steps for 36 sizes) and takes at most one step's activations at the largest size at once.

    What the dry run leaves behind once its runners are closed (`leftover_bytes`: kernels loaded on first use,
    device memory a driver keeps from destroyed executables) is not paid again by the capture after it: the plan's
    bytes leave it out. Run a step of the model before (an engine's profiling pass does), so that the model's own
    first-use costs fall outside both.

    Args:
        build: makes the runners to capture together (a GraphRunner, or a list of them), unarmed.
        ladder: also measure every shorter ladder's bytes, for capture_all(max_bytes=...).
    """
    require_cuda()
    built = build()
    runners = [built] if isinstance(built, GraphRunner) else list(built) if isinstance(built, (list, tuple)) else None
    if not runners or not all(isinstance(r, GraphRunner) for r in runners):
        raise TypeError(f"dry_run(build): build() must return a GraphRunner or a list of them, got "
                        f"{type(built).__name__}")
    if any(r.state is not RunnerState.UNARMED for r in runners):
        raise ValueError("dry_run(build): build() must return new runners, not yet captured")
    try:
        return measure(runners, capture_all, ladder)
    finally:
        del built, runners
        gc.collect()


def validate_all(*runners: GraphRunner, steps_per_size: int = 2, scrub: bool = False, guard: bool = False,
                 seed: int = 0, rtol: Optional[float] = None,
                 make_inputs: Optional[Dict[str, MakeInputs]] = None, eager_at: str = "batch",
                 restore_state: bool = False) -> ValidationReport:
    """Audits the graphs of runners that share one pool, then replays every size of every runner in one
    random interleaved order against eager (see GraphRunner.validate). Scrub and guard treat another runner's
    memory like another size's: a write into it names the writing runner, size and buffer, and the owner.

    Args:
        runners: armed runners of one pool (captured together with capture_all, or alone into a shared pool).
        steps_per_size: replays per captured size of each runner.
        scrub: scrub free pool memory and other graphs' kept-alive allocations before each replay (and poison
            each break op's out= at a piecewise size: see GraphRunner.validate).
        guard: fail on any write outside the replaying graph's own memory (checked after each segment and around
            each break op at a piecewise size).
        seed: seeds the order, the batches and the inputs.
        rtol: the relative error accepted for every output; None: by dtype.
        make_inputs: runner name -> make_inputs(batch, generator) (ragged: make_inputs(tokens, requests,
            generator)), for runners whose inputs depend on each other.
        eager_at: "batch" or "size": where the eager reference runs (see GraphRunner.validate).
        restore_state: put each runner's state buffers back after its eager reference step.
    """
    records = [r._require_armed("validate()") for r in runners]
    if len({tuple(rec.pool) for rec in records}) > 1:
        raise ValueError("validate_all() checks runners of one pool; these use "
                         f"{sorted({tuple(rec.pool) for rec in records})}: validate each pool on its own")
    _audit(runners).check()
    make_inputs = make_inputs or {}
    targets = [Target(rec, r, r._eager, r.spec.inputs, r.spec.tokens_per_request, make_inputs.get(r.spec.name),
                      r.spec.split, r._pieces)
               for r, rec in zip(runners, records)]
    return validate(targets, steps_per_size=steps_per_size, scrub=scrub, guard=guard, seed=seed, rtol=rtol,
                    collective_timeout_s=runners[0].spec.collective_timeout_s, eager_at=eager_at,
                    restore_state=restore_state)


def _audit(runners: Sequence[GraphRunner]) -> AuditReport:
    """The audit of armed runners' graphs, with what their specs and gr.workspace declare long-lived."""
    records = [r._require_armed("audit()") for r in runners]
    return audit(records, [t for r in runners for t in r.spec.declared()] + workspace_tensors())


def _sliced(record: CaptureRecord, size: int, requests: int, tokens: int) -> Any:
    """The outputs of `size` as a step of `requests` requests sees them: per-request outputs cut to `requests`
    rows, a uniform runner's per-token outputs (tokens_per_request rows per request) to `tokens` rows (0: a
    ragged runner, whose outputs are all per request)."""
    def rows(_: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t
        return t[:requests] if not tokens or t.shape[0] == size else t[:tokens]

    return map_tensors(record.entries[size].outputs, rows)


def _step_info(sizes: Dict[int, Tuple[int, int, Dict[str, torch.Tensor]]], requests: int, tokens: int, size: int,
               inputs: Dict[str, torch.Tensor]) -> StepInfo:
    """The StepInfo of a step; `sizes` holds each captured size's (requests, tokens, static views). Like the
    other callables the runner arms, it does not refer back to the runner."""
    padded_requests, padded_tokens, views = sizes.get(size, (0, 0, {}))
    return StepInfo(requests, padded_requests, tokens, padded_tokens, views, inputs)


def _before_replay(hook: Callable[[StepInfo], None], step_info: Callable[..., StepInfo], requests: int, tokens: int,
                   size: int, inputs: Dict[str, torch.Tensor]) -> None:
    """What the native step calls before a launch: the user's hook, with the step's StepInfo."""
    hook(step_info(requests, tokens, size, inputs))


def _refuse(message: str, **inputs: torch.Tensor) -> Any:
    """Every step while a runner is not armed."""
    raise GraphStateError(message)


def _run_eagerly(fn: Callable[..., Any], no_grad: bool, split: Optional[str], device: torch.device,
                 **inputs: torch.Tensor) -> Any:
    """A step no graph holds: fn itself, with a ragged runner's split moved to the GPU as fn sees it there."""
    if split is not None:
        inputs[split] = inputs[split].to(device, non_blocking=True)
    with torch.set_grad_enabled(not no_grad):
        return fn(**inputs)
