"""Ranks agreeing on each capture phase: two processes in a gloo process group on the CPU, no GPU needed."""
import re
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from graphrunner.distributed import RankAgreement, SoloAgreement
from graphrunner.errors import DistributedCaptureError

TIMEOUT_S = 3.0


def expect_error(text: str):
    return pytest.raises(DistributedCaptureError, match=re.escape(text))


def fail_on_rank_one(ranks: RankAgreement):
    with ranks.phase("capture of size 64"):
        if ranks.rank == 1:
            raise ValueError("boom")


def agree_across_two_ranks(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ranks = RankAgreement(TIMEOUT_S)
    store_timeout = ranks.store.timeout
    assert ranks.exchange("reports", value=f"report of {rank}") == ["report of 0", "report of 1"]
    assert ranks.store.timeout == store_timeout  # the shared store keeps its own timeout
    with ranks.phase("warm-up"):
        pass
    ranks.same_everywhere("capture_order", [8, 4, 2, 1])

    with expect_error("capture of size 64 failed on 1 of 2 ranks, so every rank stops: rank 1: ValueError: boom") \
            as found:
        fail_on_rank_one(ranks)
    assert isinstance(found.value.__cause__, ValueError) == (rank == 1)

    with expect_error("ranks disagree on capture_order: rank 0: [8, 1]; rank 1: [8, 2]"):
        ranks.same_everywhere("capture_order", [8, rank + 1])

    # A rank that never reports (dead or hung): the other one raises within the timeout.
    if rank == 0:
        start = time.monotonic()
        with expect_error(f"capture of size 8: no word from rank(s) 1 within {TIMEOUT_S:g} s"):
            ranks.exchange("capture of size 8")
        assert time.monotonic() - start < TIMEOUT_S + 10


def test_every_rank_raises_when_one_fails():
    mp.spawn(agree_across_two_ranks, args=(free_port(),), nprocs=2, join=True)


def test_a_single_process_agrees_with_itself():
    solo = SoloAgreement()
    with solo.phase("warm-up"):
        pass
    assert solo.exchange("reports", value=3) == [3]
    with pytest.raises(ValueError, match="boom"):
        with solo.phase("capture of size 1"):
            raise ValueError("boom")
