"""Memory an engine can plan on: what a capture will take, measured before the KV cache is allocated, and a
capture kept within a budget.

- `dry_run(build)` captures every size of a set of runners built against a small stand-in for the engine's big
  buffers, measures what the capture keeps (the driver's free memory, as the real capture will read it), gives
  everything back and returns a `CapturePlan`: the bytes, the per-size detail, and the bytes of every shorter
  ladder (each runner keeping its sizes up to a limit), for a budget.
- `capture_all(*runners, max_bytes=..., plan=...)` (graphrunner.runner) keeps the sizes that fit, dropping the
  largest first, through `capture_within` here.

Why a dry run and not an estimate: vLLM extrapolates graph memory from two captures and misses both ways (vllm
#45178, #51590, #49224, #50780). The graphs' executables take device memory outside torch's allocator (on the
H200, 18 MiB for the 8-layer decoder's 36 sizes), which no pool figure shows, and the driver keeps it for the
process's later graphs once they are destroyed; a dry run measures all of it with the driver, and the real capture
after it reuses what the dry run's executables left (the plan leaves that out).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from graphrunner import distributed
from graphrunner._native import _C
from graphrunner.capture import Capture, _fill_capture_inputs, capture, capture_order
from graphrunner.errors import OverBudget
from graphrunner.graph import capture_stream
from graphrunner.pool import segments_of
from graphrunner.record import MiB, CaptureRecord, CaptureReport, PoolReport
from graphrunner.spec import RunnerSpec, StepInfo

logger = logging.getLogger("graphrunner")

_SEGMENT = 2 * MiB  # torch's allocator segment for small blocks; the driver maps memory in such units too


@dataclass
class CapturePlan:
    """What a capture of these runners takes, measured by `dry_run`.

    Attributes:
        bytes: what the real capture of the same runners, after this dry run, will keep as the driver counts it
            (the fall of its free memory across capture_all, after a device synchronize and
            `torch.cuda.empty_cache()` on both sides, as the report's driver_bytes reads it): the dry run's
            measured_bytes less its leftover_bytes, which the capture after it does not pay again.
        reports: the dry run's capture reports, one per runner (per size: pool growth, executable bytes,
            first-use bytes).
        ladder: limit -> the predicted `bytes` when every runner keeps only its sizes up to `limit` (one entry
            per captured size at which every runner keeps at least one size; the largest is `bytes` itself).
            Empty where dry_run(ladder=False) measured the whole ladder only.
        measured_bytes: the dry run's own capture, read that way.
        leftover_bytes: what the dry run's capture left behind once its runners were closed and torch's cache
            emptied (the driver's free memory against right before capture_all): one-time costs (kernels loaded
            on first use) and the device memory the driver keeps from destroyed executables for the process's
            later graphs (on the H200 with driver 580 it keeps all of it, and neither cudaGraphExecDestroy nor
            cudaDeviceGraphMemTrim gives it back: the first capture of a process leaves its executables' bytes
            here, and a capture after it reuses them).
        seconds: wall time of the dry run, build() included.
        counts: runner name -> {size: (requests, tokens)}: what each measured size holds (a ragged size's R(T)
            requests, a uniform size's tokens_per_request rows per request), which `check` compares besides the
            sizes: a size's graphs depend on both. Empty in a plan made by hand (then only sizes are checked).
    """

    bytes: int
    reports: List[CaptureReport]
    ladder: Dict[int, int] = field(default_factory=dict)
    measured_bytes: Optional[int] = None
    leftover_bytes: int = 0
    seconds: float = 0.0
    counts: Dict[str, Dict[int, Tuple[int, int]]] = field(default_factory=dict)

    @property
    def pool(self) -> PoolReport:
        """The dry run's totals, every byte counted once (the split of `bytes` as the reports account it)."""
        return PoolReport(list(self.reports))

    @property
    def sizes(self) -> Dict[str, List[int]]:
        """Runner name -> the sizes the plan measured, ascending."""
        return {r.name: sorted(s.size for s in r.sizes) for r in self.reports}

    @property
    def largest(self) -> int:
        """The largest size of any runner."""
        return max(size for sizes in self.sizes.values() for size in sizes)

    @property
    def smallest_limit(self) -> int:
        """The smallest limit at which every runner keeps a size: the largest of the runners' smallest sizes."""
        return max(min(sizes) for sizes in self.sizes.values())

    def bytes_for(self, limit: int) -> int:
        """The predicted bytes of a capture in which every runner keeps only its sizes up to `limit`.

        Args:
            limit: a size; every size above it is dropped.
        """
        if limit >= self.largest:
            return self.bytes
        kept = [k for k in self.ladder if k <= limit]
        if not kept:
            if not self.ladder:
                raise ValueError("this plan measured the whole ladder only (dry_run(..., ladder=False)); make it "
                                 "with ladder=True to plan captures of fewer sizes")
            raise ValueError(f"at limit {limit} some runner keeps no size: the smallest limit is "
                             f"{self.smallest_limit} ({self._smallest_sizes()})")
        return self.ladder[max(kept)]

    def fit(self, max_bytes: int, below: Optional[int] = None) -> int:
        """The largest limit whose capture fits in `max_bytes` (drop the largest sizes first); raises ValueError
        naming what the smallest sizes need when none does.

        Args:
            max_bytes: the budget, in bytes.
            below: only limits below this one (a capture at it measured over the budget).
        """
        limits = sorted(set(self.ladder) | {self.largest}, reverse=True)
        for limit in limits:
            if (below is None or limit < below) and limit >= self.smallest_limit and \
                    self.bytes_for(limit) <= max_bytes:
                return limit
        if not self.ladder and self.bytes > max_bytes:
            raise ValueError(f"max_bytes={max_bytes} ({max_bytes / MiB:.1f} MiB) is less than every size of these "
                             f"runners takes ({self.bytes / MiB:.1f} MiB), and this plan measured the whole ladder "
                             "only (dry_run(..., ladder=False)): make it with ladder=True to drop sizes")
        smallest = self.bytes_for(self.smallest_limit)
        raise ValueError(f"max_bytes={max_bytes} ({max_bytes / MiB:.1f} MiB) is less than the smallest sizes need: "
                         f"capturing {self._smallest_sizes()} takes {smallest / MiB:.1f} MiB by the plan"
                         + (f" (a capture measured {(max_bytes - smallest) / MiB:.1f} MiB more than planned)"
                            if below is not None else "")
                         + "; raise max_bytes, or capture smaller sizes (capture_sizes=...)")

    def check(self, runners: Sequence[Any]) -> None:
        """Raises ValueError unless the plan was made for runners of these names and sizes, each size holding
        the same requests and tokens (`counts`, where the plan has them).

        Args:
            runners: the runners a budget is planned for (GraphRunners, or anything with a `spec`).
        """
        given = {r.spec.name: list(r.spec.capture_sizes) for r in runners}
        if given != self.sizes:
            raise ValueError(f"the plan was made for runners (name: sizes) {self.sizes}, not {given}: make it with "
                             "gr.dry_run(build) where build() makes runners like these, with a stand-in for the "
                             "big buffers")
        if not self.counts:
            return
        counts = size_counts([r.spec for r in runners])
        differ = [f"size {size}{f' of {name!r}' if name else ''}: {planned} planned, {counts[name][size]} here"
                  for name, sizes in self.counts.items() for size, planned in sorted(sizes.items())
                  if counts.get(name, {}).get(size) != planned]
        if differ:
            raise ValueError("the plan was made for sizes holding other (requests, tokens) than these runners' ("
                             + "; ".join(differ) + "; a ragged runner's max_requests, a uniform one's "
                             "tokens_per_request): make it with gr.dry_run(build) where build() makes runners like "
                             "these, with a stand-in for the big buffers")

    def summary(self) -> str:
        """One line: the bytes, their split, and the smallest ladder's."""
        pool = self.pool
        text = f"dry run: {pool.graphs} graphs would take {self.bytes / MiB:.1f} MiB (accounted: {pool.split()[1:]}"
        if self.ladder:
            text += f"; sizes up to {self.smallest_limit} alone {self.bytes_for(self.smallest_limit) / MiB:.1f} MiB"
        if self.leftover_bytes:
            text += f"; {self.leftover_bytes / MiB:.1f} MiB of its own not back after it"
        return text + f" ({self.seconds:.2f} s)"

    def to_dict(self) -> dict:
        """The plan as plain data (for JSON)."""
        return {"bytes": self.bytes, "ladder": {str(k): v for k, v in sorted(self.ladder.items())},
                "measured_bytes": self.measured_bytes, "leftover_bytes": self.leftover_bytes,
                "seconds": self.seconds, "sizes": self.sizes,
                "counts": {name: {str(k): list(v) for k, v in sorted(c.items())} for name, c in self.counts.items()},
                "pool": self.pool.to_dict()}

    def _smallest_sizes(self) -> str:
        limit = self.smallest_limit
        return "; ".join(f"sizes {', '.join(str(s) for s in sizes if s <= limit)}{f' of {name!r}' if name else ''}"
                         for name, sizes in self.sizes.items())


def measure(runners: Sequence[Any], capture_all: Callable[..., List[CaptureReport]], ladder: bool) -> CapturePlan:
    """The dry run's measurement (graphrunner.runner.dry_run builds and checks the runners, then calls it): the
    fall of the driver's free memory across capture_all(*runners), each shorter ladder's bytes with `ladder`, and
    what is left behind once the runners are closed. Closes them.

    Args:
        runners: unarmed runners to capture together.
        capture_all: graphrunner.runner.capture_all (passed in: this module never imports the runner).
        ladder: also measure every shorter ladder's bytes.
    """
    start = time.perf_counter()
    device = runners[0].device
    specs = [r.spec for r in runners]
    try:
        free_before = _settled_free(device)
        reports = capture_all(*runners)
        measured = reports[0].driver_bytes
        pools = _pool_ladder(runners, _limits(specs)) if ladder else {}
        for r in runners:
            r.close()
        # Still referenced, the runners' fn and build()'s stand-ins stay allocated: only the capture's own bytes
        # can be missing here.
        leftover = free_before - _settled_free(device)
    finally:
        for r in runners:
            r.close()
    plan = CapturePlan(measured - max(leftover, 0), reports, measured_bytes=measured, leftover_bytes=leftover,
                       counts=size_counts(specs))
    if pools:
        plan.ladder = _ladder(specs, plan, pools)
    plan.seconds = time.perf_counter() - start
    if distributed.is_rank_zero():
        logger.info("graphrunner: %s", plan.summary())
    return plan


def check_budget(max_bytes: Any, plan: Any, runners: Sequence[Any]) -> Optional[int]:
    """capture_all's checks of max_bytes and plan, before anything is captured; returns the largest size the
    plan fits in the budget (None without a plan or without a budget).

    Args:
        max_bytes: the budget in bytes: None, or a positive int.
        plan: None, or a CapturePlan of the same runners.
        runners: the runners to capture.
    """
    if max_bytes is None:
        if plan is not None:
            raise ValueError("capture_all(plan=...) plans a budget: pass max_bytes too (without one every size is "
                             "captured)")
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be a positive int (bytes), got {type(max_bytes).__name__} {max_bytes!r}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int (bytes), got {max_bytes}")
    if plan is None:
        return None
    if not isinstance(plan, CapturePlan):
        raise TypeError(f"plan must be a gr.CapturePlan (from gr.dry_run), got {type(plan).__name__}")
    plan.check(runners)
    return plan.fit(max_bytes)


def capture_within(runners: Sequence[Any], pool: Any, max_bytes: int,
                   plan: CapturePlan) -> List[CaptureRecord]:
    """Captures the runners keeping the sizes that fit in `max_bytes`, the largest dropped first; returns their
    records (capture_all arms the runners on them).

    Policy: every runner keeps its sizes up to one limit, the largest whose predicted bytes (`plan.bytes_for`)
    fit; the sizes above it are dropped, from every runner. Each runner is rebuilt on its kept sizes before
    capture (its spec, size table and checker: `runner.capture_sizes` lists the kept sizes, and its
    max_batch_size becomes the largest kept one), while the batches up to the max_batch_size it was built with
    stay the runner's: those above the largest kept size run eagerly (`size_for` gives 0), whatever fallback
    says. The capture is then measured as dry_run measures (the report's driver_bytes); if it took more than
    max_bytes after all (a plan made elsewhere, other processes on the GPU), its graphs are destroyed and the next
    smaller limit is captured, with the plan corrected by what it missed, so the capture that is kept never
    exceeds the budget.

    Args:
        runners: the runners to capture together.
        pool: their pool id.
        max_bytes: the budget, checked (check_budget).
        plan: the dry run's plan of these runners (capture_all makes one where the caller passed none).
    """
    originals = [r.spec for r in runners]
    ranks = distributed.agreement(originals[0].collective_timeout_s)
    missed = 0
    limit = _agreed_limit(ranks, plan.fit(max_bytes))
    try:
        while True:
            for runner, spec in zip(runners, originals):
                keep_sizes(runner, spec, [s for s in spec.capture_sizes if s <= limit])
            dropped = [[s for s in spec.capture_sizes if s > limit] for spec in originals]
            try:
                return capture([Capture(r.spec, r._checker, r.sizes) for r in runners], pool,
                               budget=max_bytes, dropped=dropped)
            except OverBudget as over:
                missed = max(missed, over.measured - plan.bytes_for(limit))
                logger.warning("graphrunner: the capture of sizes up to %d took %.1f MiB, over the budget of %.1f "
                               "MiB (%.1f MiB more than planned); capturing fewer sizes", limit,
                               over.measured / MiB, max_bytes / MiB, missed / MiB)
                limit = _agreed_limit(ranks, plan.fit(max_bytes - missed, below=limit))
    except BaseException:
        for runner, spec in zip(runners, originals):
            keep_sizes(runner, spec, list(spec.capture_sizes))
        raise


def keep_sizes(runner: Any, spec: RunnerSpec, kept: List[int]) -> None:
    """Rebuilds an unarmed runner on `kept`, some of `spec`'s capture sizes (all of them: the runner as `spec`
    made it). Batches up to spec.max_batch_size stay the runner's: its size table keeps that bound, so those above
    the largest kept size run eagerly.

    Args:
        runner: the runner (unarmed).
        spec: the spec it was built with.
        kept: the sizes to keep, ascending, at least one.
    """
    if kept == list(spec.capture_sizes):
        runner._setup(spec)
        return
    requests = {s: spec.max_requests[s] for s in kept} if spec.ragged else None
    smaller = dataclasses.replace(spec, capture_sizes=kept, max_batch_size=None, max_requests=requests)
    runner._setup(smaller, max_size=spec.max_batch_size)


def size_counts(specs: Sequence[RunnerSpec]) -> Dict[str, Dict[int, Tuple[int, int]]]:
    """Runner name -> {size: (requests, tokens)}: what each captured size of these runners holds.

    Args:
        specs: the runners' specs.
    """
    return {spec.name: {size: (spec.requests_of(size), spec.tokens_of(size)) for size in spec.capture_sizes}
            for spec in specs}


def _agreed_limit(ranks: distributed.Agreement, limit: int) -> int:
    """Every rank captures the same sizes (their graphs may hold collectives): the smallest rank's limit."""
    return min(ranks.exchange("the capture budget's largest size", value=limit))


def _settled_free(device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def _limits(specs: Sequence[RunnerSpec]) -> List[int]:
    """The limits a ladder has an entry for: every captured size at which every runner keeps one."""
    smallest = max(min(spec.capture_sizes) for spec in specs)
    return sorted({s for spec in specs for s in spec.capture_sizes if s >= smallest})


def _ladder(specs: Sequence[RunnerSpec], plan: CapturePlan, pools: Dict[int, int]) -> Dict[int, int]:
    """limit -> the predicted bytes of capturing every runner's sizes up to limit: the plan's bytes less what the
    dropped sizes add: the pool they need beyond the kept ones (`pools`: each limit's pool, measured eagerly), their
    static rows, and the new device memory of their executables (none where the memory the driver kept from the
    dry run's executables, counted in its leftover, holds them). First-use bytes stay at every limit: a one-time
    cost, which the next kept size pays where the size that paid it is dropped; so do other bytes, which no size
    pays."""
    limits = sorted(pools)
    full = limits[-1]
    exec_bytes = [{s.size: s.exec_bytes for s in report.sizes} for report in plan.reports]
    retained = min(max(plan.leftover_bytes, 0), sum(sum(e.values()) for e in exec_bytes))

    def kept_bytes(limit: int) -> Tuple[int, int]:
        """Static input rows of every runner's sizes up to limit, and the new memory of their executables."""
        static, execs = 0, 0
        for spec, by_size in zip(specs, exec_bytes):
            kept = [s for s in spec.capture_sizes if s <= limit]
            execs += sum(by_size[s] for s in kept)
            static += static_bytes(spec, max(kept))
        return static, max(0, execs - retained)

    def less(limit: int) -> int:
        """What dropping the sizes above limit saves. Static buffers live in the allocator's 2 MiB segments (of
        other tensors too): only whole segments of their difference are counted, so a prediction never errs low
        by the rounding."""
        static, execs = kept_bytes(limit)
        return (pools[full] - pools[limit]) + (every_static - static) // _SEGMENT * _SEGMENT + (every_execs - execs)

    every_static, every_execs = kept_bytes(full)
    return {limit: plan.bytes - less(limit) for limit in limits}


def static_bytes(spec: RunnerSpec, largest: int) -> int:
    """The bytes of a runner's static input buffers when its largest captured size is `largest`.

    Args:
        spec: the runner's spec.
        largest: its largest kept size.
    """
    return sum(spec.rows(n, largest) * _row_bytes(s) for n, s in spec.inputs.items())


def _row_bytes(s: Any) -> int:
    n = 1
    for d in s.shape:
        n *= d
    return n * torch.empty((), dtype=s.dtype).element_size()


def _pool_ladder(runners: Sequence[Any], limits: List[int]) -> Dict[int, int]:
    """limit -> the bytes a fresh pool grows to when every (size up to limit, runner) pair's step runs eagerly
    in capture order on the capture stream: what the pool of a capture of those sizes needs."""
    specs = [r.spec for r in runners]
    records = [r.record for r in runners]
    device = records[0].device
    stream = capture_stream(device)
    order = capture_order(specs)
    # The capture handed the stream's cuBLAS workspaces to its graphs. The next cuBLAS call on the stream makes
    # new ones, and one made inside a scratch pool would stay cached for the stream and hold that pool: make them
    # first, outside any pool, and free them at the end.
    for spec, record in zip(specs, records):
        _eager_step(spec, record, min(spec.capture_sizes), stream, None)
    out: Dict[int, int] = {}
    try:
        for limit in limits:
            pool = torch.cuda.MemPool()
            for size, i in order:
                if size <= limit:
                    _eager_step(specs[i], records[i], size, stream, pool)
            stream.synchronize()
            out[limit] = _pool_bytes(pool, device)
            del pool
            torch.cuda.empty_cache()
    finally:
        taken = _C.WorkspaceHold()
        taken.take(stream.cuda_stream)
        del taken
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return out


def _eager_step(spec: RunnerSpec, record: CaptureRecord, size: int, stream: torch.cuda.Stream,
                pool: Optional[Any]) -> None:
    """fn at `size` on the static inputs, as its capture runs it (capture_inputs staged, on_capture called), with
    its allocations in `pool` (None: torch's general pool)."""
    _fill_capture_inputs(spec, record, size)
    requests, tokens = spec.requests_of(size), spec.tokens_of(size)
    if spec.on_capture is not None:
        spec.on_capture(StepInfo(requests, requests, tokens, tokens, record.static_views(size)))
    stream.wait_stream(torch.cuda.current_stream(record.device))
    into = torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext()
    with torch.cuda.stream(stream), torch.set_grad_enabled(not spec.no_grad), into:
        out = spec.fn(**record.static_views(size))
        del out


def _pool_bytes(pool: Any, device: torch.device) -> int:
    """The bytes of a pool's segments."""
    return sum(s["total_size"] for s in segments_of(tuple(pool.id), device))

