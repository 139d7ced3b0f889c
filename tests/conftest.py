"""Shared test helpers. Only torch and pytest load with this file: graphrunner and graphrunner_workloads are
imported where a helper runs, so a checkout whose core is not built still collects (test_checkout_import.py)."""
from __future__ import annotations

import dataclasses
import functools
import gc
import socket
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from graphrunner_workloads.decoder import Decoder

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (this machine has none; CI never has one)")


def free_port() -> int:
    """A TCP port on localhost nobody listens on, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fresh_memory():
    """Empties the allocator's cache before and after, so reserved-memory checks see only the test."""
    if HAS_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    yield
    if HAS_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def settle():
    """Frees what only the garbage collector would, waits for the device and empties the allocator's cache: what
    leak checks do before each reading."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def segments():
    """The allocator's segments: (address, bytes, pool id)."""
    from graphrunner.pool import allocator_segments

    return {(s["address"], s["total_size"], tuple(s["segment_pool_id"])) for s in allocator_segments()}


def segments_since(before):
    """Explains a reserved-memory mismatch: segments that appeared or went since `before`."""
    now = segments()
    return f"new segments {sorted(now - before)}, freed segments {sorted(before - now)}"


def reference_flash(calls, q, keys, values, cu_q, cu_k, max_q, max_k, dropout, causal, debug):
    """aten::_flash_attention_forward's varlen call on the CPU, for the tests: each request's queries attend to its
    keys, causally aligned to its last key; rows past the last request are left NaN. It records max_q and max_k,
    and checks that they bound every request."""
    calls.append((max_q, max_k))
    out = torch.full_like(q, float("nan"))
    for r in range(cu_q.shape[0] - 1):
        (qs, qe), (ks, ke) = cu_q[r:r + 2].tolist(), cu_k[r:r + 2].tolist()
        assert qe - qs <= max_q and ke - ks <= max_k and causal and dropout == 0.0
        if qe > qs:
            mask = torch.arange(ke - ks)[None, :] <= torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
            out[qs:qe] = torch.nn.functional.scaled_dot_product_attention(
                q[qs:qe].transpose(0, 1), keys[ks:ke].transpose(0, 1), values[ks:ke].transpose(0, 1),
                attn_mask=mask).transpose(0, 1)
    return out, None, None, None, None


@pytest.fixture
def cpu_flash(monkeypatch):
    """The varlen kernel's calls (max_q, max_k), the kernel replaced by reference_flash so ragged.py's "flash" and
    piecewise.py's "varlen" and "packed" run on the CPU in float32."""
    from graphrunner_workloads import piecewise, ragged

    calls = []
    monkeypatch.setattr(ragged, "_FLASH", functools.partial(reference_flash, calls))
    monkeypatch.setattr(piecewise, "flash_runs", lambda decoder: True)
    monkeypatch.setattr(ragged, "flash_runs", lambda decoder: True)
    return calls


def float32_twin(decoder: Decoder) -> Decoder:
    """A float32 Decoder holding a bfloat16 `decoder`'s weights and KV cache exactly (widened): its steps are the
    truth the bfloat16 kernels are measured against. Copy the cache again (sync_cache) before each step."""
    from graphrunner_workloads.decoder import Decoder

    twin = Decoder(dataclasses.replace(decoder.cfg, dtype=torch.float32), device=str(decoder.embed.device))
    twin.load_state_dict(decoder.state_dict())
    sync_cache(twin, decoder)
    return twin


def sync_cache(twin: Decoder, decoder: Decoder) -> None:
    """`decoder`'s KV cache into its float32 twin's."""
    twin.k_cache.copy_(decoder.k_cache)
    twin.v_cache.copy_(decoder.v_cache)


def assert_as_close_as_sdpa(got: torch.Tensor, sdpa: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """A bfloat16 step's output `got` is as close to the float32 `truth` as the bfloat16 masked SDPA step's output
    `sdpa` is (within twice its relative error, plus 1e-3): kernels that sum in other orders round differently, and
    element by element near-zero logits differ relatively by far more than bfloat16's rounding."""
    truth = truth.float()

    def error(x: torch.Tensor) -> float:
        return float((x.float() - truth).norm() / truth.norm())

    # A twin that is not the same step (another cache, other weights) would make SDPA's error large and pass anything.
    assert error(sdpa) < 5e-2, f"{what}: bfloat16 SDPA is {error(sdpa):.2e} from float32: the twin is not the same step"
    assert error(got) <= 2 * error(sdpa) + 1e-3, \
        f"{what}: relative error {error(got):.2e} from float32, against bfloat16 SDPA's {error(sdpa):.2e}"
