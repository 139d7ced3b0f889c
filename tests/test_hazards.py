"""Shared-pool hazards: each reproduction is named by validate(), its fix passes, and the tools around it."""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import graphrunner as gr
from conftest import free_port, gpu
from graphrunner.errors import DistributedCaptureError
from graphrunner_workloads.common_runner import CommonRunner
from graphrunner_workloads.reproductions import INPUTS, REPRODUCTIONS, SIZES, WIDTH, make, under_allocated

pytestmark = gpu

FINDINGS = {
    "under-allocated metadata": r"graph of size \d+ \(batch \d+\) wrote out of bounds into",
    "stale workspace counter": r"reads the \d+-byte buffer that the capture of size \d+ allocated",
    "capture-allocated cache": r"reads allocation kept alive after the capture of size 64",
    "under-allocated page table (flash-attn 4)": r"graph of size \d+ \(batch \d+\) wrote out of bounds into",
}
NAMES = [pytest.param(name, marks=pytest.mark.skipif(bool(repro.missing()), reason=repro.missing() or ""))
         for name, repro in REPRODUCTIONS.items()]


def runner_for(name, fixed=False, **kw):
    runner = gr.GraphRunner(make(name, fixed), REPRODUCTIONS[name].inputs, max_batch_size=max(SIZES),
                            capture_sizes=SIZES, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner.capture()
    return runner


@pytest.mark.parametrize("name", NAMES)
def test_validate_names_size_and_buffer(name):
    runner = runner_for(name)
    try:
        with pytest.raises(gr.GraphHazardError, match=FINDINGS[name]) as found:
            runner.validate(scrub=True, guard=True, steps_per_size=3)
        assert found.value.size in SIZES and found.value.buffer
        assert "gr.workspace" in str(found.value)
    finally:
        runner.close()


@pytest.mark.parametrize("name", NAMES)
def test_fixed_twin_passes(name):
    runner = runner_for(name, fixed=True)
    try:
        report = runner.validate(scrub=True, guard=True, steps_per_size=3)
        assert report.replays == 3 * len(SIZES)
    finally:
        runner.close()


def test_findings_are_deterministic():
    found = []
    for _ in range(2):
        runner = runner_for("under-allocated metadata")
        with pytest.raises(gr.GraphHazardError) as info:
            runner.validate(scrub=True, guard=True, steps_per_size=3, seed=7)
        found.append((info.value.size, info.value.buffer, info.value.offset))
        runner.close()
    assert found[0] == found[1]


def test_common_runner_shows_the_corruption():
    """The common runner (torch.cuda.CUDAGraph per size in one pool, outputs kept): right outputs, while size 32's
    replay corrupts size 64's live output."""
    runner = CommonRunner(under_allocated, {"x": torch.randn(64, WIDTH, device="cuda")}, SIZES)
    out64 = runner(x=torch.randn(64, WIDTH, device="cuda"))
    kept = out64.clone()
    x32 = torch.randn(32, WIDTH, device="cuda")
    torch.testing.assert_close(runner(x=x32), under_allocated(x32))
    torch.cuda.synchronize()
    assert not torch.equal(runner.outputs[64], kept), "expected size 32 to overwrite size 64's live output"
    runner.close()


def test_capture_guard_warns_then_strict_raises():
    runner = gr.GraphRunner(make("capture-allocated cache"), INPUTS, max_batch_size=64, capture_sizes=SIZES)
    with pytest.warns(gr.CaptureGuardWarning, match="capture of size 64 left 1 allocation\\(s\\) alive"):
        runner.capture()
    runner.close()
    strict = gr.GraphRunner(make("capture-allocated cache"), INPUTS, max_batch_size=64, capture_sizes=SIZES,
                            strict=True, debug=True)
    with pytest.raises(gr.GraphHazardError, match=r"(?s)left 1 allocation.*reproductions/__init__.py"):
        strict.capture()
    assert strict.state is gr.RunnerState.UNARMED and strict.record is None


def test_isolate_runs_the_check_in_a_child():
    runner = runner_for("under-allocated metadata")
    with pytest.raises(gr.GraphHazardError, match="wrote out of bounds"):
        runner.validate(scrub=True, guard=True, isolate=True)
    x = torch.randn(3, WIDTH, device="cuda")
    torch.testing.assert_close(runner(x=x), under_allocated(x))  # our context is fine
    runner.close()


def test_isolate_needs_a_picklable_fn():
    runner = gr.GraphRunner(lambda x: x * 2, INPUTS, max_batch_size=4)
    runner.capture()
    with pytest.raises(TypeError, match="fn must be picklable"):
        runner.validate(isolate=True)
    runner.close()


def test_workspace_rules():
    ws = gr.workspace("tests.rules", 64, zero=True)
    assert ws.numel() == 64 and not ws.any()
    with pytest.raises(gr.WorkspaceError, match="ask for the largest size at the first request"):
        gr.workspace("tests.rules", 128)
    g = gr.Graph()
    with pytest.raises(gr.WorkspaceError, match="first requested inside a CUDA graph capture"):
        with g.capture():
            gr.workspace("tests.inside", 16)


def validate_on_two_ranks(rank: int, port: int) -> None:
    # Two processes on one GPU: the group (gloo) serves only the outcome exchanges; rank 1 has the hazard.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        runner = runner_for("stale workspace counter", fixed=rank == 0, collective_timeout_s=60)
        with pytest.raises(DistributedCaptureError, match=r"validate step \d+ \(size \d+, batch \d+\) failed on 1 of "
                                                          r"2 ranks.*rank 1: GraphHazardError: the graph of size") \
                as found:
            runner.validate(scrub=True, guard=True, steps_per_size=3)
        assert "not bisected in a distributed run" in str(found.value)
        assert isinstance(found.value.__cause__, gr.GraphHazardError) == (rank == 1)
        runner.close()
    finally:
        dist.destroy_process_group()


def test_a_hazard_on_one_rank_stops_every_rank():
    """validate() in a distributed run: each step ends with every rank's outcome, so the rank without the
    hazard raises too instead of replaying on into graphs whose collectives the other rank never joins."""
    mp.spawn(validate_on_two_ranks, args=(free_port(),), nprocs=2, join=True)
