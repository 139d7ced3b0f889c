"""The Reliability issue's under-allocated metadata with a real kernel: flash-attn 4's paged decode.

Serving engines copy the scheduler's page table into a buffer the attention kernel reads, once per step,
with a kernel that indexes it through a raw pointer (Triton, CUDA). Here the graph path sizes that buffer
for the pages the capture's dummy batch needs (its lengths are 1: one page per row), while every replay
writes whole rows of PAGES_PER_SEQ entries. Eager steps size it right, so eager output is correct.
"""
from __future__ import annotations

import torch

import graphrunner as gr
from graphrunner_workloads.memory import raw_bytes

HEADS, HEAD_DIM = 2, 64
PAGE_SIZE, PAGES_PER_SEQ = 128, 128  # up to 16K keys per row
NUM_PAGES = 64  # rows may share pages: the kernel only reads them
INPUTS = {"q": gr.StaticInput((HEADS, HEAD_DIM), torch.bfloat16),
          "page_table": gr.StaticInput((PAGES_PER_SEQ,), torch.int32, pad=0, low=0, high=NUM_PAGES),
          "seq_lens": gr.StaticInput((), torch.int32, pad=1, low=1, high=PAGE_SIZE * PAGES_PER_SEQ + 1)}


class PagedDecode(torch.nn.Module):
    """Paged decode over a random KV cache (module buffers, so the audit sees them as declared)."""

    def __init__(self, fixed: bool, device: str = "cuda") -> None:
        super().__init__()
        self.fixed = fixed
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (NUM_PAGES, PAGE_SIZE, HEADS, HEAD_DIM)
        for name in ("k_cache", "v_cache"):
            self.register_buffer(name, torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16))

    def forward(self, q: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        from flash_attn.cute import flash_attn_varlen_func

        rows = q.shape[0]
        capturing = torch.cuda.is_current_stream_capturing()
        entries = rows * PAGES_PER_SEQ if (self.fixed or not capturing) else rows  # the bug: one page per row
        buffer = torch.empty(entries, dtype=torch.int32, device=q.device)
        # The kernel's view: rows x PAGES_PER_SEQ entries at the buffer's address, whatever its size.
        table = raw_bytes(buffer.data_ptr(), page_table.numel() * 4, q.device).view(torch.int32)
        table = table.view(page_table.shape)
        table.copy_(page_table)
        out, _ = flash_attn_varlen_func(q[:, None], self.k_cache, self.v_cache, seqused_k=seq_lens, page_table=table)
        del buffer  # kept alive until the kernel that reads it is queued
        return out[:, 0]
