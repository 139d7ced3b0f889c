"""Scrub and guard: who owns what in a pool shared by one or more runners, checked around one replay.

All graphs in a pool share its memory, so a graph that writes past a buffer, or reads memory it expects to
keep its contents between replays, corrupts or depends on memory another graph owns. Such bugs show up far
from their cause, or not at all, depending on which graph ran last. The checks make them deterministic:

- scrub fills the pool's free memory, and other graphs' kept-alive capture allocations, with a pattern that
  reads as NaN in every float type and as INT_MAX in int32, before a replay;
- guard copies every pool segment, the static inputs other graphs read (the running graph's rows past its
  padded size, and every row of other runners' buffers) and the state buffers other runners declared (their
  modules' buffers, out= buffers, keep=) before a replay, and names the first byte that changed outside what
  the running graph's capture allocated, and the writer's buffer that ends where the write starts. Around a
  piecewise size's break op it copies the same memory, the step's own static rows too, and names the first
  byte the op changed outside its out= boundary buffer (graphrunner.break_checks).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from graphrunner.errors import BREAK_WRITE_FIX, WRITE_FIX, GraphHazardError
from graphrunner.memory import raw_bytes
from graphrunner.outputs import named_tensors
from graphrunner.pool import Block, BlockKind, pool_blocks, pool_segments
from graphrunner.record import CaptureRecord
from graphrunner.testing import SCRUB_WORD

Owner = Tuple[str, int]  # (runner name, captured size)


# The caching allocator rounds every block up to a multiple of this: a write past a buffer's end lands at most
# this far from it in the next block.
ALLOCATION_ROUNDING = 512


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The first byte and the length of the memory a tensor (maybe a strided view) covers."""
    if not t.numel():
        return t.data_ptr(), 0
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), (last + 1) * t.element_size()


def _storage_span(t: torch.Tensor) -> Tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class PoolView:
    """Who owns what in the one pool that `records` share.

    Args:
        records: the capture records of every runner in the pool.
    """

    def __init__(self, records: Sequence[CaptureRecord]) -> None:
        self.records = list(records)
        self.pool, self.device = self.records[0].pool, self.records[0].device
        self.owned: List[Block] = []  # other graphs' live memory: outputs and kept-alive allocations
        self.footprints: Dict[Owner, List[Block]] = {}
        for rec in self.records:
            for size, entry in rec.entries.items():
                owner, whose = (rec.name, size), rec.label(size)
                for name, t in named_tensors(entry.outputs).items():
                    address, nbytes = _storage_span(t)
                    self.owned.append(Block(address, nbytes, BlockKind.OUTPUT, owner, f"{name} of {whose}"))
                self.owned.extend(entry.kept_alive)
                self.footprints[owner] = [Block(start, nbytes, BlockKind.FOOTPRINT, owner,
                                                f"memory {rec.describe(size)} allocated")
                                          for start, nbytes in entry.footprint]

    def scrub_targets(self, writer: Owner) -> List[Block]:
        """Free pool memory, plus other graphs' kept-alive allocations."""
        free = [Block(b["address"], b["size"]) for b in pool_blocks(self.pool, self.device) if b["state"] == "inactive"]
        return free + [b for b in self.owned if b.kind is BlockKind.KEPT_ALIVE and b.owner != writer]

    def scrub(self, blocks: List[Block], word: int = SCRUB_WORD) -> None:
        for b in blocks:
            raw = raw_bytes(b.address, b.size, self.device)
            raw[: b.size // 4 * 4].view(torch.int32).fill_(word)

    def owner_of(self, address: int, writer: Owner) -> Tuple[Block, int]:
        """The block holding `address` (another graph's output or kept-alive allocation, memory another graph
        uses for intermediates, or free pool memory) and the offset into it."""
        for b in self.owned:
            if b.owner != writer and b.holds(address):
                return b, address - b.address
        for owner, blocks in self.footprints.items():
            for b in blocks:
                if owner != writer and b.holds(address):
                    return b, address - b.address
        return Block(address, 1), 0

    def guarded(self, record: CaptureRecord, size: int, own_rows: bool = False) -> List[Tuple[Block, torch.Tensor]]:
        """Copies, taken just before the replay of `record`'s graph of `size`, of every pool segment, of the
        static input rows that replay must not touch, and of other runners' state buffers (those it does not
        declare itself: runners may share a module).

        Args:
            record: the runner that replays.
            size: the size it replays.
            own_rows: also copy the rows of record's static inputs that `size` stages (the step's inputs, which a
                break op reads and must not write).
        """
        blocks = pool_segments(self.pool, self.device)
        for rec in self.records:
            for name, buf in rec.static_inputs.items():
                first = (0 if own_rows else rec.rows[size][name]) if rec is record else 0
                rows = buf[first:]
                if rows.numel():
                    label = f"static input {name!r}{rec.of_runner} rows {first}..{buf.shape[0] - 1}"
                    blocks.append(Block(rows.data_ptr(), rows.numel() * rows.element_size(), BlockKind.STATIC_ROWS,
                                        (rec.name, 0), label))
        mine = [_span(t) for t in record.state_buffers.values()]
        seen = set()  # one copy of a buffer two other runners declare
        for rec in self.records:
            if rec is record:
                continue
            for name, t in rec.state_buffers.items():
                address, nbytes = span = _span(t)
                if not nbytes or span in seen or any(a < address + nbytes and address < a + n for a, n in mine):
                    continue
                seen.add(span)
                blocks.append(Block(address, nbytes, BlockKind.STATE, (rec.name, 0), f"{name}{rec.of_runner}"))
        return [(b, raw_bytes(b.address, b.size, self.device).clone()) for b in blocks]

    def overrun(self, record: CaptureRecord, size: int, address: int) -> Optional[Block]:
        """The writer's own memory that ends where a write out of bounds starts (within the allocator's
        512-byte rounding): its state buffers, static inputs, and what its capture allocated."""
        whose = record.of_runner
        mine = [Block(*_span(t), BlockKind.STATE, (record.name, 0), f"{name}{whose}")
                for name, t in record.state_buffers.items()]
        mine += [Block(*_span(t), BlockKind.STATIC_ROWS, (record.name, 0), f"static input {name!r}{whose}")
                 for name, t in record.static_inputs.items()]
        footprint = self.footprints[(record.name, size)]
        mine += [Block(b.address, b.size, b.kind, b.owner, f"the {b.size}-byte buffer that the capture of "
                       f"{record.label(size)} allocated (its allocation {i + 1} of {len(footprint)})")
                 for i, b in enumerate(footprint)]
        before = [b for b in mine if 0 <= address - (b.address + b.size) < ALLOCATION_ROUNDING]
        return max(before, key=lambda b: b.address + b.size, default=None)

    def check_guarded(self, copies: List[Tuple[Block, torch.Tensor]], record: CaptureRecord, size: int,
                      batch: int, segment: Optional[int] = None) -> None:
        """Raises GraphHazardError at the first byte changed outside what the graph's capture allocated (its
        own footprint may hold other graphs' outputs: largest-first sharing puts them there).

        Args:
            copies: what `guarded` copied before the replay.
            record: the runner that replayed.
            size: the size it replayed.
            batch: the step's requests, for the message.
            segment: where a piecewise size's step stands: its segments up to this one ran since the copies were
                checked last, and a finding names it ("segment 1 of size 8"); None names the whole graph.
        """
        writer = (record.name, size)
        who = record.describe(size) if segment is None else f"segment {segment} of {record.label(size)}"
        own = [(b.address, b.size) for b in self.footprints[writer]]
        for block, address, count in self._changes(copies, lambda b: own if b.kind is BlockKind.SEGMENT else []):
            hit, offset = (self.owner_of(address, writer) if block.kind is BlockKind.SEGMENT
                           else (block, address - block.address))
            over = self.overrun(record, size, address)
            overran = f"; the write starts right past the end of {over.describe()}, which it most likely overran" \
                if over is not None else ""
            raise GraphHazardError(
                f"{who} (batch {batch}) wrote out of bounds into {hit.describe()} at byte "
                f"offset {offset} ({count} bytes changed), memory its capture never allocated{overran}: "
                f"{WRITE_FIX}.", size=size, buffer=hit.label, offset=offset, runner=record.name, owner=hit.owner,
                overrun=over.label if over is not None else None)

    def check_break(self, copies: List[Tuple[Block, torch.Tensor]], record: CaptureRecord, size: int, batch: int,
                    k: int, op: str, out: torch.Tensor) -> None:
        """Raises GraphHazardError at the first byte a break op changed outside its out= boundary buffer.

        Args:
            copies: what `guarded(record, size, own_rows=True)` copied just before the op ran.
            record: the runner whose step ran the op.
            size: the size the step runs at.
            batch: the step's requests, for the message.
            k: the op's place: it runs after segment k (messages call it break k + 1).
            op: the op's name.
            out: its out= boundary buffer (a strided one is allowed its whole span).
        """
        start, nbytes = _span(out)
        for block, address, count in self._changes(copies, lambda b: [(start, nbytes)]):
            hit, offset = (self._break_hit(address, record, size, k) if block.kind is BlockKind.SEGMENT
                           else (block, address - block.address))
            boundary = (f"its out= boundary buffer {tuple(out.shape)} {out.dtype} (block 0x{start:x}, {nbytes} "
                        "bytes)")
            past = address - (start + nbytes)
            where = "right past" if past == 0 else f"{past} bytes past"
            overran = (f"; the write starts {where} the end of out=, which it most likely overran"
                       if 0 <= past < ALLOCATION_ROUNDING else "")
            breaks = len(record.entries[size].breaks)
            raise GraphHazardError(
                f"break op {op} (break {k + 1} of {breaks} of {record.label(size)}, batch {batch}) wrote outside "
                f"{boundary}: into {hit.describe()} at byte offset {offset} ({count} bytes changed)"
                f"{overran}: {BREAK_WRITE_FIX}.", size=size, buffer=hit.label, offset=offset, runner=record.name,
                owner=hit.owner, overrun=f"out= {tuple(out.shape)} of break op {op}" if overran else None, op=op)

    def _changes(self, copies: List[Tuple[Block, torch.Tensor]],
                 allowed: Callable[[Block], List[Tuple[int, int]]]) -> Iterator[Tuple[Block, int, int]]:
        """For each copied block whose bytes changed outside the (address, bytes) ranges `allowed(block)` permits:
        (the block, the first changed address, how many bytes changed there).

        Args:
            copies: (block, its bytes as copied before).
            allowed: the ranges a block may have changed in.
        """
        for block, before in copies:
            changed = raw_bytes(block.address, block.size, self.device) != before
            for address, nbytes in allowed(block):
                lo, hi = max(address, block.address), min(address + nbytes, block.address + block.size)
                if lo < hi:
                    changed[lo - block.address: hi - block.address] = False
            first = changed.nonzero()
            if first.numel():
                yield block, block.address + int(first[0]), first.numel()

    def _break_hit(self, address: int, record: CaptureRecord, size: int, k: int) -> Tuple[Block, int]:
        """The block a break op of `size` wrote into at `address`, and the offset into it: the latest allocation
        the size's capture made before the break (the one most likely alive when the op runs), else the size's
        own output, else what owner_of names (another graph's memory, or free pool memory)."""
        writer = (record.name, size)
        entry = record.entries[size]
        made = [r for g in entry.graphs[: k + 1] for r in g.footprint]  # footprint lists each segment's in turn
        for i in reversed(range(len(made))):
            start, nbytes = made[i]
            if start <= address < start + nbytes:
                label = (f"the {nbytes}-byte buffer that the capture of {record.label(size)} allocated before break "
                         f"{k + 1} (its allocation {i + 1} of {len(entry.footprint)})")
                return Block(start, nbytes, BlockKind.FOOTPRINT, writer, label), address - start
        for b in self.owned:
            if b.owner == writer and b.holds(address):
                return b, address - b.address
        return self.owner_of(address, writer)
