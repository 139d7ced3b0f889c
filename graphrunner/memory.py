"""Tensors over allocator memory that do not own it."""
from __future__ import annotations

import torch


def raw_bytes(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over `nbytes` of device memory at `address`, through the CUDA array interface."""

    class _Memory:
        __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 2}

    return torch.as_tensor(_Memory(), device=device)


def alias(t: torch.Tensor) -> torch.Tensor:
    """A view with t's shape, strides and dtype over t's memory that does not keep that memory allocated.

    A graph's outputs are aliased so the pool can lend their memory to the next (smaller) capture: outputs
    are valid only until the next step anyway, which is how largest-first capture costs about one graph.
    """
    storage = t.untyped_storage()
    raw = raw_bytes(storage.data_ptr(), storage.nbytes(), t.device)
    return raw.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
