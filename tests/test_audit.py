"""The audit's classification of scanned words (no GPU: scans written out as Graph.scan() gives them)."""
import pytest

import graphrunner as gr
from graphrunner.audit import classify

POOL, TABLE, FREED, FOREIGN = 0x7F0000000000, 0x7F0001000000, 0x7F0002000000, 0x7E0000000000
OWNED = [(POOL, 1 << 20, "the runners' graph pool")]
ALLOCATED = [(TABLE, 4096, "a live allocation of 4096 bytes in the general pool (block 0x7f0001000000)"),
             (FREED, 4096, "FREED memory the allocator holds for reuse of 4096 bytes in the general pool")]


def kind_of(address: int) -> str:
    return "device" if address == FOREIGN else ""


def scan(*words):
    """One graph's scan: a kernel node handing the GPU `words`, (offset, address, in_struct) each."""
    return [("kernel", "elementwise_kernel", list(words))]


def test_a_struct_word_into_memory_one_graph_of_several_borrows_is_unconfirmed():
    report = classify([("the graph of size 8", scan((568, TABLE + 64, True), (8, POOL, True))),
                       ("the graph of size 64", scan((8, POOL + 512, True)))], OWNED, ALLOCATED, kind_of)
    assert not report.borrowed and [r.offset for r in report.unconfirmed] == [568], str(report)
    assert report.owned == {"the runners' graph pool": 2}
    assert "1 unconfirmed" in str(report) and "unconfirmed: the graph of size 8" in str(report)
    report.check()  # listed, not a finding


def test_memory_several_graphs_borrow_is_a_finding_named_by_graph_kernel_and_block():
    report = classify([("the graph of size 8", scan((16, TABLE, True))),
                       ("the graph of size 64", scan((16, TABLE + 256, True)))], OWNED, ALLOCATED, kind_of)
    assert [r.graph for r in report.borrowed] == ["the graph of size 8", "the graph of size 64"]
    assert not report.unconfirmed
    with pytest.raises(gr.GraphHazardError, match=r"the graph of size 8 uses memory nothing keeps alive for it: "
                                                  r"the graph of size 8: elementwise_kernel \(parameter byte 16\) "
                                                  r"-> 0x7f0001000000, a live allocation of 4096 bytes.* 2 "
                                                  r"reference\(s\) to 2 address\(es\) in all"):
        report.check()


@pytest.mark.parametrize("scans", [
    pytest.param([("the graph of size 8", scan((0, TABLE, False))), ("the graph of size 64", scan())],
                 id="pointer-sized parameter"),
    pytest.param([("the graph of size 8", scan((568, TABLE, True)))], id="the only graph"),
])
def test_a_pointer_parameter_or_a_lone_graph_needs_no_second_graph(scans):
    report = classify(scans, OWNED, ALLOCATED, kind_of)
    assert [r.address for r in report.borrowed] == [TABLE] and not report.unconfirmed
    with pytest.raises(gr.GraphHazardError, match="uses memory nothing keeps alive"):
        report.check()


def test_freed_and_foreign_memory_are_listed_not_found_at_fault():
    report = classify([("the graph of size 8", scan((0, FREED, False), (8, FOREIGN, False), (16, 0x1234567, False)))],
                      OWNED, ALLOCATED, kind_of)
    assert [r.address for r in report.stale] == [FREED]
    assert [r.memory for r in report.external] == ["device memory outside torch's allocator"]
    assert not report.borrowed and not report.unconfirmed and report.nodes == 1
    report.check()
