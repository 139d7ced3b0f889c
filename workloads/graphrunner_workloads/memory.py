"""Tensors over device memory that do not own it: the workloads' raw pointers (page tables, slot buffers) and the
output aliases of the bench's pool measurement (bench.pool_bytes)."""
from __future__ import annotations

import torch


def raw_bytes(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over `nbytes` of device memory at `address`, through the CUDA array interface."""
    interface = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 2}
    return torch.as_tensor(type("RawMemory", (), {"__cuda_array_interface__": interface})(), device=device)


def alias(t: torch.Tensor) -> torch.Tensor:
    """A view of t (same shape, strides, dtype) that does not keep t's memory allocated, as GraphRunner's outputs
    are: valid until the memory is reused."""
    storage = t.untyped_storage()
    return raw_bytes(storage.data_ptr(), storage.nbytes(), t.device).view(t.dtype).as_strided(
        t.shape, t.stride(), t.storage_offset())
