import gc
import socket

import pytest
import torch

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
