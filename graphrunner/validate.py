"""`validate()`: replay every graph of one or more runners in random interleaved order on fresh random inputs,
against eager, with the pool scrubbed and guarded on request, and name the size and buffer behind a hazard.

It reads capture records and calls the runners it is given as plain callables; it never imports the runner.

What validation writes: every checked step runs fn twice, once eagerly (the reference) and once as a replay,
on random inputs, so whatever state fn writes as it runs is written twice per step: a KV cache's rows at the
drawn positions, a position counter advanced (Hugging Face's StaticCache counts each call), the runners'
state buffers. The capture's warm-up (GraphRunner(warmup=...)) runs fn that many times more before capture,
on the static buffers' pad values. Nothing of this is undone afterwards: reset such state before real steps
(StaticCache.reset(), a counter re-seeded, the cache refilled by a prefill). With `restore_state=True` the
runner's state buffers (RunnerSpec.state_buffers) are put back after each eager step, so the replay starts
from the state the eager step started from: needed where fn advances state of its own on each call, since
the two runs would otherwise differ by a step. With `eager_at="size"` the eager step runs on the inputs
padded to the captured size, as the graph does, for steps that only run at their captured sizes (a cache
built for one batch), and only the step's own rows are compared.

A piecewise size's scrubbed or guarded step is checked around each segment and each break op, which runs
checked in the runner's armed list of breaks for that step only (graphrunner.break_checks, Note [checked
breaks]): an op that leaves its out= boundary buffer unwritten, or writes outside it, is named with the op, the
size and the buffer.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from graphrunner import distributed
from graphrunner.break_checks import ArmedBreak, BreakChecks
from graphrunner.errors import STATE_FIX, WRITE_FIX, GraphHazardError
from graphrunner.testing import default_rtol, poison, random_inputs, random_ragged_inputs, relative_error
from graphrunner.pool_view import PoolView
from graphrunner.inputs import StaticInput
from graphrunner.outputs import clone_tensors, named_tensors
from graphrunner.pool import Block
from graphrunner.record import CaptureRecord

logger = logging.getLogger("graphrunner")

# make_inputs(batch, generator) for a uniform runner; make_inputs(tokens, requests, generator) for a ragged one.
MakeInputs = Callable[..., Dict[str, torch.Tensor]]
EAGER_AT = ("batch", "size")
Snapshot = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Target:
    """One runner as validation sees it.

    Attributes:
        record: its capture record.
        step: the runner itself: step(**inputs) runs one step through the graphs.
        reference: the eager step: reference(**inputs) gives what step should give.
        inputs: its input specs, for drawing random inputs.
        tokens_per_request: rows per request of its per-token inputs.
        make_inputs: make_inputs(batch, generator) (uniform) or make_inputs(tokens, requests, generator)
            (ragged) draws one step's inputs instead, where inputs depend on each other (distinct pages per
            row, say); None draws each input alone from its spec.
        split: a ragged runner's split input (its sizes count tokens), or None.
        pieces: the runner's armed breaks, the list its native step reads (item s: size s's [(op, args, kwargs)],
            or None), or None for a runner with no piecewise size: a scrubbed or guarded step at a piecewise size
            runs with checked ops in place of size s's for that step (graphrunner.break_checks).
    """

    record: CaptureRecord
    step: Callable[..., Any]
    reference: Callable[..., Any]
    inputs: Mapping[str, StaticInput]
    tokens_per_request: int = 1
    make_inputs: Optional[MakeInputs] = None
    split: Optional[str] = None
    pieces: Optional[List[Optional[List[ArmedBreak]]]] = None

    def draw(self, size: int, smaller: int, order: random.Random,
             gen: torch.Generator) -> Tuple[str, int, Dict[str, torch.Tensor]]:
        """A random step that runs at `size` (the next smaller captured size is `smaller`, 0 for none): how
        messages name it, its requests, and its inputs. A ragged step has more tokens than `smaller` holds and
        a random mixture of prefill and decode requests."""
        if self.split is None:
            batch = order.randint(smaller + 1, size)
            inputs = self.make_inputs(batch, gen) if self.make_inputs is not None else \
                random_inputs(self.inputs, batch, gen, self.tokens_per_request)
            return f"batch {batch}", batch, inputs
        rows = self.record.rows[size]
        tokens = order.randint(smaller + 1, size)
        requests = order.randint(1, min(rows[self.split], tokens))
        inputs = self.make_inputs(tokens, requests, gen) if self.make_inputs is not None else \
            random_ragged_inputs(self.inputs, self.split, tokens, requests, gen)
        return f"{requests} requests, {tokens} tokens", requests, inputs


@dataclass
class ValidationReport:
    """What `validate()` checked.

    Attributes:
        replays: replays checked against eager.
        seconds: wall time.
        scrub: whether free pool memory was scrubbed before each replay.
        guard: whether writes outside each graph's own memory were checked.
        max_error: the worst relative error per (runner name, size).
    """

    replays: int = 0
    seconds: float = 0.0
    scrub: bool = False
    guard: bool = False
    max_error: Dict[Tuple[str, int], float] = field(default_factory=dict)

    def __str__(self) -> str:
        worst = max(self.max_error.values(), default=0.0)
        return (f"validated {len(self.max_error)} graphs in {self.replays} replays, {self.seconds:.2f} s "
                f"(scrub={self.scrub}, guard={self.guard}), worst relative error {worst:.2e}")


def validate(targets: Sequence[Target], steps_per_size: int = 2, scrub: bool = False, guard: bool = False,
             seed: int = 0, rtol: Optional[float] = None, collective_timeout_s: float = 300.0,
             eager_at: str = "batch", restore_state: bool = False) -> ValidationReport:
    """Replays every size of every target `steps_per_size` times in one shuffled order (see GraphRunner.validate).

    Args:
        targets: the runners, all in one pool.
        steps_per_size: replays per captured size.
        scrub: scrub free pool memory (and other graphs' kept-alive allocations) before each replay, and at a
            piecewise size poison each break op's out= before the op (graphrunner.break_checks).
        guard: fail on any write outside the replaying graph's own memory, and at a piecewise size check after
            each segment and around each break op.
        seed: seeds the order, the batches and the inputs.
        rtol: the relative error accepted for every output; None: by dtype (checks.default_rtol).
        collective_timeout_s: in a distributed run, how long a step waits for the other ranks' outcome.
        eager_at: "batch" runs the eager reference on the step's own batch; "size" on its inputs padded to the
            captured size (each input's pad value in the padding rows), comparing the step's rows only.
        restore_state: put each target's state buffers back after its eager reference step, so the replay
            starts from the same state.
    """
    if eager_at not in EAGER_AT:
        raise ValueError(f"eager_at must be 'batch' (eager on the step's batch) or 'size' (eager on the batch padded "
                         f"to the captured size), got {eager_at!r}")
    order = random.Random(seed)
    device = targets[0].record.device
    gen = torch.Generator(device=device).manual_seed(seed)
    schedule = [(t, size) for t in targets for size in sorted(t.record.entries) for _ in range(steps_per_size)]
    order.shuffle(schedule)
    view = PoolView([t.record for t in targets]) if (scrub or guard) else None
    report = ValidationReport(scrub=scrub, guard=guard)
    # In a distributed run every rank replays the same schedule (same seed), and each step ends with every
    # rank's outcome: a hazard on one rank stops all of them, instead of leaving the others waiting in the next
    # graph's collectives. For the same reason the buffer is not bisected there (see _mismatch).
    ranks = distributed.agreement(collective_timeout_s)
    start = time.perf_counter()
    with torch.cuda.device(device):
        for i, (target, size) in enumerate(schedule):
            smaller = max((s for s in target.record.entries if s < size), default=0)
            step, batch, inputs = target.draw(size, smaller, order, gen)
            with ranks.phase(f"validate step {i} ({target.record.label(size)}, {step})"):
                errors = _checked_replay(target, view, size, batch, inputs, scrub, guard, rtol, ranks.world == 1,
                                         eager_at, restore_state)
            report.replays += 1
            key = (target.record.name, size)
            report.max_error[key] = max([report.max_error.get(key, 0.0), *errors.values()])
    report.seconds = time.perf_counter() - start
    logger.info("graphrunner: %s", report)
    return report


def padded_inputs(inputs: Dict[str, torch.Tensor], specs: Mapping[str, StaticInput],
                  rows: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """A step's inputs padded as the graph of a size sees them: each input to `rows[name]` rows, the padding
    rows holding its StaticInput's pad value.

    Args:
        inputs: the step's inputs, the batch (or its tokens) in dim 0.
        specs: each input's StaticInput.
        rows: the rows each input has at the captured size (CaptureRecord.rows[size]).
    """
    out = {}
    for name, t in inputs.items():
        missing = rows[name] - t.shape[0]
        if missing <= 0:
            out[name] = t
            continue
        pad = torch.full((missing, *t.shape[1:]), specs[name].pad, dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, pad])
    return out


def step_rows(padded: Any, got: Any) -> Any:
    """The padded eager step's outputs cut to the rows the replay returned (a 0-d output stays whole)."""
    rows = {name: t.shape[0] for name, t in named_tensors(got).items() if t.dim()}
    return {name: t[: rows[name]] if name in rows else t for name, t in named_tensors(padded).items()}


def _snapshot(state: Mapping[str, torch.Tensor]) -> Snapshot:
    """Copies of state buffers (one per distinct tensor), to put back with _restore."""
    unique = {id(t): t for t in state.values()}
    return [(t, t.clone()) for t in unique.values()]


def _restore(snapshot: Optional[Snapshot]) -> None:
    for t, copy in snapshot or ():
        t.copy_(copy)


def _replay(target: Target, view: Optional[PoolView], size: int, inputs: Dict[str, torch.Tensor],
            scrub: List[Block], guard: bool = False, state: Optional[Snapshot] = None,
            breaks: Optional[BreakChecks] = None) -> Tuple[Any, Optional[list]]:
    """One replay: put the state back, poison this size's outputs, scrub, copy what must not change, run (a
    piecewise size's breaks checked, with `breaks`), wait."""
    _restore(state)
    for t in named_tensors(target.record.entries[size].outputs).values():
        poison(t)
    if view is not None:
        view.scrub(scrub)
    copies = view.guarded(target.record, size) if guard else None
    with breaks.checking(copies) if breaks is not None else contextlib.nullcontext():
        out = target.step(**inputs)
    torch.cuda.synchronize(target.record.device)
    return out, copies


def _checked_replay(target: Target, view: Optional[PoolView], size: int, batch: int, inputs: Dict[str, torch.Tensor],
                    scrub: bool, guard: bool, rtol: Optional[float], bisect: bool, eager_at: str = "batch",
                    restore_state: bool = False) -> Dict[str, float]:
    """One validated replay against eager; returns each output's error, or raises GraphHazardError."""
    state = _snapshot(target.record.state_buffers) if restore_state else None
    whose = target.record.describe(size)
    padded = eager_at == "size"
    eager_inputs = padded_inputs(inputs, target.inputs, target.record.rows[size]) if padded else inputs
    try:
        expected = clone_tensors(target.reference(**eager_inputs))
    except Exception as exc:
        if padded or batch >= size:
            raise
        raise RuntimeError(
            f"validate()'s eager reference step failed at batch {batch} (the graph of {target.record.label(size)} "
            f"runs it padded to {size}): {type(exc).__name__}: {exc}. A step that only runs at its captured sizes "
            "(a cache built for one batch) is compared at the padded size: validate(eager_at='size').") from exc
    targets = view.scrub_targets((target.record.name, size)) if scrub else []
    breaks = target.record.entries[size].breaks
    checks = BreakChecks(target.record, view, size, batch, scrub, guard, target.pieces[size]) \
        if view is not None and breaks and target.pieces is not None else None
    try:
        out, copies = _replay(target, view, size, inputs, targets, guard, state, checks)
    except GraphHazardError:  # a break op or a segment before it, named by the checks around the breaks
        raise
    except RuntimeError as exc:
        raise GraphHazardError(
            f"{whose} (batch {batch}) failed on replay: {exc}. Either {WRITE_FIX}; or {STATE_FIX}. This process's "
            "CUDA context may be lost: validate(isolate=True) runs the check in a child process instead.",
            size=size, runner=target.record.name) from exc
    if guard:  # the whole graph, or a piecewise size's last segment (the checks looked after those before it)
        view.check_guarded(copies, target.record, size, batch, segment=len(breaks) if checks is not None else None)
    got = named_tensors(out)
    want = step_rows(expected, out) if padded else named_tensors(expected)
    errors = {name: relative_error(got[name], w) for name, w in want.items()}
    tol = {name: rtol if rtol is not None else default_rtol(w.dtype) for name, w in want.items()}
    bad = {name: e for name, e in errors.items() if not e <= tol[name]}
    if bad:
        raise _mismatch(target, view, size, batch, inputs, tol, bad, targets, bisect, state)
    return errors


def _blame(target: Target, view: PoolView, size: int, inputs: Dict[str, torch.Tensor],
           blocks: List[Block], state: Optional[Snapshot] = None) -> Optional[Block]:
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
            outs.append(named_tensors(clone_tensors(_replay(target, view, size, inputs, [], state=state)[0])))
        return any(not torch.equal(a.view(torch.uint8), outs[1][k].view(torch.uint8)) for k, a in outs[0].items())

    def bisect(candidates: List[Block]) -> Optional[Block]:
        while len(candidates) > 1:
            half = candidates[: len(candidates) // 2]
            candidates = half if reads(half) else candidates[len(candidates) // 2:]
        return candidates[0] if candidates and reads(candidates) else None

    culprit = bisect(blocks)
    if culprit is None or culprit.owner is not None:
        return culprit
    mine = view.footprints[(target.record.name, size)]
    inside = [Block(b.address, b.size, b.kind, b.owner,
                    f"the {b.size}-byte buffer that the capture of size {size} allocated (its allocation {i + 1} of "
                    f"{len(mine)})")
              for i, b in enumerate(mine) if culprit.holds(b.address)]
    return bisect(inside) or culprit


def _mismatch(target: Target, view: Optional[PoolView], size: int, batch: int, inputs: Dict[str, torch.Tensor],
              tol: Dict[str, float], bad: Dict[str, float], targets: List[Block], bisect: bool,
              state: Optional[Snapshot] = None) -> GraphHazardError:
    name, err = next(iter(bad.items()))
    head = (f"{target.record.describe(size)} (batch {batch}) gives {name} with relative error {err:.3g} against "
            f"eager (tolerance {tol[name]:.1g})")
    if view is not None and targets and not bisect:
        return GraphHazardError(
            f"{head} with the pool's free memory scrubbed. The buffer is not bisected in a distributed run: that "
            "takes replays on this rank alone, whose collectives the other ranks would never join; validate a "
            f"world of one to name it. Likely {STATE_FIX}.", size=size, buffer=name)
    if view is not None and targets:
        culprit = _blame(target, view, size, inputs, targets, state)
        if culprit is not None:
            return GraphHazardError(f"{head}: it reads {culprit.describe()}, which it did not write in its own "
                                    f"replay. {STATE_FIX}.", size=size, buffer=culprit.label)
    restore = "" if state is not None else (
        "; if fn advances state of its own on each call (a KV cache's position counter, a ring buffer), "
        "validate(restore_state=True) runs the replay from the state the eager step started from")
    return GraphHazardError(f"{head}, with the pool's free memory left as it was. Check that fn gives the same "
                            "rows for a batch whether or not it is padded (padding rows must not mix into real "
                            f"rows), and that it draws no random numbers{restore}; or {STATE_FIX}.", size=size,
                            buffer=name)
