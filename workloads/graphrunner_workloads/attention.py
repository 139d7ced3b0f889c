"""Attention backends of the built-in decoder: SDPA (always there, any device), graphrunner's decode kernel
(CUDA), flash-attn 4 and flash-attn 2.

Every backend takes q [batch, heads, dim], one layer's KV cache and the step's `AttentionMeta`, and
returns [batch, heads, dim]. A paged cache is [num_pages, page_size, heads, dim] with each row's pages
listed in `meta.page_table`; a contiguous one (SDPA and decode) is [batch, heads, cache_len, dim].

SDPA masks every row's keys beyond its length, so it reads and computes over the whole cache each step. "decode"
reads only the keys each row has, as a serving engine's decode kernel does (split over the keys, then merged:
decode_attention_kernels.cu). It and flash-attn 4 are torch custom ops with fakes, so torch.compile traces each
as one call.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

EXTRAS = {"flash-attn-4": ("flash_attn.cute", "pip install .[flash-attn-4]"),
          "flash-attn": ("flash_attn.flash_attn_interface", "pip install .[flash-attn]")}


@dataclass
class AttentionMeta:
    """What every layer's attention reads, computed once per step."""

    seq_lens: torch.Tensor                # [batch] int32: keys each row attends to
    page_table: Optional[torch.Tensor]    # [batch, pages_per_seq] int32, paged caches only
    valid: Optional[torch.Tensor] = None  # [batch, cache_len] bool key mask, SDPA only


Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMeta], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMeta) -> torch.Tensor:
    if meta.page_table is not None:  # gather each row's pages into [batch, heads, cache_len, dim]
        k_cache = k_cache[meta.page_table].flatten(1, 2).transpose(1, 2)
        v_cache = v_cache[meta.page_table].flatten(1, 2).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k_cache, v_cache, attn_mask=meta.valid[:, None, None, :])
    return out[:, :, 0, :]


def _attention_op(name: str, forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`forward(q, k_cache, v_cache, seq_lens, page_table)` as the torch custom op graphrunner_workloads::`name`,
    with a fake (the output has q's shape and dtype), so torch.compile traces it as one call."""

    @torch.library.custom_op(f"graphrunner_workloads::{name}", mutates_args=(), device_types="cuda")
    def op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
           page_table: Optional[torch.Tensor]) -> torch.Tensor:
        return forward(q, k_cache, v_cache, seq_lens, page_table)

    @op.register_fake
    def _(q, k_cache, v_cache, seq_lens, page_table):
        return q.new_empty(q.shape)

    return op


@functools.lru_cache(None)
def decode_op() -> Callable[..., torch.Tensor]:
    """The op graphrunner_workloads::decode_attention(q, k_cache, v_cache, seq_lens, page_table), defined on first
    use around the kernels of graphrunner_workloads._decode_attention. Bad arguments raise ValueError naming them,
    a failed launch RuntimeError."""
    kernels = importlib.import_module("graphrunner_workloads._decode_attention")

    def forward(q, k_cache, v_cache, seq_lens, page_table):
        out = q.new_empty(q.shape)
        status, why = kernels.forward(q, k_cache, v_cache, seq_lens, page_table, out)
        if status:
            raise (ValueError if status == 1 else RuntimeError)(why)
        return out

    return _attention_op("decode_attention", forward)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMeta) -> torch.Tensor:
    # Through torch.ops, which torch.compile traces; attention_backend("decode") defined the op.
    return torch.ops.graphrunner_workloads.decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.page_table)


@functools.lru_cache(None)
def flash_attn_4_op() -> Callable[..., torch.Tensor]:
    """The op graphrunner_workloads::flash_attn_4(q, k_cache, v_cache, seq_lens, page_table) around flash-attn 4's
    varlen forward, defined on first use. As an op, torch.compile keeps the call whole, as serving engines register
    their attention, instead of tracing into flash_attn.cute's Python. Lengths and pages are read on the device
    (seqused_k, page_table), so one captured graph serves every length; the host-side bound comes from the page
    table's width, fixed per runner."""
    from flash_attn.cute import flash_attn_varlen_func

    def forward(q, k_cache, v_cache, seq_lens, page_table):
        out, _ = flash_attn_varlen_func(q[:, None], k_cache, v_cache, seqused_k=seq_lens, page_table=page_table)
        return out[:, 0]

    return _attention_op("flash_attn_4", forward)


def flash_attn_4_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMeta) -> torch.Tensor:
    # Through torch.ops, which torch.compile traces; attention_backend("flash-attn-4") defined the op.
    return torch.ops.graphrunner_workloads.flash_attn_4(q, k_cache, v_cache, meta.seq_lens, meta.page_table)


def flash_attn_2_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMeta) -> torch.Tensor:
    from flash_attn import flash_attn_with_kvcache

    out = flash_attn_with_kvcache(q[:, None], k_cache, v_cache, cache_seqlens=meta.seq_lens,
                                  block_table=meta.page_table)
    return out[:, 0]


BACKENDS = {"sdpa": sdpa_attention, "decode": decode_attention, "flash-attn-4": flash_attn_4_attention,
            "flash-attn": flash_attn_2_attention}
# Page size each backend gets by default: flash-attn 4 loads whole pages by TMA when a page is one key tile
# (128); flash-attn 2's paged path needs multiples of 256; SDPA and decode default to a contiguous cache (0).
DEFAULT_PAGE_SIZE = {"sdpa": 0, "decode": 0, "flash-attn-4": 128, "flash-attn": 256}


def attention_backend(name: str) -> Attention:
    """The backend called `name`; ImportError naming the extra to install when its package is missing."""
    if name not in BACKENDS:
        raise ValueError(f"attention must be one of {tuple(BACKENDS)}, got {name!r}")
    if name in EXTRAS:
        module, install = EXTRAS[name]
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(f"attention backend {name!r} needs the package that provides {module}: "
                              f"{install}") from exc
    if name == "decode":
        decode_op()  # loads the kernels now: a build without them fails here, not in the first step
    elif name == "flash-attn-4":
        flash_attn_4_op()
    return BACKENDS[name]
