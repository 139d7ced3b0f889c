"""Scrub and guard: who owns what in a pool shared by one or more runners, checked around one replay.

All graphs in a pool share its memory, so a graph that writes past a buffer, or reads memory it expects to
keep its contents between replays, corrupts or depends on memory another graph owns. Such bugs show up far
from their cause, or not at all, depending on which graph ran last. The checks make them deterministic:

- scrub fills the pool's free memory, and other graphs' kept-alive capture allocations, with a pattern that
  reads as NaN in every float type and as INT_MAX in int32, before a replay;
- guard copies every pool segment, the static inputs other graphs read (the running graph's rows past its
  padded size, and every row of other runners' buffers) and the state buffers other runners declared (their
  modules' buffers, out= buffers, keep=) before a replay, and names the first byte that changed outside what
  the running graph's capture allocated, and the writer's buffer that ends where the write starts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from graphrunner.errors import WRITE_FIX, GraphHazardError
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

    def guarded(self, record: CaptureRecord, size: int) -> List[Tuple[Block, torch.Tensor]]:
        """Copies, taken just before the replay of `record`'s graph of `size`, of every pool segment, of the
        static input rows that replay must not touch, and of other runners' state buffers (those it does not
        declare itself: runners may share a module)."""
        blocks = pool_segments(self.pool, self.device)
        for rec in self.records:
            for name, buf in rec.static_inputs.items():
                first = rec.rows[size][name] if rec is record else 0
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
                      batch: int) -> None:
        """Raises GraphHazardError at the first byte changed outside what the graph's capture allocated (its
        own footprint may hold other graphs' outputs: largest-first sharing puts them there)."""
        writer = (record.name, size)
        for block, before in copies:
            changed = raw_bytes(block.address, block.size, self.device) != before
            if block.kind is BlockKind.SEGMENT:
                for mine in self.footprints[writer]:
                    lo, hi = max(mine.address, block.address), min(mine.address + mine.size, block.address + block.size)
                    if lo < hi:
                        changed[lo - block.address: hi - block.address] = False
            first = changed.nonzero()
            if not first.numel():
                continue
            address = block.address + int(first[0])
            hit, offset = (self.owner_of(address, writer) if block.kind is BlockKind.SEGMENT
                           else (block, address - block.address))
            over = self.overrun(record, size, address)
            overran = f"; the write starts right past the end of {over.describe()}, which it most likely overran" \
                if over is not None else ""
            raise GraphHazardError(
                f"{record.describe(size)} (batch {batch}) wrote out of bounds into {hit.describe()} at byte "
                f"offset {offset} ({first.numel()} bytes changed), memory its capture never allocated{overran}: "
                f"{WRITE_FIX}.", size=size, buffer=hit.label, offset=offset, runner=record.name, owner=hit.owner,
                overrun=over.label if over is not None else None)
