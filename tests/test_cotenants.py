"""Graphs that survive the rest of the process: every co-tenant trigger, the audit, the kept workspaces."""
import weakref

import pytest
import torch

import graphrunner as gr
from conftest import gpu, segments, segments_since
from graphrunner_workloads.cotenants import INPUTS, MLP, SIZES, TRIGGERS, missing, survives

pytestmark = gpu

CASES = [pytest.param(trigger, bias, id=f"{trigger}-{'bias' if bias else 'nobias'}",
                      marks=pytest.mark.skipif(bool(missing(trigger)), reason=missing(trigger) or ""))
         for trigger in TRIGGERS for bias in (False, True)]


@pytest.mark.parametrize("trigger,bias", CASES)
def test_replays_stay_equal_to_eager_after_the_trigger(trigger, bias):
    model = MLP(bias)
    with gr.GraphRunner(model, INPUTS, capture_sizes=SIZES) as runner:
        report = runner.capture()
        assert report.workspace_bytes > 0, "the runner kept no cuBLAS workspace for its graphs"
        assert survives(runner, model, rounds=1) <= 3e-2
        TRIGGERS[trigger](torch.cuda.Stream())
        assert survives(runner, model) <= 3e-2


def test_audit_of_a_clean_model_finds_nothing_borrowed():
    model = MLP(bias=False)
    with gr.GraphRunner(model, INPUTS, capture_sizes=SIZES) as runner:
        runner.capture()
        report = runner.audit()
        assert report.graphs == len(SIZES) and report.nodes > len(SIZES)
        assert not report.borrowed, str(report)
        assert report.owned.get("memory declared long-lived (parameters, buffers, keep=, gr.workspace)", 0) > 0
        assert any("workspace the runner keeps alive" in what for what in report.owned), str(report)
        runner.validate(steps_per_size=1)


def test_audit_names_an_undeclared_buffer_and_keep_declares_it():
    table = torch.randn(64, 256, device="cuda")
    lookup = weakref.ref(table)  # fn reaches the table only through a weak reference: it does not hold it

    def add_table(x):
        return x + lookup()[: x.shape[0]]

    inputs = {"x": gr.StaticInput((256,), torch.float32)}
    with gr.GraphRunner(add_table, inputs, capture_sizes=[8, 64]) as runner:
        runner.capture()
        report = runner.audit()
        hit = [r for r in report.borrowed if table.data_ptr() <= r.address < table.data_ptr() + table.nbytes]
        assert hit and {r.graph for r in hit} == {"the graph of size 8", "the graph of size 64"}, str(report)
        assert "a live allocation" in hit[0].memory
        with pytest.raises(gr.GraphHazardError, match=r"the graph of size \d+ uses memory nothing keeps alive for "
                                                      r"it: .*parameter byte \d+\) -> 0x[0-9a-f]+, a live allocation"):
            runner.validate()
    with gr.GraphRunner(add_table, inputs, capture_sizes=[8, 64], keep=[table]) as runner:
        runner.capture()
        assert not runner.audit().borrowed
        runner.validate(steps_per_size=1)


def test_kept_workspaces_are_counted_and_given_back(fresh_memory):
    model = MLP(bias=True)
    model(torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16))  # this stream's own workspace, made first
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start, before = torch.cuda.memory_reserved(), segments()
    runner = gr.GraphRunner(model, INPUTS, capture_sizes=SIZES)
    report = runner.capture()
    kept = runner.record.workspace_blocks()
    assert kept and report.workspace_bytes == sum(nbytes for _, _, nbytes in kept)
    assert "workspaces kept" in report.summary()
    runner.close()
    assert torch.cuda.memory_reserved() == start, segments_since(before)


def test_runners_captured_together_share_one_workspace_hold():
    model = MLP(bias=False)
    a = gr.GraphRunner(model, INPUTS, capture_sizes=[4, 64], name="a")
    b = gr.GraphRunner(model, INPUTS, capture_sizes=[1, 16], name="b")
    gr.capture_all(a, b)
    assert a.record.workspaces is b.record.workspaces
    a.close()
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    assert survives(b, model) <= 3e-2  # b's graphs still have their workspace
    b.close()
