"""GraphRunner's argument checks and state errors, and its reading of pools, which need no GPU."""
import sys

import pytest
import torch

import graphrunner as gr
from conftest import HAS_GPU
from graphrunner.pool import allocator_segments, pool_blocks, pool_segments

IDS = {"ids": gr.StaticInput((), torch.long)}


def echo(ids):
    return ids * 2


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="fallback must be 'eager' or 'error'"):
        gr.GraphRunner(echo, IDS, max_batch_size=8, fallback="skip")
    with pytest.raises(TypeError, match=r"inputs\['ids'\] must be a gr.StaticInput"):
        gr.GraphRunner(echo, {"ids": (torch.long,)}, max_batch_size=8)
    with pytest.raises(TypeError, match="fn must be callable"):
        gr.GraphRunner(3, IDS, max_batch_size=8)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        gr.GraphRunner(echo, IDS, max_batch_size=8, warmup=-1)
    with pytest.raises(ValueError, match="capture_sizes must be ints in 1..max_batch_size"):
        gr.GraphRunner(echo, IDS, max_batch_size=8, capture_sizes=[4, 16])


def test_capture_order_and_sizes():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=40)
    assert runner.capture_sizes == [1, 2, 4, 8, 12, 16, 24, 32, 40]
    assert runner.capture_order == [40, 32, 24, 16, 12, 8, 4, 2, 1]


def test_call_before_capture_says_capture_first():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    with pytest.raises(gr.GraphStateError, match="capture\\(\\) has not run yet"):
        runner(ids=torch.zeros(2, dtype=torch.long))


def test_positional_inputs_are_refused_by_name():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    with pytest.raises(TypeError, match=r"takes its inputs by name, e.g. runner\(input_ids=ids\), got 1 positional"):
        runner(torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised where no CUDA device exists")
def test_capture_without_cuda_is_a_clear_error():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    with pytest.raises(RuntimeError, match="graphrunner needs a CUDA device"):
        runner.capture()
    with pytest.raises(RuntimeError, match="graphrunner needs a CUDA device"):
        with gr.Graph().capture():
            pass


def test_closed_runner_refuses_calls():
    runner = gr.GraphRunner(echo, IDS, max_batch_size=8)
    runner.close()
    with pytest.raises(gr.GraphStateError, match="closed"):
        runner(ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(gr.GraphStateError, match="closed"):
        runner.capture()


def test_reading_the_allocator_drops_no_reference_it_does_not_own():
    """torch.cuda.memory_snapshot(mempool_id, include_traces) drops a reference to each item it hands torch, the
    pool id's and include_traces (pool.py, Note [snapshots that take no arguments]); past 256 pools a pool id's
    items are ints of their own, which enough readings would free while a record still holds them, and before
    Python 3.12 so are 0, False and True. Reading pools and the allocator leaves every count as it was."""
    pool = (int("1000003"), int("1000033"))
    watched = (*pool, 0, False, True)
    held = [*pool] * 10  # so that dropped references fail the check below instead of freeing the ints
    before = [sys.getrefcount(item) for item in watched]
    device = torch.device("cuda", 0)
    for _ in range(3):
        pool_blocks(pool, device)
        pool_segments(pool, device)
        allocator_segments()
    assert [sys.getrefcount(item) for item in watched] == before and len(held) == 20
