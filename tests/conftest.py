import pytest
import torch

HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (this machine has none; CI never has one)")


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
