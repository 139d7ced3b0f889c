"""Finding shared-pool hazards at start-up, and naming the size and buffer behind each.

All graphs of a runner share one pool, so a graph that writes past a buffer, or reads memory it expects
to keep its contents between replays, corrupts or depends on memory another size owns. Such bugs show
up far from their cause, or not at all, depending on which size ran last. This module makes them
deterministic:

- the capture guard lists allocations made inside a capture that outlive it without being outputs;
- scrub fills the pool's free memory, and other sizes' kept-alive capture allocations, with a pattern
  that reads as NaN in every float type and as INT_MAX in int32, before each replay;
- guard copies every block another size owns (its outputs) and the static input rows past the padded
  size before each replay, and names the first byte that changed after it.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from graphrunner import distributed
from graphrunner.memory import raw_bytes
from graphrunner.outputs import clone_tensors, named_tensors

if TYPE_CHECKING:
    from graphrunner.runner import GraphRunner, StaticInput

logger = logging.getLogger("graphrunner")

SCRUB_WORD = 0x7FFFFFFF  # NaN as float32/float64 words and bf16/fp16 halves; INT_MAX as int32
WRITE_FIX = ("an op writes past a buffer it allocated, typically per-batch metadata (page table, KV indices, "
             "top-k rows) sized for fewer rows than its kernel writes: size it for the padded batch, or allocate "
             "it once with gr.workspace()")
STATE_FIX = ("a kernel reads state it expects to persist between replays (a counter reset on exit, a table "
             "computed once) from memory allocated inside the capture, which other sizes reuse: keep such state "
             "in gr.workspace(name, nbytes, zero=..., init=...), made before capture")


class GraphHazardError(RuntimeError):
    """A captured graph is unsafe in the shared pool; the message names the size, the buffer and a fix."""

    def __init__(self, message: str, size: Optional[int] = None, buffer: Optional[str] = None,
                 offset: Optional[int] = None) -> None:
        super().__init__(message)
        self.size, self.buffer, self.offset = size, buffer, offset


class CaptureGuardWarning(UserWarning):
    """A capture left an allocation alive in the shared pool (GraphRunner(strict=True) raises instead)."""


@dataclass
class Block:
    address: int
    size: int
    owner: Optional[int] = None  # the size whose capture made it, for live blocks
    label: str = "free pool memory"

    def describe(self) -> str:
        return f"{self.label} (block 0x{self.address:x}, {self.size} bytes)"


def pool_blocks(pool: Tuple[int, int], device: torch.device) -> List[dict]:
    """The pool's blocks from the allocator's snapshot: dicts with address, size and state."""
    blocks = []
    for seg in torch.cuda.memory_snapshot(mempool_id=pool, include_traces=False):
        if seg.get("device", device.index) != device.index or tuple(seg["segment_pool_id"]) != tuple(pool):
            continue
        address = seg["address"]
        for b in seg["blocks"]:
            blocks.append({"address": b.get("address", address), "size": b["size"], "state": b["state"],
                           "frames": b.get("frames", [])})
            address = b.get("address", address) + b["size"]
    return blocks


def _storage_span(t: torch.Tensor) -> Tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _format_frames(frames: List[dict]) -> str:
    picked = [f for f in frames if f.get("filename", "").endswith(".py")][:6]
    return "".join(f"\n      {f['filename']}:{f['line']} in {f['name']}" for f in picked)


class CaptureGuard:
    """Lists allocations a capture leaves alive that are not its outputs (kept-alive caches).

    Cheap by default: it compares allocated bytes before and after the capture, and takes an allocator
    snapshot only when they differ. debug=True records Python stacks during capture.
    """

    def __init__(self, runner: "GraphRunner", strict: bool = False, debug: bool = False) -> None:
        self.runner, self.strict, self.debug = runner, strict, debug
        runner.kept_alive = {}

    @contextlib.contextmanager
    def watch(self, size: int) -> Iterator[None]:
        device = self.runner.device
        if self.debug:
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python")
        before = torch.cuda.memory_allocated(device)
        try:
            yield
        finally:
            if self.debug:
                torch.cuda.memory._record_memory_history(enabled=None)
        # The runner has already given the outputs' blocks back (it keeps aliases), so what is still
        # allocated was kept alive by something else.
        if torch.cuda.memory_allocated(device) > before or self.debug:
            self._report(size)

    def _report(self, size: int) -> None:
        found = []
        for b in pool_blocks(self.runner.pool, self.runner.device):
            if b["state"] != "inactive" and b["address"] not in self.runner.kept_alive:
                label = f"allocation kept alive after the capture of size {size}"
                self.runner.kept_alive[b["address"]] = Block(b["address"], b["size"], size, label)
                found.append(f"  {b['size']} bytes at 0x{b['address']:x}{_format_frames(b['frames'])}")
        if not found:
            return
        message = (f"capture of size {size} left {len(found)} allocation(s) alive in the shared pool that are not "
                   "outputs: a buffer cached across calls and first allocated inside a capture. Other sizes reuse "
                   "it, and only this size's graph ever fills it. " + STATE_FIX + ".\n" + "\n".join(found) +
                   ("" if self.debug else "\n  (GraphRunner(debug=True) shows the Python stack of each)"))
        if self.strict:
            raise GraphHazardError(message, size=size, buffer="kept-alive allocation")
        warnings.warn(message, CaptureGuardWarning, stacklevel=2)


@dataclass
class ValidationReport:
    replays: int = 0
    seconds: float = 0.0
    scrub: bool = False
    guard: bool = False
    max_error: Dict[int, float] = field(default_factory=dict)

    def __str__(self) -> str:
        worst = max(self.max_error.values(), default=0.0)
        return (f"validated {len(self.max_error)} sizes in {self.replays} replays, {self.seconds:.2f} s "
                f"(scrub={self.scrub}, guard={self.guard}), worst relative error {worst:.2e}")


def random_inputs(inputs: Dict[str, "StaticInput"], batch: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Fresh inputs for one step on gen's device, each drawn from its StaticInput's range."""
    out = {}
    for name, spec in inputs.items():
        shape = (batch, *spec.shape)
        if spec.dtype.is_floating_point:
            if spec.high is None:
                t = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
            else:
                t = torch.rand(shape, generator=gen, device=gen.device) * (spec.high - spec.low) + spec.low
            out[name] = t.to(spec.dtype)
        else:
            high = spec.high if spec.high is not None else spec.low + 2
            out[name] = torch.randint(int(spec.low), int(high), shape, generator=gen, device=gen.device,
                                      dtype=torch.int64).to(spec.dtype)
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    if not want.dtype.is_floating_point:
        return 0.0 if torch.equal(got, want) else float("inf")
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all() and not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def default_rtol(dtype: torch.dtype) -> float:
    if not dtype.is_floating_point:
        return 0.0
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def poison(t: torch.Tensor) -> None:
    """Fills a tensor's bytes with the scrub pattern, so an output the graph fails to write is seen."""
    storage = t.untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
    (raw.view(torch.int32).fill_(SCRUB_WORD) if raw.numel() % 4 == 0 else raw.fill_(0x7F))


class PoolView:
    """Who owns what in a runner's pool, and the scrub and guard around one replay."""

    def __init__(self, runner: "GraphRunner") -> None:
        self.runner = runner
        self.outputs: List[Block] = []
        for size, out in runner.outputs.items():
            for name, t in named_tensors(out).items():
                address, nbytes = _storage_span(t)
                self.outputs.append(Block(address, nbytes, size, f"{name} of size {size}"))
        self.footprints = {size: graph.footprint for size, graph in runner.graphs.items()}

    def scrub_targets(self, size: int) -> List[Block]:
        """Free pool memory, plus other sizes' kept-alive allocations."""
        free = [Block(b["address"], b["size"]) for b in pool_blocks(self.runner.pool, self.runner.device)
                if b["state"] == "inactive"]
        return free + [b for b in self.runner.kept_alive.values() if b.owner != size]

    def scrub(self, blocks: List[Block], word: int = SCRUB_WORD) -> None:
        for b in blocks:
            raw = raw_bytes(b.address, b.size, self.runner.device)
            raw[: b.size // 4 * 4].view(torch.int32).fill_(word)

    def owner(self, address: int, writer: int) -> Tuple[Block, int]:
        """The block holding `address` (another size's output or kept-alive allocation, memory another size
        uses for intermediates, or free pool memory) and the offset into it."""
        for b in self.outputs + list(self.runner.kept_alive.values()):
            if b.owner != writer and b.address <= address < b.address + b.size:
                return b, address - b.address
        for size, ranges in self.footprints.items():
            for start, nbytes in ranges:
                if size != writer and start <= address < start + nbytes:
                    return Block(start, nbytes, size, f"memory the graph of size {size} allocated"), address - start
        return Block(address, 1), 0

    def guarded(self, size: int) -> List[Tuple[Block, torch.Tensor]]:
        """Copies of the whole pool and of the static input rows past `size`, taken just before its replay."""
        copies = []
        for seg in torch.cuda.memory_snapshot(mempool_id=self.runner.pool, include_traces=False):
            if tuple(seg["segment_pool_id"]) == tuple(self.runner.pool):
                block = Block(seg["address"], seg["total_size"], None, "pool segment")
                copies.append((block, raw_bytes(block.address, block.size, self.runner.device).clone()))
        for name, buf in self.runner.static_inputs.items():
            rows = buf[size:]
            if rows.numel():
                nbytes = rows.numel() * rows.element_size()
                block = Block(rows.data_ptr(), nbytes, None, f"static input {name!r} rows {size}..{buf.shape[0] - 1}")
                copies.append((block, raw_bytes(block.address, nbytes, self.runner.device).clone()))
        return copies

    def check_guarded(self, copies: List[Tuple[Block, torch.Tensor]], size: int, batch: int) -> None:
        """Any byte changed outside what the graph of `size` allocated during its capture is an out-of-bounds
        write (its own footprint may hold other sizes' outputs: largest-first sharing puts them there)."""
        for block, before in copies:
            changed = raw_bytes(block.address, block.size, self.runner.device) != before
            if block.label == "pool segment":
                for start, nbytes in self.footprints[size]:
                    lo, hi = max(start, block.address), min(start + nbytes, block.address + block.size)
                    if lo < hi:
                        changed[lo - block.address: hi - block.address] = False
            first = changed.nonzero()
            if not first.numel():
                continue
            address = block.address + int(first[0])
            hit, offset = (self.owner(address, size) if block.label == "pool segment"
                           else (block, address - block.address))
            raise GraphHazardError(
                f"the graph of size {size} (batch {batch}) wrote out of bounds into {hit.describe()} at byte "
                f"offset {offset} ({first.numel()} bytes changed), memory its capture never allocated: {WRITE_FIX}.",
                size=size, buffer=hit.label, offset=offset)


def _step(runner: "GraphRunner", view: Optional[PoolView], size: int, inputs: Dict[str, torch.Tensor],
          scrub: List[Block], guard: bool = False) -> Tuple[Any, Optional[list]]:
    """One checked replay: poison this size's outputs, scrub, copy what must not change, run, wait."""
    for t in named_tensors(runner.outputs[size]).values():
        poison(t)
    if view is not None:
        view.scrub(scrub)
    copies = view.guarded(size) if guard else None
    out = runner(**inputs)
    torch.cuda.synchronize(runner.device)
    return out, copies


def _errors(out: Any, expected: Any) -> Dict[str, float]:
    got = named_tensors(out)
    return {name: relative_error(got[name], want) for name, want in named_tensors(expected).items()}


def _blame(runner: "GraphRunner", view: PoolView, size: int, inputs: Dict[str, torch.Tensor],
           blocks: List[Block]) -> Optional[Block]:
    """Bisects the scrubbed memory down to the buffer the graph reads before writing: first the pool block,
    then, inside free memory, the allocation this size's capture made there. A subset is read if filling it
    with two different patterns changes the output (scrubbed state persists, so "fails with the subset
    scrubbed" would not be a clean test)."""
    def reads(subset: List[Block]) -> bool:
        outs = []
        for zero_subset in (False, True):
            view.scrub(blocks)  # everything else scrubbed alike, so no stale copy of a result can hide a read
            if zero_subset:
                view.scrub(subset, word=0)
            out = _step(runner, view, size, inputs, [])[0]
            outs.append(named_tensors(clone_tensors(out)))
        return any(not torch.equal(a.view(torch.uint8), outs[1][k].view(torch.uint8)) for k, a in outs[0].items())

    def bisect(candidates: List[Block]) -> Optional[Block]:
        while len(candidates) > 1:
            half = candidates[: len(candidates) // 2]
            candidates = half if reads(half) else candidates[len(candidates) // 2:]
        return candidates[0] if candidates and reads(candidates) else None

    culprit = bisect(blocks)
    if culprit is None or culprit.owner is not None:
        return culprit
    ranges = view.footprints[size]
    inside = [Block(start, nbytes, size, f"the {nbytes}-byte buffer that the capture of size {size} allocated "
                                         f"(its allocation {i + 1} of {len(ranges)})")
              for i, (start, nbytes) in enumerate(ranges)
              if culprit.address <= start < culprit.address + culprit.size]
    return bisect(inside) or culprit


def validate(runner: "GraphRunner", steps_per_size: int = 2, scrub: bool = False, guard: bool = False,
             isolate: bool = False, seed: int = 0, rtol: Optional[float] = None,
             make_inputs: Optional[Callable[[int, torch.Generator], Dict[str, torch.Tensor]]] = None,
             ) -> ValidationReport:
    """See GraphRunner.validate."""
    if isolate:
        from graphrunner.isolate import validate_in_child

        return validate_in_child(runner, steps_per_size=steps_per_size, scrub=scrub, guard=guard, seed=seed,
                                 rtol=rtol, make_inputs=make_inputs)
    if not runner.graphs:
        from graphrunner._native import GraphStateError

        raise GraphStateError("validate() needs captured graphs; call runner.capture() first")
    order = random.Random(seed)
    gen = torch.Generator(device=runner.device).manual_seed(seed)
    schedule = [s for s in runner.capture_sizes for _ in range(steps_per_size)]
    order.shuffle(schedule)
    view = PoolView(runner) if (scrub or guard) else None
    report = ValidationReport(scrub=scrub, guard=guard)
    # In a distributed run every rank replays the same schedule (same seed), and each step ends with every
    # rank's outcome: a hazard on one rank stops all of them, instead of leaving the others waiting in
    # the next graph's collectives. For the same reason the buffer is not bisected there (see _mismatch).
    ranks = distributed.agreement(runner.collective_timeout_s)
    start = time.perf_counter()
    with torch.cuda.device(runner.device):
        for step, size in enumerate(schedule):
            smaller = [s for s in runner.capture_sizes if s < size]
            batch = order.randint((smaller[-1] + 1) if smaller else 1, size)
            inputs = make_inputs(batch, gen) if make_inputs is not None else random_inputs(runner.inputs, batch, gen)
            with ranks.stage(f"validate step {step} (size {size}, batch {batch})"):
                errors = _checked_step(runner, view, size, batch, inputs, scrub, guard, rtol, ranks.world == 1)
            report.replays += 1
            report.max_error[size] = max([report.max_error.get(size, 0.0), *errors.values()])
    report.seconds = time.perf_counter() - start
    logger.info("graphrunner: %s", report)
    return report


def _checked_step(runner: "GraphRunner", view: Optional[PoolView], size: int, batch: int,
                  inputs: Dict[str, torch.Tensor], scrub: bool, guard: bool, rtol: Optional[float],
                  bisect: bool) -> Dict[str, float]:
    """One validated replay against eager; returns each output's error, or raises GraphHazardError."""
    with torch.set_grad_enabled(not runner.no_grad):
        expected = clone_tensors(runner.fn(**inputs))
    targets = view.scrub_targets(size) if scrub else []
    try:
        out, copies = _step(runner, view, size, inputs, targets, guard)
    except RuntimeError as exc:
        raise GraphHazardError(
            f"the graph of size {size} (batch {batch}) failed on replay: {exc}. Either {WRITE_FIX}; or "
            f"{STATE_FIX}. This process's CUDA context may be lost: validate(isolate=True) runs the check "
            "in a child process instead.", size=size) from exc
    if guard:
        view.check_guarded(copies, size, batch)
    errors = _errors(out, expected)
    tol = {name: rtol if rtol is not None else default_rtol(t.dtype) for name, t in named_tensors(expected).items()}
    bad = {name: e for name, e in errors.items() if not e <= tol[name]}
    if bad:
        raise _mismatch(runner, view, size, batch, inputs, tol, bad, targets, bisect)
    return errors


def _mismatch(runner: "GraphRunner", view: Optional[PoolView], size: int, batch: int,
              inputs: Dict[str, torch.Tensor], tol: Dict[str, float], bad: Dict[str, float],
              targets: List[Block], bisect: bool) -> GraphHazardError:
    name, err = next(iter(bad.items()))
    head = (f"the graph of size {size} (batch {batch}) gives {name} with relative error {err:.3g} against eager "
            f"(tolerance {tol[name]:.1g})")
    if view is not None and targets and not bisect:
        return GraphHazardError(
            f"{head} with the pool's free memory scrubbed. The buffer is not bisected in a distributed run: that "
            "takes replays on this rank alone, whose collectives the other ranks would never join; validate a "
            f"world of one to name it. Likely {STATE_FIX}.", size=size, buffer=name)
    if view is not None and targets:
        culprit = _blame(runner, view, size, inputs, targets)
        if culprit is not None:
            return GraphHazardError(f"{head}: it reads {culprit.describe()}, which it did not write in its own "
                                    f"replay. {STATE_FIX}.", size=size, buffer=culprit.label)
    return GraphHazardError(f"{head}, with the pool's free memory left as it was. Check that fn gives the same "
                            "rows for a batch whether or not it is padded (padding rows must not mix into real "
                            f"rows), and that it draws no random numbers; or {STATE_FIX}.", size=size, buffer=name)
