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


def pool_blocks(pool: Tuple[int, int], device: torch.device) -> List[dict]:
    """The pool's blocks from the allocator's snapshot: dicts with address, size, state and frames."""
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


def pool_segments(pool: Tuple[int, int], device: torch.device) -> List[Block]:
    """The pool's segments, each a SEGMENT block."""
    return [Block(seg["address"], seg["total_size"], BlockKind.SEGMENT, None, BlockKind.SEGMENT.value)
            for seg in torch.cuda.memory_snapshot(mempool_id=pool, include_traces=False)
            if tuple(seg["segment_pool_id"]) == tuple(pool) and seg.get("device", device.index) == device.index]
