"""The built-in workload of the benchmark and tests: one decode step of a small Llama-style decoder with random weights.

RMSNorm, fused QKV, rotary embedding, attention over a preallocated KV cache with per-row sequence
lengths, SwiGLU MLP, final norm and LM head. Launch-bound by default (8 layers, hidden 1024, 8 heads of
128, a KV cache of 512 positions), so the host cost of a step is what a benchmark of it sees.

The KV cache is contiguous per row (row i uses slot i) or paged (`page_size` > 0, as the flash-attn
backends need): then `page_table` [batch, pages_per_seq] is a step input naming each row's pages, and
page 0 is a scratch page that padding rows (page table padded with 0) write to. A contiguous row has one
position past cache_len, a scratch column that padding rows (positions padded with cache_len) write to and
attention never reads, so a padded step leaves every other row's keys as they were. The cache starts
random, so reading a wrong page shows in the output.

Tensor parallel: with `tp_size > 1` QKV and gate/up are column-parallel, the output and down
projections row-parallel, each followed by an all-reduce through torch.distributed (NCCL on GPUs). Every
rank draws the full weights and cache from one seed and keeps its shard, so a TP=N model equals the
TP=1 model built from the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import graphrunner as gr
from graphrunner_workloads.attention import BACKENDS, DEFAULT_PAGE_SIZE, AttentionMeta, attention_backend

ATTENTION_BACKENDS = tuple(BACKENDS)
CONTIGUOUS_BACKENDS = ("sdpa", "decode")  # the backends that also read a contiguous cache


@dataclass(frozen=True)
class DecoderConfig:
    layers: int = 8
    hidden: int = 1024
    heads: int = 8
    head_dim: int = 128
    intermediate: int = 2816
    vocab: int = 32000
    cache_len: int = 512
    max_batch_size: int = 256
    attention: str = "sdpa"
    page_size: Optional[int] = None  # None: the backend's default (attention.DEFAULT_PAGE_SIZE); 0: contiguous
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attention not in BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.page_size is None:
            object.__setattr__(self, "page_size", DEFAULT_PAGE_SIZE[self.attention])
        if self.page_size == 0 and self.attention not in CONTIGUOUS_BACKENDS:
            raise ValueError(f"attention {self.attention!r} needs a paged KV cache: set page_size, e.g. "
                             f"{DEFAULT_PAGE_SIZE[self.attention]}")
        if self.page_size < 0 or (self.page_size and self.cache_len % self.page_size):
            raise ValueError(f"page_size ({self.page_size}) must be 0 or divide cache_len ({self.cache_len})")

    @property
    def paged(self) -> bool:
        return self.page_size > 0

    @property
    def pages_per_seq(self) -> int:
        return self.cache_len // self.page_size

    @property
    def num_pages(self) -> int:
        """Every row's pages, plus page 0, the scratch page of padding rows."""
        return self.max_batch_size * self.pages_per_seq + 1


def decode_inputs(cfg: DecoderConfig) -> Dict[str, gr.StaticInput]:
    """The decode step's inputs. Pass `make_inputs=functools.partial(random_decode_inputs, cfg)` to validate(): a
    paged step needs distinct pages per row, which independent draws per input cannot give."""
    # A padding row's new key goes to a scratch place: page 0 (paged), or column cache_len of its row.
    inputs = {"input_ids": gr.StaticInput((), torch.long, pad=0, high=cfg.vocab),
              "positions": gr.StaticInput((), torch.long, pad=0 if cfg.paged else cfg.cache_len, high=cfg.cache_len),
              "seq_lens": gr.StaticInput((), torch.int32, pad=1, low=1, high=cfg.cache_len)}
    if cfg.paged:
        inputs["page_table"] = gr.StaticInput((cfg.pages_per_seq,), torch.int32, pad=0, low=1, high=cfg.num_pages)
    return inputs


def random_decode_inputs(cfg: DecoderConfig, batch: int, gen: Optional[torch.Generator] = None,
                device: str = "cuda") -> Dict[str, torch.Tensor]:
    """A valid decode step: each row's new token sits at position seq_len - 1; rows own distinct pages."""
    seq_lens = torch.randint(1, cfg.cache_len + 1, (batch,), generator=gen, device=device, dtype=torch.int32)
    step = {"input_ids": torch.randint(0, cfg.vocab, (batch,), generator=gen, device=device),
            "positions": (seq_lens - 1).long(), "seq_lens": seq_lens}
    if cfg.paged:
        pages = torch.randperm(cfg.num_pages - 1, generator=gen, device=device)[: batch * cfg.pages_per_seq] + 1
        step["page_table"] = pages.view(batch, cfg.pages_per_seq).to(torch.int32)
    return step


class Decoder(torch.nn.Module):
    """fn(input_ids, positions, seq_lens[, page_table]) -> logits [batch, vocab]."""

    def __init__(self, cfg: DecoderConfig = DecoderConfig(), device: str = "cuda", tp_rank: int = 0,
                 tp_size: int = 1, tp_group=None) -> None:
        super().__init__()
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Decoder(device={device!r}) needs a CUDA device, and torch.cuda.is_available() is "
                               f"False here (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if cfg.heads % tp_size or cfg.intermediate % tp_size:
            raise ValueError(f"heads ({cfg.heads}) and intermediate ({cfg.intermediate}) must divide by tp_size "
                             f"({tp_size})")
        # The all-reduces run over tp_group: the whole world by default when tp_size > 1; a group passed with
        # tp_size=1 runs them on one GPU too (a world of one), as the single-GPU tests do.
        if tp_group is None and tp_size > 1:
            tp_group = torch.distributed.group.WORLD
        self.cfg, self.tp_size, self.tp_group = cfg, tp_size, tp_group
        self.heads = cfg.heads // tp_size
        self.attend = attention_backend(cfg.attention)
        if torch.device(device).type != "cuda" and cfg.attention != "sdpa":
            raise ValueError(f"attention {cfg.attention!r} runs on CUDA devices only; use attention='sdpa' on "
                             f"{device}")
        gen = torch.Generator().manual_seed(cfg.seed)
        h, d, inter = cfg.hidden, cfg.heads * cfg.head_dim, cfg.intermediate

        def weight(rows: int, cols: int, shard: Optional[str] = None) -> torch.nn.Parameter:
            w = torch.randn(rows, cols, generator=gen) / cols ** 0.5
            if shard == "cols":  # column-parallel: this rank's output features
                w = w.chunk(tp_size, 0)[tp_rank]
            elif shard == "rows":  # row-parallel: this rank's input features
                w = w.chunk(tp_size, 1)[tp_rank]
            return torch.nn.Parameter(w.to(device=device, dtype=cfg.dtype), requires_grad=False)

        def column_parallel(*parts: int) -> torch.nn.Parameter:
            """Fused projections (QKV, gate/up), each part sharded by columns before fusing."""
            ws = [torch.randn(p, h, generator=gen) / h ** 0.5 for p in parts]
            w = torch.cat([x.chunk(tp_size, 0)[tp_rank] for x in ws])
            return torch.nn.Parameter(w.to(device=device, dtype=cfg.dtype), requires_grad=False)

        self.embed = weight(cfg.vocab, h)
        self.layers = torch.nn.ModuleList()
        for _ in range(cfg.layers):
            layer = torch.nn.Module()
            layer.qkv = column_parallel(d, d, d)
            layer.o = weight(h, d, "rows")
            layer.gate_up = column_parallel(inter, inter)
            layer.down = weight(h, inter, "rows")
            layer.norm1 = torch.nn.Parameter(torch.ones(h, device=device, dtype=cfg.dtype), requires_grad=False)
            layer.norm2 = torch.nn.Parameter(torch.ones(h, device=device, dtype=cfg.dtype), requires_grad=False)
            self.layers.append(layer)
        self.final_norm = torch.nn.Parameter(torch.ones(h, device=device, dtype=cfg.dtype), requires_grad=False)
        self.lm_head = weight(cfg.vocab, h)
        # Both layouts keep heads in one dim, so a TP rank keeps its heads of the one full random cache.
        if cfg.paged:
            cache, head_dim_index = (cfg.layers, cfg.num_pages, cfg.page_size, cfg.heads, cfg.head_dim), 3
        else:
            cache, head_dim_index = (cfg.layers, cfg.max_batch_size, cfg.heads, cfg.cache_len + 1, cfg.head_dim), 2
        cache_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        for name in ("k_cache", "v_cache"):
            full = torch.randn(cache, generator=cache_gen, device=device, dtype=cfg.dtype)
            shard = full.chunk(tp_size, head_dim_index)[tp_rank].contiguous()
            del full
            self.register_buffer(name, shard, persistent=False)
        # Each frequency twice (both halves of a head rotate by it); the sine's sign is - on the first half.
        inv_freq = 1.0 / (10000 ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq.repeat(2), persistent=False)
        signs = torch.ones(cfg.head_dim, device=device)
        signs[: cfg.head_dim // 2] = -1
        self.register_buffer("sin_signs", signs, persistent=False)
        self.register_buffer("slots", torch.arange(cfg.max_batch_size, device=device), persistent=False)
        self.register_buffer("layer_ids", torch.arange(cfg.layers, device=device), persistent=False)
        self.register_buffer("cache_positions", torch.arange(cfg.cache_len, device=device), persistent=False)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            torch.distributed.all_reduce(x, group=self.tp_group)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
                page_table: Optional[torch.Tensor] = None, kv_slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [rows, vocab] for one new token per row.

        Args:
            input_ids: [rows] token ids.
            positions: [rows] each token's position; its key and value go to the cache there.
            seq_lens: [rows] int32 keys each row attends to (its position + 1 for a decode step).
            page_table: [rows, pages_per_seq] int32 pages of each row (paged caches only).
            kv_slots: [rows] int64 flat cache slots (page * page_size + offset) of the new tokens, where the
                caller computed them already (paged caches only); None computes them from positions.
        """
        cfg, batch = self.cfg, input_ids.shape[0]
        if cfg.paged != (page_table is not None):
            raise ValueError("a paged decoder (page_size > 0) takes page_table, a contiguous one does not")
        # Rotary tables of the step, for q and k together [rows, 1, 1, head_dim]: x * cos + roll(x, half) * sin.
        # Built without torch.cat: its kernel's parameters carry uninitialised bytes, which the capture audit may
        # read as addresses of memory nothing keeps alive.
        angles = (positions[:, None].float() * self.inv_freq)[:, None, None, :]
        cos, sin = angles.cos().to(cfg.dtype), (angles.sin() * self.sin_signs).to(cfg.dtype)
        meta = AttentionMeta(seq_lens, page_table)
        if cfg.attention == "sdpa":
            meta.valid = self.cache_positions[None, :] < seq_lens[:, None]
        # Where each row's new key and value go, as an index into the whole cache after the layer's index:
        # one index_put_ on the cache buffer itself, which torch.compile does in place (an indexed write into
        # a layer's view of the cache made it copy the whole layer cache each step).
        if cfg.paged:  # the cache slot of each row's new token: its page, then its place in the page
            slots = kv_slots if kv_slots is not None else kv_slot(page_table, positions, cfg.page_size)
            where = [slots // cfg.page_size, slots % cfg.page_size]
        else:
            where = [self.slots[:batch], None, positions]
        x = self.embed[input_ids]
        for i, layer in enumerate(self.layers):
            qkv = (rms_norm(x, layer.norm1) @ layer.qkv.t()).view(batch, 3, self.heads, cfg.head_dim)
            q, k = rotary(qkv[:, :2], cos, sin).unbind(1)
            v = qkv[:, 2]
            # (aten's index_put_, as Tensor.index_put_ takes no None, the full slice over heads, in its index)
            torch.ops.aten.index_put_(self.k_cache, [self.layer_ids[i], *where], k)
            torch.ops.aten.index_put_(self.v_cache, [self.layer_ids[i], *where], v)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            if not cfg.paged:  # the step's rows, without the scratch column
                k_cache, v_cache = k_cache[:batch, :, :cfg.cache_len], v_cache[:batch, :, :cfg.cache_len]
            attn = self.attend(q, k_cache, v_cache, meta)
            x = x + self._all_reduce(attn.reshape(batch, -1) @ layer.o.t())
            gate, up = (rms_norm(x, layer.norm2) @ layer.gate_up.t()).chunk(2, -1)
            x = x + self._all_reduce((F.silu(gate) * up) @ layer.down.t())
        return rms_norm(x, self.final_norm) @ self.lm_head.t()


def kv_slot(page_table: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """The flat paged-cache slot of each row's token at `positions`: its page, then its place in the page."""
    page = page_table.gather(1, (positions // page_size)[:, None])[:, 0].long()
    return page * page_size + positions % page_size


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim (one fused kernel on CUDA, computed in float32)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., head_dim], its halves rotated: x * cos + [x2, x1] * sin, where the tables
    hold (cos, cos) and (-sin, sin) of each position's angles."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)
