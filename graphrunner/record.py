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
        outside_bytes: device memory outside torch's allocator that the driver handed out while this size was
            captured, instantiated and uploaded: its executables', and whatever was first used meanwhile.
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
    outside_bytes: int = 0

    @property
    def graphs(self) -> List[Graph]:
        """Every graph of this size, in the order a step runs them."""
        return [self.graph, *self.segments]

    @property
    def exec_bytes(self) -> int:
        """Device memory the driver took for this size's executable graphs (`Graph.exec_bytes`, summed; a graph
        that shares another's executable took none of its own)."""
        return sum(g.exec_bytes for g in self.graphs)

    @property
    def first_use_bytes(self) -> int:
        """What the driver handed out outside torch's allocator during this size's capture beyond its executables'
        (see Note [first-use bytes] in graphrunner/capture.py)."""
        return max(0, self.outside_bytes - self.exec_bytes)


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

    def static_bytes(self) -> int:
        """Bytes of the static input buffers (each with the largest size's rows)."""
        return sum(t.untyped_storage().nbytes() for t in self.static_inputs.values())

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
        # Each executable is counted at the first graph that runs on it (capture order): the graph that instantiated
        # it. Later graphs of one structure share it (share_segments) and add no executable.
        seen = set()
        sizes = []
        for e in self.entries.values():
            own = [g for g in e.graphs if g.exec_handle not in seen]
            seen.update(g.exec_handle for g in own)
            sizes.append(SizeReport(e.size, e.capture_ms, e.pool_bytes_added, sum(g.num_nodes for g in e.graphs),
                                    e.exec_bytes, len(e.graphs), executables=len({g.exec_handle for g in e.graphs}),
                                    instantiated=len(own), exec_nodes=sum(g.num_nodes for g in own),
                                    first_use_bytes=e.first_use_bytes))
        return CaptureReport(
            name=self.name, rank=rank, warmup_ms=self.warmup_ms,
            workspace_bytes=sum(nbytes for _, _, nbytes in self.workspace_blocks()),
            static_bytes=self.static_bytes(), sizes=sizes)


@dataclass
class SizeReport:
    """One size's line of the capture report.

    Attributes:
        size: the captured size.
        capture_ms: wall time of its capture.
        pool_bytes_added: what the pool grew by during its capture (0 for most sizes after the largest).
        num_nodes: nodes of its graphs (what its executables would hold without sharing).
        exec_bytes: device memory the driver took for the executables its graphs instantiated, outside torch's
            allocator (read in 2 MiB chunks: one size may read 0 and the next 2 MiB; sums over many sizes are
            exact). A graph that shares another's executable instantiated none: it adds what the driver's free
            memory fell across its cudaGraphExecUpdate, 0 unless the update took memory.
        graphs: its graphs (more than one for a piecewise size): its executables without sharing.
        executables: the distinct executables its graphs run on (share_segments: segments of one structure share
            one, possibly instantiated by another size's graph); default graphs.
        instantiated: the executables its graphs instantiated themselves (the rest share one instantiated before);
            default graphs.
        exec_nodes: nodes of the executables it instantiated; default num_nodes.
        first_use_bytes: device memory outside torch's allocator the driver handed out during its capture beyond
            its executables' (Note [first-use bytes] in graphrunner/capture.py); read in 2 MiB chunks like them.
    """

    size: int
    capture_ms: float
    pool_bytes_added: int
    num_nodes: int
    exec_bytes: int = 0
    graphs: int = 1
    executables: Optional[int] = None
    instantiated: Optional[int] = None
    exec_nodes: Optional[int] = None
    first_use_bytes: int = 0

    def __post_init__(self) -> None:
        if self.executables is None:
            self.executables = self.graphs
        if self.instantiated is None:
            self.instantiated = self.graphs
        if self.exec_nodes is None:
            self.exec_nodes = self.num_nodes

    @property
    def bytes(self) -> int:
        """What this size added: pool growth, executables and first-use bytes."""
        return self.pool_bytes_added + self.exec_bytes + self.first_use_bytes


def _mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:.1f}"


@dataclass
class CaptureReport:
    """What `capture()` did, per size, plus the warm-up, the workspaces kept alive and the static inputs: every
    byte a runner's graphs hold.

    The bytes add up as `bytes` = pool + executables + first use + workspaces + static inputs + other: the pool's
    growth while this runner's sizes were captured, the driver's memory for their executable graphs (outside torch's
    allocator), what else the driver handed out outside torch's allocator while they were captured (first-use
    bytes), the library workspaces the graphs own, the static input buffers, and the other bytes torch's allocator
    reserved for the capture (Note [other bytes] in graphrunner/capture.py). Runners captured together share one
    pool, one workspace hold and one figure of other bytes: each one's pool bytes are what the pool grew by during
    its own captures (the sum over the runners is the pool), while each report lists the whole shared hold and the
    whole other bytes (`shared_workspaces`); `PoolReport` counts them once.

    Attributes:
        sizes: one SizeReport per size, in capture order.
        warmup_ms: wall time of the warm-up.
        workspace_bytes: library workspaces (cuBLAS) the graphs use, kept alive with them, outside the pool.
        name: the runner's name ("" when unnamed).
        rank: this process's rank in a distributed run (0 otherwise).
        ranks: every rank's report, in a distributed run.
        static_bytes: the static input buffers.
        other_bytes: what else torch's allocator reserved for the capture outside the sizes' capture windows and
            still holds, beyond the workspace hold and the static buffers: the graph RNG's seed and offset,
            `gr.workspace` buffers first asked for at warm-up, and the rest of the allocator segments these and the
            static buffers keep (Note [other bytes] in graphrunner/capture.py). 0 where not measured.
        driver_bytes: the fall of the driver's free memory across the whole capture (every runner captured with
            this one, measured after emptying torch's cache on both sides): everything the capture keeps, as
            the driver counts it, other processes' allocations meanwhile included. None where not measured.
        outside_bytes: the part of driver_bytes outside torch's allocator (driver_bytes less the growth of
            torch's reserved memory): the executables, and anything else the driver handed out meanwhile (lazily
            loaded kernels, library handles). None where not measured.
        shared_workspaces: the workspace hold and the other bytes are shared with other runners captured together.
        budget: the max_bytes capture_all kept the capture within, if one was given.
        dropped: sizes of this runner left out to stay within the budget (their steps run eagerly).
    """

    sizes: List[SizeReport] = field(default_factory=list)
    warmup_ms: float = 0.0
    workspace_bytes: int = 0
    name: str = ""
    rank: int = 0
    ranks: List["CaptureReport"] = field(default_factory=list)
    static_bytes: int = 0
    other_bytes: int = 0
    driver_bytes: Optional[int] = None
    outside_bytes: Optional[int] = None
    shared_workspaces: bool = False
    budget: Optional[int] = None
    dropped: List[int] = field(default_factory=list)

    @property
    def capture_s(self) -> float:
        """Wall seconds of every size's capture."""
        return sum(r.capture_ms for r in self.sizes) / 1000

    @property
    def pool_bytes(self) -> int:
        """Pool growth over every size's capture."""
        return sum(r.pool_bytes_added for r in self.sizes)

    @property
    def exec_bytes(self) -> int:
        """The executable graphs' device memory, summed over sizes."""
        return sum(r.exec_bytes for r in self.sizes)

    @property
    def first_use_bytes(self) -> int:
        """The first-use bytes, summed over sizes."""
        return sum(r.first_use_bytes for r in self.sizes)

    @property
    def graphs(self) -> int:
        """Graphs captured (a piecewise size counts each segment): the executables without sharing."""
        return sum(r.graphs for r in self.sizes)

    @property
    def executables(self) -> int:
        """Distinct executables the graphs run on: graphs, less those that share one (share_segments)."""
        return sum(r.instantiated for r in self.sizes)

    @property
    def num_nodes(self) -> int:
        """Nodes of every graph: what the executables would hold without sharing."""
        return sum(r.num_nodes for r in self.sizes)

    @property
    def exec_nodes(self) -> int:
        """Nodes of the distinct executables."""
        return sum(r.exec_nodes for r in self.sizes)

    @property
    def unshared_exec_bytes(self) -> int:
        """An estimate of the executables' bytes without sharing: exec_bytes scaled by num_nodes / exec_nodes (the
        graphs that share an executable were never instantiated alone, so their own bytes were never read)."""
        return _unshared(self.exec_bytes, self.num_nodes, self.exec_nodes)

    @property
    def bytes(self) -> int:
        """Every byte this runner's graphs hold: pool + executables + first use + workspaces + static inputs +
        other."""
        return (self.pool_bytes + self.exec_bytes + self.first_use_bytes + self.workspace_bytes + self.static_bytes
                + self.other_bytes)

    def summary(self) -> str:
        """One line, as vLLM's "captured N graphs in S s, took X MiB", with the split (and the slowest rank, in a
        distributed run)."""
        text = f"{self.name + ': ' if self.name else ''}{_took(self.graphs, len(self.sizes), self.capture_s)} " \
               f"(warm-up {self.warmup_ms:.0f} ms){_sharing(self)}, took {self.bytes / MiB:.1f} MiB " + \
               _split(self, " (shared)" if self.shared_workspaces else "")
        text += _budget(self.budget, {self.name: self.dropped} if self.dropped else {})
        if self.ranks:
            slowest = max(self.ranks, key=lambda r: r.capture_s)
            text += (f" on rank {self.rank} of {len(self.ranks)}; slowest rank {slowest.rank} "
                     f"{slowest.capture_s:.2f} s, largest pool {max(r.pool_bytes for r in self.ranks) / MiB:.1f} MiB")
        return text

    def to_dict(self) -> dict:
        """The report as plain data (for JSON)."""
        return {"name": self.name, "rank": self.rank, "warmup_ms": self.warmup_ms, "capture_s": self.capture_s,
                "pool_bytes": self.pool_bytes, "exec_bytes": self.exec_bytes, "first_use_bytes": self.first_use_bytes,
                "workspace_bytes": self.workspace_bytes, "static_bytes": self.static_bytes,
                "other_bytes": self.other_bytes, "bytes": self.bytes, "graphs": self.graphs,
                "executables": self.executables, "num_nodes": self.num_nodes, "exec_nodes": self.exec_nodes,
                "unshared_exec_bytes": self.unshared_exec_bytes, "driver_bytes": self.driver_bytes,
                "outside_bytes": self.outside_bytes, "shared_workspaces": self.shared_workspaces,
                "budget": self.budget, "dropped": list(self.dropped),
                "sizes": [vars(r) for r in self.sizes], "ranks": [r.to_dict() for r in self.ranks]}

    def to_json(self) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        lines = [f"{'size':>6} {'capture ms':>11} {'pool MiB added':>15} {'exec MiB':>9} {'first use MiB':>14} "
                 f"{'nodes':>6} {'graphs':>6} {'execs':>6}"]
        lines += [f"{r.size:>6} {r.capture_ms:>11.2f} {r.pool_bytes_added / MiB:>15.2f} {r.exec_bytes / MiB:>9.2f} "
                  f"{r.first_use_bytes / MiB:>14.2f} {r.num_nodes:>6} {r.graphs:>6} {r.executables:>6}"
                  for r in self.sizes]
        return "\n".join(lines + [self.summary()])


@dataclass
class PoolReport:
    """The totals of runners captured together into one pool (`capture_all`): every byte counted once.

    Attributes:
        runners: each runner's CaptureReport, in the order they were passed.
    """

    runners: List[CaptureReport]

    @property
    def graphs(self) -> int:
        """Graphs captured (a piecewise size counts each segment): the executables without sharing."""
        return sum(r.graphs for r in self.runners)

    @property
    def executables(self) -> int:
        """Distinct executables, every runner's together (runners share none with each other)."""
        return sum(r.executables for r in self.runners)

    @property
    def num_nodes(self) -> int:
        """Nodes of every graph: what the executables would hold without sharing."""
        return sum(r.num_nodes for r in self.runners)

    @property
    def exec_nodes(self) -> int:
        """Nodes of the distinct executables."""
        return sum(r.exec_nodes for r in self.runners)

    @property
    def unshared_exec_bytes(self) -> int:
        """An estimate of the executables' bytes without sharing (CaptureReport.unshared_exec_bytes, summed)."""
        return sum(r.unshared_exec_bytes for r in self.runners)

    @property
    def capture_s(self) -> float:
        """Wall seconds of every size's capture."""
        return sum(r.capture_s for r in self.runners)

    @property
    def pool_bytes(self) -> int:
        """The pool's growth over the whole capture (each runner's report holds its own captures' part)."""
        return sum(r.pool_bytes for r in self.runners)

    @property
    def exec_bytes(self) -> int:
        """The executable graphs' device memory, every runner's together."""
        return sum(r.exec_bytes for r in self.runners)

    @property
    def first_use_bytes(self) -> int:
        """The first-use bytes, every runner's together."""
        return sum(r.first_use_bytes for r in self.runners)

    @property
    def workspace_bytes(self) -> int:
        """The workspace hold, counted once: every runner of one capture_all lists the same one."""
        return max((r.workspace_bytes for r in self.runners), default=0)

    @property
    def static_bytes(self) -> int:
        """The static input buffers' bytes, every runner's together."""
        return sum(r.static_bytes for r in self.runners)

    @property
    def other_bytes(self) -> int:
        """The other bytes torch's allocator reserved for the capture, counted once: every runner of one capture_all
        lists the same figure."""
        return max((r.other_bytes for r in self.runners), default=0)

    @property
    def bytes(self) -> int:
        """Every byte the graphs of all these runners hold: pool + executables + first use + workspaces + static
        inputs + other."""
        return (self.pool_bytes + self.exec_bytes + self.first_use_bytes + self.workspace_bytes + self.static_bytes
                + self.other_bytes)

    @property
    def driver_bytes(self) -> Optional[int]:
        """The driver's figure for the whole capture (see CaptureReport.driver_bytes)."""
        return self.runners[0].driver_bytes if self.runners else None

    @property
    def outside_bytes(self) -> Optional[int]:
        """The driver's bytes outside torch's allocator (executables, handles), as the first runner's report
        measured them.
        """
        return self.runners[0].outside_bytes if self.runners else None

    @property
    def budget(self) -> Optional[int]:
        """The budget the capture kept within, or None."""
        return self.runners[0].budget if self.runners else None

    @property
    def dropped(self) -> Dict[str, List[int]]:
        """Runner name -> the sizes left out to stay within the budget (runners that dropped none left out)."""
        return {r.name: list(r.dropped) for r in self.runners if r.dropped}

    def split(self) -> str:
        """The bytes by kind, in parentheses: pool, executables, workspaces kept, static inputs, and first use and
        other where there are any."""
        return _split(self, "")

    def summary(self) -> str:
        """One line for the pool: "captured N graphs in S s, took X MiB (pool, executables, workspaces kept,
        static inputs, and first use and other where there are any)", the driver's own figure, and what a budget
        dropped."""
        names = ", ".join(repr(r.name) for r in self.runners if r.name)
        sizes = sum(len(r.sizes) for r in self.runners)
        text = f"{'pool of ' + names + ': ' if names else ''}{_took(self.graphs, sizes, self.capture_s)}" \
               f"{_sharing(self)}, took " \
               f"{self.bytes / MiB:.1f} MiB " + self.split()
        if self.driver_bytes is not None:
            text += f"; the driver's free memory fell {self.driver_bytes / MiB:.1f} MiB"
            if self.outside_bytes is not None:
                text += f", {self.outside_bytes / MiB:.1f} of it outside torch's allocator"
        return text + _budget(self.budget, self.dropped)

    def to_dict(self) -> dict:
        """The report as plain data (for JSON)."""
        return {"graphs": self.graphs, "executables": self.executables, "num_nodes": self.num_nodes,
                "exec_nodes": self.exec_nodes, "unshared_exec_bytes": self.unshared_exec_bytes,
                "capture_s": self.capture_s, "bytes": self.bytes,
                "pool_bytes": self.pool_bytes, "exec_bytes": self.exec_bytes, "first_use_bytes": self.first_use_bytes,
                "workspace_bytes": self.workspace_bytes, "static_bytes": self.static_bytes,
                "other_bytes": self.other_bytes, "driver_bytes": self.driver_bytes,
                "outside_bytes": self.outside_bytes, "budget": self.budget, "dropped": self.dropped,
                "runners": [r.to_dict() for r in self.runners]}

    def __str__(self) -> str:
        return "\n".join([str(r) for r in self.runners] + [self.summary()])


def _took(graphs: int, sizes: int, seconds: float) -> str:
    return f"captured {graphs} graphs{f' ({sizes} sizes)' if graphs != sizes else ''} in {seconds:.2f} s"


def _unshared(exec_bytes: int, num_nodes: int, exec_nodes: int) -> int:
    """exec_bytes scaled from the executables' nodes to every graph's (exec_bytes where they are the same)."""
    return exec_bytes if exec_nodes in (0, num_nodes) else exec_bytes * num_nodes // exec_nodes


def _sharing(report: Any) -> str:
    """What sharing executables saved (a CaptureReport or PoolReport), or "" where no graph shares one."""
    if report.executables == report.graphs:
        return ""
    return (f" on {report.executables} executables of {report.exec_nodes} nodes, {_mib(report.exec_bytes)} MiB "
            f"(segments of one structure share one; unshared: {report.graphs} executables of {report.num_nodes} "
            f"nodes, about {_mib(report.unshared_exec_bytes)} MiB)")


def _split(report: Any, shared: str) -> str:
    """A report's bytes by kind (a CaptureReport or PoolReport); first-use and other bytes only where there are
    any."""
    first_use = f", first use {_mib(report.first_use_bytes)}" if report.first_use_bytes else ""
    other = f", other {_mib(report.other_bytes)}{shared}" if report.other_bytes else ""
    return (f"(pool {_mib(report.pool_bytes)}, executables {_mib(report.exec_bytes)}, workspaces kept "
            f"{_mib(report.workspace_bytes)}{shared}, static inputs {_mib(report.static_bytes)}{first_use}{other})")


def _budget(budget: Optional[int], dropped: Dict[str, List[int]]) -> str:
    if budget is None:
        return ""
    if not dropped:
        return f"; within the budget of {budget / MiB:.1f} MiB, every size kept"
    what = "; ".join(f"{', '.join(map(str, sorted(sizes)))}{f' of {name!r}' if name else ''}"
                     for name, sizes in dropped.items())
    return f"; within the budget of {budget / MiB:.1f} MiB, dropped sizes {what} (their steps run eagerly)"
