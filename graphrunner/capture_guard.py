"""The capture guard: allocations a capture leaves alive in the shared pool that are not its outputs.

Such an allocation is a buffer fn cached across calls and first made inside a capture: it lives in the
pool, other sizes reuse the memory around it, and only the graph that made it ever fills it.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterator, List, Tuple

import torch

from graphrunner.errors import STATE_FIX, CaptureGuardWarning, GraphHazardError
from graphrunner.pool import Block, BlockKind, pool_blocks


def _format_frames(frames: List[dict]) -> str:
    picked = [f for f in frames if f.get("filename", "").endswith(".py")][:6]
    return "".join(f"\n      {f['filename']}:{f['line']} in {f['name']}" for f in picked)


class CaptureGuard:
    """Watches the captures into one pool; cheap by default: it compares allocated bytes before and after a
    capture and takes an allocator snapshot only when they differ. debug=True records Python stacks.

    Args:
        pool: the pool the captures allocate from.
        device: its GPU.
        strict: raise GraphHazardError instead of warning.
        debug: record the Python stack of every allocation made while capturing.
    """

    def __init__(self, pool: Tuple[int, int], device: torch.device, strict: bool = False,
                 debug: bool = False) -> None:
        self.pool, self.device, self.strict, self.debug = pool, device, strict, debug
        self.seen: Dict[int, Block] = {}  # every block found so far, so each is reported once

    @contextlib.contextmanager
    def watch(self, owner: Tuple[str, int], label: str) -> Iterator[List[Block]]:
        """Yields a list that holds, once the block ends, what the capture inside it left alive.

        Args:
            owner: the graph being captured, as (runner name, size).
            label: how messages name it ("size 8").

        The block must drop its references to the capture's outputs (keep aliases) before it ends.
        """
        kept: List[Block] = []
        if self.debug:
            torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python")
        before = torch.cuda.memory_allocated(self.device)
        try:
            yield kept
        finally:
            if self.debug:
                torch.cuda.memory._record_memory_history(enabled=None)
        if torch.cuda.memory_allocated(self.device) > before or self.debug:
            kept.extend(self._report(owner, label))

    def _report(self, owner: Tuple[str, int], label: str) -> List[Block]:
        found, lines = [], []
        for b in pool_blocks(self.pool, self.device):
            if b["state"] != "inactive" and b["address"] not in self.seen:
                block = Block(b["address"], b["size"], BlockKind.KEPT_ALIVE, owner,
                              f"allocation kept alive after the capture of {label}")
                self.seen[b["address"]] = block
                found.append(block)
                lines.append(f"  {b['size']} bytes at 0x{b['address']:x}{_format_frames(b['frames'])}")
        if not found:
            return found
        message = (f"capture of {label} left {len(found)} allocation(s) alive in the "
                   "shared pool that are not outputs: a buffer cached across calls and first allocated inside a "
                   "capture. Other sizes reuse it, and only this size's graph ever fills it. " + STATE_FIX + ".\n" +
                   "\n".join(lines) + ("" if self.debug else "\n  (GraphRunner(debug=True) shows the Python stack "
                                                               "of each)"))
        if self.strict:
            raise GraphHazardError(message, size=owner[1], buffer="kept-alive allocation")
        warnings.warn(message, CaptureGuardWarning, stacklevel=4)
        return found
