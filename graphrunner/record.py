"""The capture record: the one thing capture produces. Validation, the audit and reports read it; nothing
reaches back into the runner.

One `SizeEntry` per captured size (vLLM's CUDAGraphEntry is the model): the graph, its outputs, what its
capture allocated in the pool and what it left alive there. The `CaptureRecord` adds what all sizes of one
runner share: the pool, the static input buffers, the launcher that stages them, and the library
workspaces the graphs use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from graphrunner.graph import Graph, PoolId
from graphrunner.pool import Block

MiB = 1024 * 1024


@dataclass
class SizeEntry:
    """One captured size.

    Attributes:
        size: the batch size the graph was captured at.
        graph: the captured graph (its cudaGraph_t kept, for the audit).
        outputs: aliases of the graph's outputs, in the structure fn returned (valid until the next replay).
        footprint: what the capture allocated in the pool, [(address, bytes)] in allocation order.
        kept_alive: allocations the capture left alive in the pool that are not outputs (the capture guard's).
        capture_ms: wall time of the capture.
        pool_bytes_added: memory the pool grew by during this capture.
        segments: a piecewise size's graphs after the first, one after each break (empty for a size captured
            whole); footprint covers them too.
        breaks: the break op calls between the graphs (graphrunner.piecewise.Break), one per segment.
    """

    size: int
    graph: Graph
    outputs: Any
    footprint: List[Tuple[int, int]]
    kept_alive: List[Block]
    capture_ms: float
    pool_bytes_added: int
    segments: List[Graph] = field(default_factory=list)
    breaks: List[Any] = field(default_factory=list)

    @property
    def graphs(self) -> List[Graph]:
        """Every graph of this size, in the order a step runs them."""
        return [self.graph, *self.segments]


@dataclass
class CaptureRecord:
    """Everything one runner's capture produced.

    Attributes:
        name: the runner's name in messages ("" when unnamed).
        device: the GPU.
        pool: the allocator pool all graphs allocate from.
        static_inputs: the static buffers that every graph reads, each with the largest size's rows.
        rows: rows[size][input name]: the rows of that input a graph of that size reads.
        launcher: the native launcher that stages a step's inputs and replays the graph of its size.
        entries: one SizeEntry per captured size, in capture order (largest first).
        workspaces: the library workspaces the graphs use, kept alive with them (shared by runners captured
            together), or None.
        warmup_ms: wall time of the warm-up before the first capture.
        state_buffers: the long-lived tensors the caller declared that a step may write (RunnerSpec.state_buffers),
            by how messages name them; guard watches them while other runners replay.
        capture_report: what the capture cost (made once every runner captured together is captured).
    """

    name: str
    device: torch.device
    pool: PoolId
    static_inputs: Dict[str, torch.Tensor]
    rows: Dict[int, Dict[str, int]]
    launcher: Any
    entries: Dict[int, SizeEntry] = field(default_factory=dict)
    workspaces: Optional[Any] = None
    warmup_ms: float = 0.0
    state_buffers: Dict[str, torch.Tensor] = field(default_factory=dict)
    capture_report: Optional["CaptureReport"] = None

    def static_views(self, size: int) -> Dict[str, torch.Tensor]:
        """The rows a graph of `size` reads of every static input buffer."""
        return {n: buf[: self.rows[size][n]] for n, buf in self.static_inputs.items()}

    @property
    def of_runner(self) -> str:
        """What messages append to name this runner: " of runner 'draft'", or "" for an unnamed runner."""
        return f" of runner {self.name!r}" if self.name else ""

    def label(self, size: int) -> str:
        """How messages name a size of this runner: "size 8", or "size 8 of runner 'draft'"."""
        return f"size {size}{self.of_runner}"

    def describe(self, size: int) -> str:
        """How messages name the graph of `size`."""
        return f"the graph of {self.label(size)}"

    def workspace_blocks(self) -> List[Tuple[str, int, int]]:
        """The library workspaces kept alive for these graphs: [(library, address, bytes)]."""
        return list(self.workspaces.held) if self.workspaces is not None else []

    def release(self) -> None:
        """Destroys the graphs and drops this record's hold on the workspaces (freed once no record holds
        them). The caller makes sure no replay is still running."""
        for entry in self.entries.values():
            for graph in entry.graphs:
                graph.reset()
        self.entries.clear()
        self.workspaces = None
        self.static_inputs.clear()
        self.state_buffers.clear()
        self.launcher = None

    def report(self, rank: int = 0) -> "CaptureReport":
        """What this capture cost, per size.

        Args:
            rank: this process's rank in a distributed run (0 otherwise).
        """
        return CaptureReport(
            name=self.name, rank=rank, warmup_ms=self.warmup_ms,
            workspace_bytes=sum(nbytes for _, _, nbytes in self.workspace_blocks()),
            sizes=[SizeReport(e.size, e.capture_ms, e.pool_bytes_added, sum(g.num_nodes for g in e.graphs))
                   for e in self.entries.values()])


@dataclass
class SizeReport:
    """One size's line of the capture report: capture time, pool growth, graph nodes."""

    size: int
    capture_ms: float
    pool_bytes_added: int
    num_nodes: int


@dataclass
class CaptureReport:
    """What `capture()` did, per size, plus the warm-up and the workspaces kept alive.

    Attributes:
        sizes: one SizeReport per size, in capture order.
        warmup_ms: wall time of the warm-up.
        workspace_bytes: library workspaces (cuBLAS) the graphs use, kept alive with them, outside the pool.
        name: the runner's name ("" when unnamed).
        rank: this process's rank in a distributed run (0 otherwise).
        ranks: every rank's report, in a distributed run.
    """

    sizes: List[SizeReport] = field(default_factory=list)
    warmup_ms: float = 0.0
    workspace_bytes: int = 0
    name: str = ""
    rank: int = 0
    ranks: List["CaptureReport"] = field(default_factory=list)

    @property
    def capture_s(self) -> float:
        return sum(r.capture_ms for r in self.sizes) / 1000

    @property
    def pool_bytes(self) -> int:
        return sum(r.pool_bytes_added for r in self.sizes)

    def summary(self) -> str:
        """One line: sizes, time, pool and workspace memory (and the slowest rank, in a distributed run)."""
        text = (f"{self.name + ': ' if self.name else ''}captured {len(self.sizes)} sizes in {self.capture_s:.2f} s "
                f"(warm-up {self.warmup_ms:.0f} ms), pool {self.pool_bytes / MiB:.1f} MiB, workspaces kept "
                f"{self.workspace_bytes / MiB:.1f} MiB")
        if self.ranks:
            slowest = max(self.ranks, key=lambda r: r.capture_s)
            text += (f" on rank {self.rank} of {len(self.ranks)}; slowest rank {slowest.rank} "
                     f"{slowest.capture_s:.2f} s, largest pool {max(r.pool_bytes for r in self.ranks) / MiB:.1f} MiB")
        return text

    def to_dict(self) -> dict:
        return {"name": self.name, "rank": self.rank, "warmup_ms": self.warmup_ms, "capture_s": self.capture_s,
                "pool_bytes": self.pool_bytes, "workspace_bytes": self.workspace_bytes,
                "sizes": [vars(r) for r in self.sizes], "ranks": [r.to_dict() for r in self.ranks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        lines = [f"{'size':>6} {'capture ms':>11} {'pool MiB added':>15} {'nodes':>6}"]
        lines += [f"{r.size:>6} {r.capture_ms:>11.2f} {r.pool_bytes_added / MiB:>15.2f} {r.num_nodes:>6}"
                  for r in self.sizes]
        return "\n".join(lines + [self.summary()])
