"""The audit: every address a captured graph hands the GPU, and whose memory it is.

A captured kernel bakes raw addresses into its parameters. The pool, the static inputs and what the runner
keeps alive (its step stamp, the RNG state, the cuBLAS workspaces) live as long as the graphs do; so does
memory the caller declared long-lived (`keep=`, gr.workspace buffers, `out=`) and every tensor fn keeps alive,
since the runner holds fn: a module's parameters and buffers, and what fn's closure, default arguments, bound
object, functools.partial arguments and named globals hold (graphrunner.reach.held_by). Anything else is
borrowed (a library's cached workspace, a cache another object owns, a tensor reached through a weak reference,
a tensor freed and its memory reused): if its owner frees it, the graph reads or writes freed memory on its
next replay. The audit names each such borrowing by size, kernel and memory.

Kernel parameter structs carry unused slots whose bytes are whatever was on the host stack when the kernel
was launched (TensorIterator's offset arrays hold 25 dimensions and use a few; torch.cat's kernel has room for
64 inputs). Such a word can look like the address of any tensor the process holds. A kernel's real arguments
come from the program, which runs the same way at every size, so memory a kernel really borrows shows up in
every graph that runs that code; a leftover stack word shows up where the stack happened to hold it. A word
inside a struct is therefore a finding only when another graph of the audit borrows the same memory too, or
when the audit covers one graph; otherwise it is listed as unconfirmed. Pointer-sized parameters are never
leftovers: a borrowed one is always a finding.

What it cannot see: addresses a kernel reads indirectly, from a table in device memory (a page table, an
array of pointers). Scrub and guard (validate()) cover those by their effects.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Set, Tuple

import torch

from graphrunner._native import _C
from graphrunner.errors import BORROW_FIX, GraphHazardError
from graphrunner.graph import Graph
from graphrunner.pool import allocator_segments, pool_segments
from graphrunner.record import CaptureRecord


@dataclass(frozen=True)
class Reference:
    """One address in one captured node's parameters, and the memory it points into.

    Attributes:
        graph: how messages name the graph ("the graph of size 8").
        kernel: the node's kernel name (mangled), or "memset"/"memcpy".
        offset: the byte offset of the address in the node's parameters.
        address: the address.
        memory: what the memory is.
        in_struct: the word lies inside a parameter larger than a pointer (a functor or argument struct).
    """

    graph: str
    kernel: str
    offset: int
    address: int
    memory: str
    in_struct: bool = False

    def __str__(self) -> str:
        kernel = self.kernel if len(self.kernel) <= 70 else self.kernel[:67] + "..."
        return f"{self.graph}: {kernel} (parameter byte {self.offset}) -> 0x{self.address:x}, {self.memory}"


@dataclass
class AuditReport:
    """What the captured graphs reference.

    Attributes:
        graphs: graphs scanned.
        nodes: nodes scanned (kernels, memsets, memcpys).
        owned: references into memory that lives as long as the graphs, counted by what it is.
        borrowed: references into live torch allocations that nothing keeps alive for the graphs: findings.
        unconfirmed: words inside parameter structs that point into a live allocation no other graph of the
            audit references: most likely leftover host stack bytes in a slot the kernel never reads (see the
            module's docstring). Listed, not found at fault.
        stale: words that point into memory the allocator holds free. Like unconfirmed words, such a word may
            be a leftover the kernel never reads: listed, not found at fault. After a co-tenant freed a
            workspace the graphs borrowed, the borrowed reference shows up here.
        external: references into device memory outside torch's allocator (NCCL buffers, a library's own
            cudaMalloc): torch cannot free it, so it is reported, not found at fault.
    """

    graphs: int = 0
    nodes: int = 0
    owned: Dict[str, int] = field(default_factory=dict)
    borrowed: List[Reference] = field(default_factory=list)
    unconfirmed: List[Reference] = field(default_factory=list)
    stale: List[Reference] = field(default_factory=list)
    external: List[Reference] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"audit of {self.graphs} graphs, {self.nodes} nodes: {len(self.borrowed)} borrowed reference(s), "
                 f"{len(self.unconfirmed)} unconfirmed, {len(self.stale)} into free allocator memory, "
                 f"{len(self.external)} into memory outside torch's allocator"]
        lines += [f"  {count:6d} x {what}" for what, count in sorted(self.owned.items())]
        lines += [f"  borrowed: {r}" for r in self.borrowed[:20]]
        lines += [f"  unconfirmed: {r}" for r in self.unconfirmed[:5]]
        lines += [f"  stale: {r}" for r in self.stale[:5]]
        lines += [f"  external: {r}" for r in self.external[:5]]
        return "\n".join(lines)

    def check(self) -> None:
        """Raises GraphHazardError naming the first borrowed reference, if there is one."""
        if self.borrowed:
            first = self.borrowed[0]
            distinct = len({r.address for r in self.borrowed})
            raise GraphHazardError(
                f"{first.graph} uses memory nothing keeps alive for it: {first}. {len(self.borrowed)} reference(s) "
                f"to {distinct} address(es) in all. If that memory's owner frees it (a cache cleared, a tensor "
                f"dropped), the next replay reads or writes freed memory. Either {BORROW_FIX}; or hold it from fn, "
                "which the runner keeps alive: in its closure, a default argument, the object whose method it is, "
                "a functools.partial argument, a global it names, or an attribute of a module it holds "
                "(graphrunner.reach.held_by(fn) lists what fn holds; a weak reference or another module's cache "
                "does not count).", buffer=first.memory)


class _Ranges:
    """Sorted, non-overlapping address ranges with a label each."""

    def __init__(self, ranges: Iterable[Tuple[int, int, str]]) -> None:
        merged: List[Tuple[int, int, str]] = []
        for start, nbytes, what in sorted(r for r in ranges if r[1] > 0):
            if merged and start < merged[-1][1]:  # overlaps the previous one: extend it
                last = merged[-1]
                merged[-1] = (last[0], max(last[1], start + nbytes), last[2])
            else:
                merged.append((start, start + nbytes, what))
        self.starts = [r[0] for r in merged]
        self.ranges = merged

    def find(self, address: int) -> "str | None":
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0 and address < self.ranges[i][1]:
            return self.ranges[i][2]
        return None


Range = Tuple[int, int, str]  # (address, bytes, what it is)
Scan = List[Tuple[str, str, List[Tuple[int, int, bool]]]]  # Graph.scan(): (kind, name, [(offset, word, in_struct)])


def record_ranges(record: CaptureRecord) -> List[Range]:
    """Memory that lives as long as the record's graphs: the pool, the static inputs, the graphs' RNG state,
    the kept workspaces and the launcher's step stamp."""
    out = [(seg.address, seg.size, "the runners' graph pool") for seg in pool_segments(record.pool, record.device)]
    out += [(t.data_ptr(), t.untyped_storage().nbytes(), "a static input buffer")
            for t in record.static_inputs.values()]
    out += [(address, nbytes, f"a {library} workspace the runner keeps alive")
            for library, address, nbytes in record.workspace_blocks()]
    for entry in record.entries.values():
        out += [(address, nbytes, "the graph's RNG seed and offset") for graph in entry.graphs
                for address, nbytes in graph.owned_memory]
    if record.launcher is not None:
        out += [(address, nbytes, "the launcher's step stamp") for address, nbytes in record.launcher.owned_memory]
    return out


def declared_ranges(declared: Sequence[torch.Tensor]) -> List[Range]:
    """The storages of tensors declared long-lived (a tensor without memory of its own, such as a wrapper
    subclass, is left out)."""
    out = []
    for t in declared:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        out.append((storage.data_ptr(), storage.nbytes(),
                    "memory declared long-lived (parameters, buffers, keep=, gr.workspace)"))
    return out


def _allocator_blocks(device: torch.device) -> List[Tuple[int, int, str]]:
    """Every block torch's allocator holds on `device`, live or free, labelled for a finding."""
    out = []
    for seg in allocator_segments():
        if seg.get("device", device.index) != device.index:
            continue
        pool = tuple(seg["segment_pool_id"])
        where = "the general pool" if pool == (0, 0) else f"pool {pool}"
        address = seg["address"]
        for b in seg["blocks"]:
            start = b.get("address", address)
            state = ("a live allocation" if b["state"].startswith("active") else
                     "FREED memory the allocator holds for reuse")
            out.append((start, b["size"], f"{state} of {b['size']} bytes in {where} (block 0x{start:x})"))
            address = start + b["size"]
    return out


def audit(records: Sequence[CaptureRecord], declared: Sequence[torch.Tensor]) -> AuditReport:
    """Scans every node of every graph of `records` and classifies each address it hands the GPU.

    Args:
        records: the capture records to audit (runners of one pool, captured together or alone).
        declared: tensors the caller declared long-lived (what the runners' step functions keep alive, keep=,
            out=, gr.workspace buffers).
    """
    owned = [r for rec in records for r in record_ranges(rec)] + declared_ranges(declared)
    graphs = [(rec.describe(size) + (f" (segment {k})" if entry.segments else ""), graph)
              for rec in records for size, entry in rec.entries.items() for k, graph in enumerate(entry.graphs)]
    return audit_graphs(graphs, owned, records[0].device)


def audit_graphs(graphs: Sequence[Tuple[str, Graph]], owned: Sequence[Range], device: torch.device) -> AuditReport:
    """Classifies every address the nodes of `graphs` hand the GPU against `owned` and the allocator.

    Args:
        graphs: (how messages name it, graph) pairs; each graph captured with keep_graph=True.
        owned: memory that lives as long as the graphs, [(address, bytes, what it is)].
        device: the GPU whose allocator holds the rest.
    """
    return classify([(whose, graph.scan()) for whose, graph in graphs], owned, _allocator_blocks(device),
                    _C.address_kind)


def classify(scans: Sequence[Tuple[str, Scan]], owned: Sequence[Range], allocated: Sequence[Range],
             address_kind: Callable[[int], str]) -> AuditReport:
    """The audit of scanned graphs: each word classified as owned, borrowed, unconfirmed, stale or external.

    Args:
        scans: (how messages name the graph, its Graph.scan()) pairs.
        owned: memory that lives as long as the graphs, [(address, bytes, what it is)].
        allocated: every block torch's allocator holds, [(address, bytes, label)], the label starting with
            "a live allocation" for blocks in use.
        address_kind: what CUDA says an address outside the allocator is ("device", "host", "managed", or "").
    """
    report = AuditReport()
    owned_ranges, allocated_ranges = _Ranges(owned), _Ranges(allocated)
    kinds: Dict[int, str] = {}
    live: List[Reference] = []
    for whose, nodes in scans:
        report.graphs += 1
        for kind, name, words in nodes:
            report.nodes += 1
            for offset, address, in_struct in words:
                what = owned_ranges.find(address)
                if what is not None:
                    report.owned[what] = report.owned.get(what, 0) + 1
                    continue
                what = allocated_ranges.find(address)
                if what is not None:
                    ref = Reference(whose, name, offset, address, what, in_struct)
                    (live if what.startswith("a live") else report.stale).append(ref)
                    continue
                if address not in kinds:
                    kinds[address] = address_kind(address)
                if kinds[address]:
                    report.external.append(Reference(whose, name, offset, address,
                                                     f"{kinds[address]} memory outside torch's allocator"))
    graphs_of: Dict[str, Set[str]] = {}  # a live block (its label) -> the graphs that reference it
    for ref in live:
        graphs_of.setdefault(ref.memory, set()).add(ref.graph)
    for ref in live:
        confirmed = not ref.in_struct or report.graphs == 1 or len(graphs_of[ref.memory]) > 1
        (report.borrowed if confirmed else report.unconfirmed).append(ref)
    return report
