"""What lives in an allocator pool: its blocks from the allocator's snapshot, and who they belong to."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


class BlockKind(enum.Enum):
    """What a block of memory is, for the hazard checks and their messages."""

    FREE = "free pool memory"
    OUTPUT = "an output"
    KEPT_ALIVE = "an allocation a capture left alive"
    FOOTPRINT = "memory a capture allocated"
    SEGMENT = "a pool segment"
    STATIC_ROWS = "static input rows"
    STATE = "a buffer a runner declared (RunnerSpec.state_buffers)"


@dataclass
class Block:
    """A range of device memory and what it is.

    Attributes:
        address: its first byte.
        size: its length in bytes.
        kind: what it is.
        owner: the graph it belongs to, as (runner name, size), or None (free memory, segments).
        label: how messages name it, e.g. "output['logits'] of size 8".
    """

    address: int
    size: int
    kind: BlockKind = BlockKind.FREE
    owner: Optional[Tuple[str, int]] = None
    label: str = BlockKind.FREE.value

    def describe(self) -> str:
        """How messages name this block."""
        return f"{self.label} (block 0x{self.address:x}, {self.size} bytes)"

    def holds(self, address: int) -> bool:
        """Whether `address` lies inside this block."""
        return self.address <= address < self.address + self.size


# Note [snapshots that take no arguments]: torch.cuda.memory_snapshot(mempool_id, include_traces) drops a
# reference to each item of the tuple it hands torch's _cuda_memorySnapshot on every call: the pool id's two items
# and include_traces, (0, 0, include_traces) when no pool is given (torch 2.11.0 and 2.14.1;
# benchmarks/snapshot_refcount_probe.py shows it without a GPU). A pool id counts the process's pools in one item
# ((n, 0) for the pool a Graph makes itself, (0, n) from torch.cuda.graph_pool_handle()); past 256 pools n is an
# int object of its own rather than a cached small int, so enough snapshots free it while a record's pool id still
# holds it, and the process crashes later wherever that memory is reused: in the garbage collector, in
# torch.cuda.memory_stats, in a comparison (the whole GPU suite in one process died so, after about 330 tests).
# Before Python 3.12 even 0, False and True can be freed so. torch.cuda.memory._snapshot() hands torch nothing
# (None) and drops nothing; every reading of the allocator's segments goes through it.
def allocator_segments() -> List[dict]:
    """Every segment of torch's caching allocator, on every device (Note [snapshots that take no arguments])."""
    return torch.cuda.memory._snapshot()["segments"]


def segments_of(pool: Tuple[int, int], device: torch.device) -> List[dict]:
    """The segments of `pool` on `device`, from the allocator's snapshot."""
    return [seg for seg in allocator_segments()
            if tuple(seg["segment_pool_id"]) == tuple(pool) and seg.get("device", device.index) == device.index]


def pool_blocks(pool: Tuple[int, int], device: torch.device) -> List[dict]:
    """The pool's blocks from the allocator's snapshot: dicts with address, size, state and frames."""
    blocks = []
    for seg in segments_of(pool, device):
        address = seg["address"]
        for b in seg["blocks"]:
            blocks.append({"address": b.get("address", address), "size": b["size"], "state": b["state"],
                           "frames": b.get("frames", [])})
            address = b.get("address", address) + b["size"]
    return blocks


def pool_segments(pool: Tuple[int, int], device: torch.device) -> List[Block]:
    """The pool's segments, each a SEGMENT block."""
    return [Block(seg["address"], seg["total_size"], BlockKind.SEGMENT, None, BlockKind.SEGMENT.value)
            for seg in segments_of(pool, device)]
