"""The capture schedule: warm every runner up, capture every (runner, size) pair largest first into one pool,
take the workspaces the graphs baked in, and hand each runner its record.

It works over specs and records: it never sees a GraphRunner. The runner builds a `Capture` (spec, native
checker and size table), this module turns each into a `CaptureRecord`, and the runner arms itself on it.
"""
from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from graphrunner import distributed
from graphrunner._native import _C
from graphrunner.capture_guard import CaptureGuard
from graphrunner.errors import OverBudget
from graphrunner.graph import capture_stream
from graphrunner.memory import alias
from graphrunner.outputs import map_tensors
from graphrunner.piecewise import Segments
from graphrunner.record import CaptureRecord, CaptureReport, PoolReport, SizeEntry
from graphrunner.spec import RunnerSpec, StepInfo

logger = logging.getLogger("graphrunner")


@dataclass
class Capture:
    """What capture needs of one runner.

    Attributes:
        spec: the runner's checked spec.
        checker: its native input checker (the launcher checks each step with it).
        sizes: its native size table.
    """

    spec: RunnerSpec
    checker: Any
    sizes: Any


def capture(captures: Sequence[Capture], pool: Any, budget: Optional[int] = None,
            dropped: Optional[List[List[int]]] = None) -> List[CaptureRecord]:
    """Captures every size of every runner largest first into `pool`; returns one record per runner, in order,
    each with its report (`record.capture_report`), logged. On failure every record made so far is released and
    the error raised.

    The driver's free memory is read around the whole capture, after a device synchronize and
    `torch.cuda.empty_cache()` on both sides (so what the warm-up leaves in torch's cache is not counted, and
    torch's cache is emptied as a side effect): the reports' `driver_bytes`, what the capture keeps as the driver
    counts it, and `outside_bytes`, its part outside torch's allocator (the executables' memory, measured per
    graph in `Graph.exec_bytes`, and anything else the driver handed out meanwhile).

    Args:
        captures: the runners, all on one device.
        pool: the allocator pool id the graphs allocate from.
        budget: the bytes the capture may keep (graphrunner.plan.capture_within): a capture whose driver_bytes
            exceed it on any rank destroys its graphs and raises OverBudget on every rank.
        dropped: per runner, the sizes left out for the budget (for the reports).
    """
    device = torch.device("cuda", captures[0].spec.device)
    free, reserved = _settled_memory(device)
    records: List[CaptureRecord] = []
    try:
        ranks, stream = _schedule(captures, pool, records)
        # Every graph baked in the cuBLAS workspaces torch cached for our private stream during the warm-up:
        # from now on the graphs own them (see csrc/workspaces.h).
        workspaces = _C.WorkspaceHold()
        workspaces.take(stream.cuda_stream)
        for record in records:
            record.workspaces = workspaces
        free_after, reserved_after = _settled_memory(device)
        driver_bytes = free - free_after
        if budget is not None and any(ranks.exchange("the capture's bytes against its budget",
                                                     value=driver_bytes > budget)):
            raise OverBudget(driver_bytes, budget)
        _report(captures, records, ranks, driver_bytes, reserved_after - reserved, budget,
                dropped or [[] for _ in captures])
    except BaseException:
        for record in records:
            record.release()
        raise
    return records


def capture_order(specs: Sequence[RunnerSpec]) -> List[Tuple[int, int]]:
    """The (size, runner index) pairs of runners captured together, in the order they are captured: largest
    first by the rows a graph processes (tokens), which is what its activations scale with: a ragged size counts
    tokens, a uniform size requests of tokens_per_request rows each.

    Args:
        specs: the runners' specs, in capture_all's order.
    """
    return [(size, i) for _, size, i in sorted(((spec.tokens_of(size), size, i) for i, spec in enumerate(specs)
                                                for size in spec.capture_sizes), reverse=True)]


def _memory(device: torch.device) -> Tuple[int, int]:
    """The driver's free memory and torch's reserved memory on `device`, as they stand.

    Note [first-use bytes]: each size's capture is read between two of these: the fall of free memory less the
    growth of torch's reserved memory is what the driver handed out outside torch's allocator meanwhile
    (SizeEntry.outside_bytes). Allocations are host-side calls, so no synchronize is needed. Most of it is the
    size's executables, read inside the window by Graph.exec_bytes around instantiation and upload; the rest is
    the first-use bytes: memory the size's capture took outside both, which the warm-up at the largest size did
    not take. On the H200 the workloads' decoder takes some at size 1 (benchmarks/results/exec-memory-probe-h200.txt),
    whatever CUDA_MODULE_LOADING says; like executables' memory, the driver keeps it for the process's later
    graphs, so it shows in a process's first capture of a model only. Measured, not attributed: the window also
    reads what another process, or a library keeping its own buffers (NCCL's lazily made connections, when a
    captured collective at a small size takes a new algorithm), allocates meanwhile.
    """
    return torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device)


def outside_growth(before: Tuple[int, int], after: Tuple[int, int]) -> int:
    """What the driver handed out outside torch's allocator between two readings of `_memory`: the fall of its
    free memory less the growth of torch's reserved memory (never below 0).

    Args:
        before: (driver's free bytes, torch's reserved bytes) at the start.
        after: the same at the end.
    """
    return max(0, (before[0] - after[0]) - (after[1] - before[1]))


def _settled_memory(device: torch.device) -> Tuple[int, int]:
    """The driver's free memory and torch's reserved memory on `device`, once the device is idle and torch's
    cache is emptied."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return _memory(device)


def _schedule(captures: Sequence[Capture], pool: Any, records: List[CaptureRecord]
              ) -> Tuple[distributed.Agreement, torch.cuda.Stream]:
    spec0 = captures[0].spec
    device = torch.device("cuda", spec0.device)
    stream = capture_stream(device)
    ranks = distributed.agreement(spec0.collective_timeout_s)
    order = capture_order([c.spec for c in captures])
    ranks.same_everywhere("capture order", order)
    with ranks.phase("warm-up"):
        for c in captures:
            with torch.set_grad_enabled(not c.spec.no_grad):
                records.append(_warm_up(c, pool, stream))
    capture_guard = CaptureGuard(pool, device, strict=any(c.spec.strict for c in captures),
                         debug=any(c.spec.debug for c in captures))
    # What a break op's tensors may live in besides a capture's own allocations, once per runner (declared()
    # walks everything fn holds).
    long_lived = [{t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*record.static_inputs.values(), *c.spec.declared()]} for c, record in zip(captures, records)]
    # With share_segments: per runner, the graph that instantiated each segment structure's executable, by
    # structure (piecewise.Segments); None: every segment instantiates its own.
    shared: List[Optional[Dict[bytes, Any]]] = [{} if c.spec.share_segments else None for c in captures]
    show = distributed.is_rank_zero() and (sys.stderr.isatty() or any(c.spec.verbose for c in captures))
    # No garbage collection while capturing: a collection frees unrelated tensors mid-capture, which both
    # reorders the pool and hides what a capture kept alive from the capture guard.
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for size, i in tqdm(order, desc="capturing", unit="graph", disable=not show):
            spec, record = captures[i].spec, records[i]
            with ranks.phase(f"capture of {record.label(size)}"), torch.set_grad_enabled(not spec.no_grad):
                _capture_size(spec, record, size, stream, capture_guard, long_lived[i], shared[i])
    finally:
        if gc_enabled:
            gc.enable()
    return ranks, stream


def _report(captures: Sequence[Capture], records: List[CaptureRecord], ranks: distributed.Agreement,
            driver_bytes: int, reserved_bytes: int, budget: Optional[int], dropped: List[List[int]]) -> None:
    """Makes each record's report (exchanged among the ranks of a distributed run) and logs it: a line per
    runner, and one for the pool when several runners were captured together.

    Note [other bytes]: `reserved_bytes`, the growth of torch's reserved memory across the whole capture (its
    cache emptied on both sides), is the part of `driver_bytes` inside torch's allocator: the pool's growth (each
    size's reading: torch's reserved growth within its capture window), the workspace hold, the static buffers,
    and what else the capture keeps that torch reserved outside those windows. The last is the report's other
    bytes, measured as the rest, so no figure checks it against the driver (the report's total equals the
    driver's inside torch by construction); benchmarks/exec_memory_probe.py lists the segments behind it. Most of
    it is allocator rounding: a tensor under 1 MiB keeps a whole 2 MiB small-block segment alive. The graph RNG's
    seed and offset (16 bytes, csrc/rng.cu) are made on the capture stream as the first graph begins, from a
    small-block segment the warm-up opened there (or a new one), which they then keep in every capture of a
    process (benchmarks/results/exec-memory-probe-h200-segments.txt); the static buffers open one on the current
    stream where its segments are full. `gr.workspace` buffers first asked for at warm-up count here too.
    Measured, not attributed: whatever another thread allocates on the device meanwhile and keeps counts as well.
    The rest is never below 0: where the parts exceed torch's growth (static buffers that fitted in its cache),
    the report counts those parts in full."""
    reports = [record.report(rank=ranks.rank) for record in records]
    pool = PoolReport(reports)
    other_bytes = max(0, reserved_bytes - pool.pool_bytes - pool.workspace_bytes - pool.static_bytes)
    for c, record, report, left_out in zip(captures, records, reports, dropped):
        report.driver_bytes, report.outside_bytes = driver_bytes, driver_bytes - reserved_bytes
        report.other_bytes = other_bytes
        report.shared_workspaces = len(records) > 1
        report.budget, report.dropped = budget, list(left_out)
        report.ranks = ranks.exchange(f"capture report of {c.spec.name or 'the runner'}", value=report) \
            if ranks.world > 1 else []
        record.capture_report = report
    log(reports, verbose=any(c.spec.verbose for c in captures))


def log(reports: Sequence[CaptureReport], verbose: bool = False) -> None:
    """Logs the reports of one capture to the "graphrunner" logger (and stderr where `verbose`): a line per
    runner, and the pool's totals when there are several (on rank 0 of a distributed run only).

    Args:
        reports: the reports of runners captured together.
        verbose: print the lines to stderr too.
    """
    if not distributed.is_rank_zero():
        return
    lines = [r.summary() for r in reports]
    if len(reports) > 1:
        lines.append(PoolReport(list(reports)).summary())
    for line in lines:
        logger.info("graphrunner: %s", line)
        if verbose:
            print(f"graphrunner: {line}", file=sys.stderr)


def _warm_up(c: Capture, pool: Any, stream: torch.cuda.Stream) -> CaptureRecord:
    """Makes the static buffers and the launcher, and warms fn up at the largest size outside the pool."""
    spec = c.spec
    device = torch.device("cuda", spec.device)
    largest = spec.max_batch_size
    static = {n: torch.full((spec.rows(n, largest), *s.shape), s.pad, dtype=s.dtype, device=device)
              for n, s in spec.inputs.items()}
    rows = {size: {n: spec.rows(n, size) for n in spec.inputs} for size in spec.capture_sizes}
    record = CaptureRecord(spec.name, device, pool, static, rows,
                           _C.Launcher(c.checker, list(static.values()), c.sizes, spec.max_lead or 0),
                           state_buffers=spec.state_buffers())
    _fill_capture_inputs(spec, record, largest)
    # The buffers were filled on the current stream; the warm-up runs on the capture stream, which must not
    # read them before the fill (recycled memory holds anything until then: an out-of-range index, say).
    stream.wait_stream(torch.cuda.current_stream(device))
    start = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(spec.warmup):
            spec.fn(**record.static_views(largest))
    stream.synchronize()
    record.warmup_ms = (time.perf_counter() - start) * 1000
    return record


def _capture_size(spec: RunnerSpec, record: CaptureRecord, size: int, stream: torch.cuda.Stream,
                  capture_guard: CaptureGuard, long_lived: Dict[int, int], shared: Optional[Dict[bytes, Any]]) -> None:
    _fill_capture_inputs(spec, record, size)
    requests, tokens = spec.requests_of(size), spec.tokens_of(size)
    if spec.on_capture is not None:
        spec.on_capture(StepInfo(requests, requests, tokens, tokens, record.static_views(size)))
    with capture_guard.watch((spec.name, size), record.label(size)) as kept:
        before = _memory(record.device)
        start = time.perf_counter()
        # One segment, or one more after each break op fn calls (graphrunner/piecewise.py).
        with Segments(record.pool, stream, spec.capture_error_mode, long_lived, record.label(size),
                      shared) as segments:
            record.launcher.stage(size)
            out = spec.fn(**record.static_views(size))
            map_tensors(out, lambda name, t: _check_output(spec, name, t, size))
            out = _write_into_buffers(spec, out)
        elapsed_ms = (time.perf_counter() - start) * 1000
        graph, *rest = segments.graphs
        record.launcher.add_graph(size, graph)
        for segment in rest:
            record.launcher.add_segment(size, segment)
        # Keep aliases, not the outputs: their blocks go back to the pool for the next, smaller capture.
        # (Outputs in the caller's buffers are views of memory the caller owns.)
        buffers = spec.out_buffers()
        outputs = map_tensors(out, lambda name, t: t if name in buffers else alias(t))
        del out
        footprint = [block for g in segments.graphs for block in g.footprint]
        after = _memory(record.device)
        record.entries[size] = SizeEntry(size, graph, outputs, footprint, kept, elapsed_ms, after[1] - before[1],
                                         rest, segments.breaks, outside_bytes=outside_growth(before, after))


def _fill_capture_inputs(spec: RunnerSpec, record: CaptureRecord, size: int) -> None:
    """Copies capture_inputs(size) into the static buffers, for the warm-up and the capture of `size`."""
    if spec.capture_inputs is None:
        return
    views = record.static_views(size)
    for name, value in spec.capture_inputs(size).items():
        if name not in views:
            raise ValueError(f"capture_inputs({size}) returned {name!r}, which is not an input; inputs are "
                             f"{sorted(views)}")
        views[name].copy_(value)


def _write_into_buffers(spec: RunnerSpec, out: Any) -> Any:
    """Inside a capture: copies each output that has a caller's buffer into it; returns the outputs with those
    replaced by views of the buffers."""
    buffers = spec.out_buffers()

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


def _check_output(spec: RunnerSpec, name: str, t: torch.Tensor, size: int) -> torch.Tensor:
    """Every output has one row per request (per token too, for a uniform runner) or no dims at all."""
    if t.dim() == 0:
        return t
    requests, tokens = spec.requests_of(size), spec.tokens_of(size)
    if spec.ragged and t.shape[0] != requests:
        raise ValueError(f"{name} has shape {tuple(t.shape)} when captured at {size} tokens; a ragged runner's "
                         f"outputs need one row per request ({requests} at this size) in dim 0, or no dims at all: "
                         "gather each request's rows inside fn (its last token's logits, say)")
    if not spec.ragged and t.shape[0] not in (requests, tokens):
        per_token = f" or {tokens} (tokens)" if tokens != requests else ""
        raise ValueError(f"{name} has shape {tuple(t.shape)} when captured at batch size {size}; every output needs "
                         f"{size} rows (requests){per_token} in dim 0, or no dims at all (a count, a flag)")
    return t
