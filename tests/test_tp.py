"""Tensor parallel through torch.distributed on NCCL: collectives captured inside the graphs.

One GPU: a world of one, whose all-reduces are captured like any other. Two GPUs (skipped with fewer):
TP=2 against the TP=1 model built from the same seed, and a capture failure on one rank ending both.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
"""
import functools
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import graphrunner as gr
from conftest import free_port, gpu
from graphrunner.errors import DistributedCaptureError
from graphrunner.testing import relative_error
from graphrunner_workloads.decoder import DecoderConfig, Decoder, random_decode_inputs, decode_inputs

pytestmark = gpu
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

# A paged cache: padding rows (warm-up, capture, padded replays) write only the scratch page, so a model
# that went through a runner and one that did not hold the same cache for the real rows.
CFG = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=64,
                    page_size=16, max_batch_size=256)
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (this machine has fewer)")


class CountingDecoder(Decoder):
    """Counts the all-reduces issued inside a capture (NCCL turns a one-rank all-reduce into no graph node)."""

    captured_all_reduces = 0

    def _all_reduce(self, x):
        self.captured_all_reduces += torch.cuda.is_current_stream_capturing()
        return super()._all_reduce(x)


def test_world_of_one_captures_the_all_reduces():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        plain, reducing = Decoder(CFG), CountingDecoder(CFG, tp_group=dist.group.WORLD)
        sizes = [64, 8, 1]
        with gr.GraphRunner(reducing, decode_inputs(CFG), max_batch_size=64, capture_sizes=sizes) as runner:
            report = runner.capture()
            assert reducing.captured_all_reduces == 2 * CFG.layers * len(sizes)
            assert report.rank == 0 and report.ranks == []  # one rank: nothing to gather
            gen = torch.Generator(device="cuda").manual_seed(0)
            for batch in (1, 5, 64):
                step = random_decode_inputs(CFG, batch, gen)
                with torch.no_grad():
                    want = plain(**step)
                assert relative_error(runner(**step), want) < 2e-2
            runner.validate(scrub=True, guard=True, make_inputs=functools.partial(random_decode_inputs, CFG))
    finally:
        dist.destroy_process_group()


class FailsOnRank:
    """The step function, except that one rank raises while capturing one size."""

    def __init__(self, model, rank: int, size: int) -> None:
        self.model, self.rank, self.size = model, rank, size

    def __call__(self, **inputs):
        if (torch.cuda.is_current_stream_capturing() and dist.get_rank() == self.rank
                and inputs["input_ids"].shape[0] == self.size):
            raise RuntimeError(f"injected failure while capturing size {self.size}")
        return self.model(**inputs)


def tp_worker(rank: int, port: int, world: int, scenario: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    try:
        sharded = Decoder(CFG, tp_rank=rank, tp_size=world)
        if scenario == "matches":
            whole = Decoder(CFG)  # the TP=1 model from the same seed, on this rank's GPU
            with gr.GraphRunner(sharded, decode_inputs(CFG), max_batch_size=CFG.max_batch_size) as runner:
                report = runner.capture()
                assert [r.rank for r in report.ranks] == list(range(world))
                runner.validate(make_inputs=functools.partial(random_decode_inputs, CFG))
                gen = torch.Generator(device="cuda").manual_seed(1)
                for batch in (1, 7, 64, 256):
                    step = random_decode_inputs(CFG, batch, gen)
                    got = runner(**step).clone()
                    with torch.no_grad():
                        want = whole(**step)
                    err = relative_error(got, want)
                    assert err < 2e-2, f"rank {rank}, batch {batch}: relative error {err:.3g} against TP=1"
        else:
            runner = gr.GraphRunner(FailsOnRank(sharded, rank=1, size=64), decode_inputs(CFG),
                                    max_batch_size=CFG.max_batch_size, collective_timeout_s=60)
            start = time.monotonic()
            with pytest.raises(DistributedCaptureError, match="capture of size 64 failed on 1 of 2 ranks.*"
                                                              "rank 1: RuntimeError: injected failure"):
                runner.capture()
            assert time.monotonic() - start < 60 and runner.record is None
            runner.close()
    finally:
        dist.destroy_process_group()


@two_gpus
def test_tp2_equals_tp1_under_validate():
    mp.spawn(tp_worker, args=(free_port(), 2, "matches"), nprocs=2, join=True)


@two_gpus
def test_capture_failure_on_one_rank_ends_every_rank():
    mp.spawn(tp_worker, args=(free_port(), 2, "fails"), nprocs=2, join=True)
