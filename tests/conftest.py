import functools
import gc
import socket

import pytest
import torch

from graphrunner_workloads import piecewise, ragged

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
    return {(s["address"], s["total_size"], tuple(s["segment_pool_id"])) for s in torch.cuda.memory_snapshot()}


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
    calls = []
    monkeypatch.setattr(ragged, "_FLASH", functools.partial(reference_flash, calls))
    monkeypatch.setattr(piecewise, "flash_runs", lambda decoder: True)
    monkeypatch.setattr(ragged, "flash_runs", lambda decoder: True)
    return calls
