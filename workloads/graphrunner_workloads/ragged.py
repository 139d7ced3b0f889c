"""Ragged steps of the built-in decoder over its paged KV cache: any mix of decode tokens and prefill chunks in
one step, keyed by token count (issue #33).

A step packs R requests' new tokens, t in all, into token rows: request r has `query_lens[r]` new tokens (1 for
a decode, a chunk of its prompt for a prefill), at positions `seq_lens[r] - query_lens[r]` .. `seq_lens[r] - 1`.
Each new token's key and value go into the cache at its `slots` entry; then each token attends to its request's
cached keys and, causally, to the request's new ones. The step returns each request's last-token logits
[R, vocab], or with `sample=True` its greedy token [R]. Everything per token (embedding, projections, MLP) runs
at the step's token rows; the LM head only at each request's last token.

Graph-safe: the only host integers a step uses are its token and request counts (fixed per captured size, T and
R(T)) and the cache's shape; every length is read on the device. The request of each token is a searchsorted of
the token's index into the cumulative query lengths, so no step reads a length back to the host.

Padding, as a ragged GraphRunner stages it (each input's pad value):
- padding tokens (rows t..T-1) have id 0, position 0 and slot 0: page 0 is the scratch page no request owns, so
  their keys land there; they count as the last request's tokens and read its key 0, which always exists
  (seq_lens pads to 1), so they never make a fully masked row;
- padding requests have query length 0, context 1 and page-table rows of 0: no token is theirs, and their output
  rows (garbage) are sliced away by the runner.

Attention (`RaggedDecoder(attention=...)`):
- "sdpa": torch's scaled_dot_product_attention over a masked padded layout; any device and dtype (the CPU tests
  and the float32 checks run it). Each request's pages are gathered into [R * cache_len] keys, and every token
  attends to all of them through a mask: its own request's keys, at positions up to its own and below the
  request's length. It computes T x R x cache_len scores, R times what the tokens need, and copies every
  request's whole padded context each layer: on the H200 its steps cost milliseconds at any T.
- "decode": graphrunner_workloads' decode kernel (attention.py), one query row per token over its request's pages
  up to its own position (a key count of position + 1): causal attention that reads only the keys each token
  has, from the pages in place. CUDA, any page size and float dtype; the workloads' extension must be built.
- "flash": torch's built-in FlashAttention-2 varlen kernel (aten::_flash_attention_forward): each layer's keys and
  values gathered from the pages, request after request (`key_slots`, computed once per step on the device), into
  [R * cache_len] rows, and the kernel's causal mask aligned to the end of each request's keys; it computes only
  the scores each token has. Its host integers are fixed per size (T queries, cache_len keys a request): graph-safe.
  CUDA and 16-bit dtypes; any page size; no flash-attn package and no block-table kernel needed. The gather reads
  R * cache_len rows a layer whatever the step's lengths, so a step of one token per request (`decode`, the
  uniform runner's step) runs the "decode" kernel instead, which reads each request's keys in place: "flash" needs
  the workloads' decode extension built too.
- "flash-attn-4": flash-attn 4's varlen paged kernel (flash_attn.cute): each request's queries (cu_seqlens) over
  its keys read in place from its pages (seq_lens, page_table), the causal mask aligned to each request's last
  key. Nothing is gathered, so its decode steps run it too. Its one host integer, the bound on a request's
  queries, is T: graph-safe. CUDA and 16-bit dtypes; needs the flash-attn-4 package.

The uniform decode runner an engine keeps beside the ragged one runs `RaggedDecoder.decode`: the same step with
one token per request (its attention `decode_attention`: the step's own, or "decode" where that is "flash"), so its
inputs are the ragged ones without query_lens.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import graphrunner as gr
from graphrunner_workloads.attention import AttentionMeta, attention_backend, decode_attention
from graphrunner_workloads.decoder import Decoder, DecoderConfig, kv_slot, rms_norm, rotary

ATTENTION = ("sdpa", "decode", "flash", "flash-attn-4")
VARLEN = ("flash", "flash-attn-4")  # the backends whose kernels take cu_seqlens: padding tokens are in no request
SPLIT = "query_lens"  # the ragged runner's split input
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH = torch.ops.aten._flash_attention_forward.default


def page_size_for(attention: str) -> int:
    """The benchmarks' page size for a ragged step's attention: 128 for flash-attn 4, whose kernel loads a page of
    one key tile (128 keys at head dim 128) whole, 256 for the others.

    Args:
        attention: one of ATTENTION.
    """
    return 128 if attention == "flash-attn-4" else 256


def key_slots(seq_lens: torch.Tensor, page_table: torch.Tensor, page_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each request's keys sit in a layer's flat cache ([pages * page_size] rows), packed request after
    request: (slots [R * cache_len] int64, the first cu_seqlens_k[-1] of them keys; cu_seqlens_k [R + 1] int32).
    Fixed shapes, computed on the device: graph-safe. Rows past the last key repeat a valid slot, never read.

    Args:
        seq_lens: [R] int32 each request's keys.
        page_table: [R, pages_per_seq] int32 each request's pages.
        page_size: keys a page.
    """
    requests, cache_len = page_table.shape[0], page_table.shape[1] * page_size
    cu_k = torch.zeros(requests + 1, dtype=torch.int32, device=seq_lens.device)
    torch.cumsum(seq_lens, 0, dtype=torch.int32, out=cu_k[1:])
    index = torch.arange(requests * cache_len, device=seq_lens.device, dtype=torch.int32)
    request = torch.searchsorted(cu_k[1:], index, right=True).clamp_(max=requests - 1).long()
    offset = (index - cu_k[request]).clamp_(0, cache_len - 1).long()
    return page_table[request, offset // page_size].long() * page_size + offset % page_size, cu_k


def flash_runs(decoder: Decoder) -> bool:
    """Whether the FlashAttention varlen kernels (the "flash" and "flash-attn-4" backends) run for `decoder`: on
    CUDA, in float16 or bfloat16.

    Args:
        decoder: the Decoder.
    """
    return decoder.embed.device.type == "cuda" and decoder.cfg.dtype in FLASH_DTYPES


def varlen_flash(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, longest: int) -> torch.Tensor:
    """Attention of q [T, heads, dim] over packed keys and values [R * cache_len, heads, dim] through torch's
    FlashAttention-2 varlen kernel, causal and aligned to each request's last key; its grid is sized for
    `longest` query tokens a request. Padding token rows (past cu_seqlens_q[-1]) hold whatever the kernel left.

    Args:
        q: the step's queries.
        keys: each request's keys, packed (key_slots).
        values: its values, packed alike.
        cu_seqlens_q: [R + 1] int32 where each request's tokens start, then the step's token count.
        cu_seqlens_k: [R + 1] int32 where each request's keys start.
        longest: the most new tokens of one request (a host int).
    """
    cache_len = keys.shape[0] // (cu_seqlens_k.shape[0] - 1)
    return _FLASH(q, keys, values, cu_seqlens_q, cu_seqlens_k, longest, cache_len, 0.0, True, False)[0]


class RaggedMeta:
    """What every layer's attention reads, computed once per step from the step's metadata.

    Attributes:
        request: [T] int64, each token's request (padding tokens: the last request).
        positions: [T] int64, each token's position.
        seq_lens: [R] int32, each request's context, this step's tokens included.
        page_table: [R, pages_per_seq] int32, each request's pages.
        cu_seqlens: [R + 1] int32, where each request's tokens start, then the step's token count.
        mask: [T, R * cache_len] bool, the keys each token sees in the padded layout ("sdpa" only).
        per_token: each token as a decode row: its key count (position + 1) and its request's page-table row
            ("decode" only).
        real: [T] bool, the tokens that belong to a request, False for padding tokens ("flash" and "flash-attn-4").
        key_slots: [R * cache_len] int64, where each request's keys sit in a layer's flat cache, packed request
            after request; cu_seqlens_k: [R + 1] int32, where each request's keys start ("flash" only; key_slots).

    Args:
        positions: [T] each token's position.
        query_lens: [R] int32 new tokens per request (on the device).
        seq_lens: [R] int32 each request's context, this step's tokens included.
        page_table: [R, pages_per_seq] int32 each request's pages.
        key_positions: [cache_len] 0..cache_len-1 on the device (the masked layout's key positions).
        attention: the backend the meta is for (one of ATTENTION).
    """

    def __init__(self, positions: torch.Tensor, query_lens: torch.Tensor, seq_lens: torch.Tensor,
                 page_table: torch.Tensor, key_positions: torch.Tensor, attention: str) -> None:
        tokens, requests = positions.shape[0], query_lens.shape[0]
        # Into a zeroed buffer rather than torch.cat: cat's kernel parameters carry uninitialised bytes, which the
        # capture audit may read as addresses.
        self.cu_seqlens = torch.zeros(requests + 1, dtype=torch.int32, device=positions.device)
        torch.cumsum(query_lens, 0, dtype=torch.int32, out=self.cu_seqlens[1:])
        token_index = torch.arange(tokens, device=positions.device, dtype=torch.int32)
        # A token's request is how many requests end at or before it; padding tokens, past every end, are the
        # last request's.
        self.request = torch.searchsorted(self.cu_seqlens[1:], token_index, right=True).clamp_(max=requests - 1)
        self.positions, self.seq_lens, self.page_table = positions, seq_lens, page_table
        self.mask: Optional[torch.Tensor] = None
        self.per_token: Optional[AttentionMeta] = None
        self.real: Optional[torch.Tensor] = None
        self.key_slots: Optional[torch.Tensor] = None
        self.cu_seqlens_k: Optional[torch.Tensor] = None
        if attention in VARLEN:
            self.real = token_index < self.cu_seqlens[-1]
        if attention == "flash":
            page_size = key_positions.shape[0] // page_table.shape[1]
            self.key_slots, self.cu_seqlens_k = key_slots(seq_lens, page_table, page_size)
        elif attention == "decode":
            self.per_token = AttentionMeta((positions + 1).int(), page_table[self.request])
        elif attention == "sdpa":
            same = self.request[:, None] == torch.arange(requests, device=positions.device)[None, :]
            causal = key_positions[None, :] <= positions[:, None]                 # [T, cache_len]
            within = key_positions[None, :] < seq_lens[:, None]                   # [R, cache_len]
            self.mask = (same[:, :, None] & causal[:, None, :] & within[None, :, :]).view(tokens, -1)


def packed_keys(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: RaggedMeta) -> Tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys and values [R * cache_len, heads, dim], each request's packed after the one before
    (meta.key_slots: a "flash" step's meta)."""
    return (k_cache.flatten(0, 1).index_select(0, meta.key_slots),
            v_cache.flatten(0, 1).index_select(0, meta.key_slots))


def sdpa_ragged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: RaggedMeta) -> torch.Tensor:
    """Attention of q [T, heads, dim] over one layer's paged cache [pages, page_size, heads, dim], masked padded
    layout: the step's requests' pages gathered into [R * cache_len] keys, each token masked to its own."""
    keys = k_cache[meta.page_table].flatten(0, 2).transpose(0, 1)  # [heads, R * cache_len, dim]
    values = v_cache[meta.page_table].flatten(0, 2).transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=meta.mask)
    return out.transpose(0, 1)


def decode_ragged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: RaggedMeta) -> torch.Tensor:
    """Attention of q [T, heads, dim] over one layer's paged cache through the decode kernel, each token a row over
    its request's pages and its keys up to its own position."""
    return decode_attention(q, k_cache, v_cache, meta.per_token)


def flash_ragged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: RaggedMeta) -> torch.Tensor:
    """Attention of q [T, heads, dim] over one layer's paged cache through torch's built-in FlashAttention-2
    varlen kernel, each request's keys gathered request after request (meta.key_slots), the causal mask aligned to
    each request's last key, where its last new token sits."""
    keys, values = packed_keys(k_cache, v_cache, meta)
    return _zero_padding(varlen_flash(q, keys, values, meta.cu_seqlens, meta.cu_seqlens_k, q.shape[0]), meta)


def flash_attn_4_ragged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: RaggedMeta) -> torch.Tensor:
    """Attention of q [T, heads, dim] over one layer's paged cache [pages, page_size, heads, dim] through flash-attn
    4's varlen paged kernel: each request's tokens over its keys, read in place from its pages, the causal mask
    aligned to each request's last key, where its last new token sits.

    Args:
        q: [T, heads, dim] the step's queries, request after request (padding tokens last).
        k_cache: one layer's keys [pages, page_size, heads, dim].
        v_cache: its values, alike.
        meta: the step's RaggedMeta for "flash-attn-4" (cu_seqlens, seq_lens, page_table, real).
    """
    from flash_attn.cute import flash_attn_varlen_func

    # Called directly, not through attention.py's custom op: graph capture records the same kernels either way,
    # and nothing here runs under torch.compile (which would trace into flash_attn.cute's Python).
    out, _ = flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens, seqused_k=meta.seq_lens,
                                    page_table=meta.page_table, max_seqlen_q=q.shape[0], causal=True)
    return _zero_padding(out, meta)


def _zero_padding(out: torch.Tensor, meta: RaggedMeta) -> torch.Tensor:
    """A varlen kernel's output with the padding tokens' rows zeroed. Padding tokens are in no request: the kernel
    leaves their rows unwritten (whatever the pool held, NaN under validate's scrub). Zeroed, so their keys in later
    layers, written to the scratch page, stay finite: the "sdpa" backends read masked keys there, and a NaN key
    poisons even a masked score."""
    return torch.where(meta.real[:, None, None], out, 0)


BACKENDS: Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RaggedMeta], torch.Tensor]] = {
    "sdpa": sdpa_ragged, "decode": decode_ragged, "flash": flash_ragged, "flash-attn-4": flash_attn_4_ragged}


class RaggedDecoder(torch.nn.Module):
    """The built-in decoder's ragged step: fn(input_ids, positions, slots, query_lens, seq_lens, page_table) ->
    each request's last-token logits [R, vocab] (or greedy tokens [R] with `sample=True`).

    It runs the given Decoder's weights and KV cache (a submodule, so runners declare and guard them), so a
    uniform decode runner and a ragged runner built on one Decoder share one cache.

    Args:
        decoder: a paged Decoder (page_size > 0) on one GPU or the CPU, tensor parallelism off.
        attention: "sdpa" (any device and dtype), "decode" (CUDA, the workloads' decode kernel), "flash" (CUDA,
            16-bit; its decode steps run "decode") or "flash-attn-4" (CUDA, 16-bit, the flash-attn-4 package); see
            the module's docstring.
        sample: return each request's greedy token instead of its logits.
    """

    def __init__(self, decoder: Decoder, attention: str = "sdpa", sample: bool = False) -> None:
        super().__init__()
        cfg = decoder.cfg
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if not cfg.paged:
            raise ValueError("a ragged step reads a paged KV cache: build the Decoder with page_size > 0")
        if decoder.tp_size != 1:
            raise ValueError(f"the ragged step runs on one GPU; this Decoder is split over {decoder.tp_size}")
        if attention == "decode":
            if decoder.embed.device.type != "cuda":
                raise ValueError(f"attention 'decode' runs on CUDA devices only, this Decoder is on "
                                 f"{decoder.embed.device}: use attention='sdpa'")
            attention_backend("decode")  # loads the kernels now: a build without them fails here
        if attention in VARLEN and not flash_runs(decoder):
            raise ValueError(f"attention {attention!r} runs a FlashAttention varlen kernel: it needs a CUDA Decoder "
                             f"in float16 or bfloat16; this one is on {decoder.embed.device} in {cfg.dtype}: use "
                             f"attention='sdpa'")
        if attention == "flash":
            attention_backend("decode")  # its decode steps run the decode kernel
        if attention == "flash-attn-4":
            attention_backend("flash-attn-4")  # ImportError naming the package where flash_attn.cute is missing
        self.decoder, self.attention, self.sample = decoder, attention, sample
        self.attend = BACKENDS[attention]
        # A step of one token per request (decode()): "flash" gathers every request's whole cache a layer, the
        # decode kernel reads each request's keys in place.
        self.decode_attention = "decode" if attention == "flash" else attention

    @property
    def cfg(self) -> DecoderConfig:
        return self.decoder.cfg

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, query_lens: torch.Tensor,
                seq_lens: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """One ragged step: logits [R, vocab] of each request's last new token, or its greedy token [R].

        Args:
            input_ids: [T] int64 token ids, request after request (padding tokens last).
            positions: [T] int64 each token's position in its request.
            slots: [T] int64 flat cache slot (page * page_size + offset) each token's key and value go to.
            query_lens: [R] int32 new tokens per request, on the device (0 for padding requests).
            seq_lens: [R] int32 each request's context length, this step's tokens included.
            page_table: [R, pages_per_seq] int32 each request's pages.
        """
        return self._step(self.attention, self.attend, input_ids, positions, slots, query_lens, seq_lens, page_table)

    def _step(self, attention: str, attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RaggedMeta],
                                                     torch.Tensor],
              input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, query_lens: torch.Tensor,
              seq_lens: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """forward's step with the attention `attend`, its metadata built for `attention`."""
        dec, cfg = self.decoder, self.decoder.cfg
        tokens = input_ids.shape[0]
        meta = RaggedMeta(positions, query_lens, seq_lens, page_table, dec.cache_positions, attention)
        # Rotary tables [T, 1, 1, head_dim], for q and k together (see Decoder.forward).
        angles = (positions[:, None].float() * dec.inv_freq)[:, None, None, :]
        cos, sin = angles.cos().to(cfg.dtype), (angles.sin() * dec.sin_signs).to(cfg.dtype)
        where = [slots // cfg.page_size, slots % cfg.page_size]
        hidden = dec.embed[input_ids]
        for i, layer in enumerate(dec.layers):
            qkv = (rms_norm(hidden, layer.norm1) @ layer.qkv.t()).view(tokens, 3, dec.heads, cfg.head_dim)
            q, k = rotary(qkv[:, :2], cos, sin).unbind(1)
            v = qkv[:, 2]
            # Written before attention reads the cache, so each token sees its own and earlier new keys. One
            # index_put_ on the whole cache, as the Decoder writes it.
            for cache, new in ((dec.k_cache, k), (dec.v_cache, v)):
                torch.ops.aten.index_put_(cache, [dec.layer_ids[i], *where], new)
            attn = attend(q, dec.k_cache[i], dec.v_cache[i], meta).reshape(tokens, -1)
            hidden = hidden + attn @ layer.o.t()
            gate, up = (rms_norm(hidden, layer.norm2) @ layer.gate_up.t()).chunk(2, -1)
            hidden = hidden + (F.silu(gate) * up) @ layer.down.t()
        # Each request's last new token; a padding request (no tokens) takes a neighbour's row, sliced away later.
        last = (meta.cu_seqlens[1:].long() - 1).clamp_(min=0)
        logits = rms_norm(hidden[last], dec.final_norm) @ dec.lm_head.t()
        return logits.argmax(-1) if self.sample else logits

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
               page_table: torch.Tensor) -> torch.Tensor:
        """A decode step, one new token per request: what a uniform runner (sizes count requests) captures. Its
        attention is `decode_attention` (the "decode" kernel where the step's is "flash").

        Args:
            input_ids: [R] int64 each request's new token.
            positions: [R] int64 its position (seq_lens - 1).
            slots: [R] int64 its flat cache slot.
            seq_lens: [R] int32 each request's context, the new token included.
            page_table: [R, pages_per_seq] int32 each request's pages.
        """
        attend = self.attend if self.decode_attention == self.attention else BACKENDS[self.decode_attention]
        return self._step(self.decode_attention, attend, input_ids, positions, slots, torch.ones_like(seq_lens),
                          seq_lens, page_table)


def ragged_inputs(cfg: DecoderConfig) -> Dict[str, gr.StaticInput]:
    """The ragged step's inputs, for GraphRunner(..., split="query_lens"). Pads put padding tokens on the scratch
    page (slot 0 of page 0) at position 0, and give padding requests no tokens, a context of 1 and page 0. Pass
    `make_inputs=functools.partial(random_ragged_step, cfg)` to validate(): a valid step needs distinct pages per
    request and positions that agree with the lengths, which independent draws per input cannot give.

    Args:
        cfg: the decoder's config (paged).
    """
    return {"input_ids": gr.StaticInput((), torch.long, pad=0, high=cfg.vocab, per_token=True),
            "positions": gr.StaticInput((), torch.long, pad=0, high=cfg.cache_len, per_token=True),
            "slots": gr.StaticInput((), torch.long, pad=0, high=cfg.num_pages * cfg.page_size, per_token=True),
            SPLIT: gr.StaticInput((), torch.int32, pad=0, low=1, high=cfg.cache_len + 1),
            "seq_lens": gr.StaticInput((), torch.int32, pad=1, low=1, high=cfg.cache_len + 1),
            "page_table": gr.StaticInput((cfg.pages_per_seq,), torch.int32, pad=0, low=1, high=cfg.num_pages)}


def decode_step_inputs(cfg: DecoderConfig) -> Dict[str, gr.StaticInput]:
    """The uniform decode runner's inputs (RaggedDecoder.decode): the ragged ones without query_lens.

    Args:
        cfg: the decoder's config (paged).
    """
    return {name: spec for name, spec in ragged_inputs(cfg).items() if name != SPLIT}


def random_ragged_step(cfg: DecoderConfig, tokens: int, requests: int, gen: Optional[torch.Generator] = None,
                       device: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """One valid ragged step of `tokens` tokens over `requests` requests (each with at least one): random split,
    random cached context per request, distinct pages per request; query_lens on the CPU, the rest on `device`.
    make_inputs for a ragged runner's validate(): functools.partial(random_ragged_step, cfg).

    Args:
        cfg: the decoder's config (paged); requests <= cfg.max_batch_size, tokens <= requests * cfg.cache_len.
        tokens: the step's tokens.
        requests: the step's requests.
        gen: the generator; its device is where the tensors go (CPU when None).
        device: where the tensors go; default gen's device.
    """
    if not 1 <= requests <= min(tokens, cfg.max_batch_size) or tokens > requests * cfg.cache_len:
        raise ValueError(f"a step of {tokens} tokens over {requests} requests does not fit: each request needs 1 to "
                         f"{cfg.cache_len} tokens and at most {cfg.max_batch_size} requests fit the cache")
    where = torch.device(device) if device is not None else (gen.device if gen is not None else torch.device("cpu"))
    draw = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=where)))
    # The split: requests - 1 distinct cuts in 1..tokens-1 (any mix of long and short requests). Where that gives a
    # request more tokens than the cache holds, the extra tokens go to distinct free places, cache_len - 1 per
    # request, instead.
    cuts = torch.randperm(tokens - 1, generator=draw)[: requests - 1] + 1
    query_lens = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([tokens])]).diff()
    if int(query_lens.max()) > cfg.cache_len:
        extra = torch.randperm(requests * (cfg.cache_len - 1), generator=draw)[: tokens - requests]
        query_lens = 1 + torch.bincount(extra // (cfg.cache_len - 1), minlength=requests)
    first = torch.cumsum(query_lens, 0) - query_lens
    cached = (torch.rand(requests, generator=draw) * (cfg.cache_len - query_lens + 1)).long()
    seq_lens = cached + query_lens
    request = torch.repeat_interleave(torch.arange(requests), query_lens)
    positions = torch.arange(tokens) - first[request] + cached[request]
    pages = torch.randperm(cfg.num_pages - 1, generator=draw)[: requests * cfg.pages_per_seq] + 1
    page_table = pages.view(requests, cfg.pages_per_seq).int()
    step = {"input_ids": torch.randint(0, cfg.vocab, (tokens,), generator=draw), "positions": positions,
            "slots": kv_slot(page_table[request], positions, cfg.page_size), "seq_lens": seq_lens.int(),
            "page_table": page_table}
    step = {name: t.to(where) for name, t in step.items()}
    step[SPLIT] = query_lens.int()
    return step


def random_decode_step(cfg: DecoderConfig, batch: int, gen: Optional[torch.Generator] = None,
                       device: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """One valid decode step for RaggedDecoder.decode (one token per request): make_inputs for the uniform decode
    runner's validate(), functools.partial(random_decode_step, cfg).

    Args:
        cfg: the decoder's config (paged).
        batch: requests.
        gen: the generator; its device is where the tensors go (CPU when None).
        device: where the tensors go; default gen's device.
    """
    step = random_ragged_step(cfg, batch, batch, gen, device)
    del step[SPLIT]
    return step


def pad_step(inputs: Mapping[str, gr.StaticInput], step: Mapping[str, torch.Tensor], tokens: int,
             requests: int) -> Dict[str, torch.Tensor]:
    """`step` padded to `tokens` token rows and `requests` request rows with each input's pad value, as a ragged
    runner stages a step into a larger size: what a padded graph computes, eagerly.

    Args:
        inputs: the step's input specs (ragged_inputs).
        step: the step's inputs.
        tokens: token rows to pad per-token inputs to.
        requests: request rows to pad the others to.
    """
    out = {}
    for name, t in step.items():
        rows = tokens if inputs[name].per_token else requests
        pad = torch.full((rows - t.shape[0], *t.shape[1:]), inputs[name].pad, dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, pad])
    return out


class CommonRaggedRunner:
    """The common runner for ragged steps (the hand-written pattern the benchmarks compare against): one
    torch.cuda.CUDAGraph per token count T (largest first, one pool), static buffers of the largest size, and each step copy_'s every
    input into them, fills the padding rows with the pad values (stale slots would make padding tokens write
    into real requests' pages) and replays the smallest graph holding its tokens and requests.

    Args:
        fn: the ragged step, fn(**inputs) -> [R] rows.
        inputs: the input specs (ragged_inputs); `split` names the per-request token counts.
        capture_sizes: the token counts to capture.
        max_requests: requests per size: size T holds min(T, max_requests).
        split: the input holding each request's token count.
        pool: the pool to capture into; None makes one.
    """

    def __init__(self, fn: Callable[..., Any], inputs: Mapping[str, gr.StaticInput], capture_sizes: Sequence[int],
                 max_requests: int, split: str = SPLIT, pool: Optional[Any] = None, device: str = "cuda") -> None:
        self.fn, self.inputs, self.split = fn, dict(inputs), split
        self.sizes = sorted(capture_sizes)
        self.requests = {size: min(size, max_requests) for size in self.sizes}
        most = {True: self.sizes[-1], False: self.requests[self.sizes[-1]]}
        self.static = {name: torch.full((most[spec.per_token], *spec.shape), spec.pad, dtype=spec.dtype, device=device)
                       for name, spec in self.inputs.items()}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: Dict[int, Any] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        stream = torch.cuda.Stream()
        with torch.no_grad():
            for size in reversed(self.sizes):
                views = self._views(size)
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        fn(**views)
                torch.cuda.synchronize()
                self.graphs[size], self.outputs[size] = self._capture(views, stream)

    def _capture(self, views: Dict[str, torch.Tensor], stream: torch.cuda.Stream) -> Tuple[Any, torch.Tensor]:
        """One size's graph (anything with replay() and reset(): a subclass may capture the step as several
        graphs) and its output, the step captured on `stream` into the pool."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            out = self.fn(**views)
        return graph, out

    def _views(self, size: int) -> Dict[str, torch.Tensor]:
        return {name: buf[: size if self.inputs[name].per_token else self.requests[size]]
                for name, buf in self.static.items()}

    def size_for(self, tokens: int, requests: int) -> int:
        """The captured size a step of `tokens` tokens over `requests` requests runs at (ValueError if none)."""
        for size in self.sizes:
            if size >= tokens and self.requests[size] >= requests:
                return size
        raise ValueError(f"no captured size holds {tokens} tokens over {requests} requests")

    @torch.no_grad()
    def __call__(self, **step: torch.Tensor) -> torch.Tensor:
        requests = step[self.split].shape[0]
        tokens = next(t.shape[0] for name, t in step.items() if self.inputs[name].per_token)
        size = self.size_for(tokens, requests)
        for name, view in self._views(size).items():
            t = step[name]
            view[: t.shape[0]].copy_(t)
            view[t.shape[0]:].fill_(self.inputs[name].pad)
        self.graphs[size].replay()
        return self.outputs[size][:requests]

    def close(self) -> None:
        """Destroys the graphs; the pool's memory goes back once nothing else uses it."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs, self.outputs, self.static = {}, {}, {}


def decode_runner(model: RaggedDecoder, max_requests: int, capture_sizes: Optional[Sequence[int]] = None,
                  **options: Any) -> gr.GraphRunner:
    """An engine's uniform decode runner: RaggedDecoder.decode, sizes counting requests, named "decode".

    Args:
        model: the ragged step; the runner runs its Decoder's weights and cache.
        max_requests: the largest batch.
        capture_sizes: the batch sizes; default gr.default_capture_sizes(max_requests).
        options: further GraphRunner arguments (pool=, fallback=, ...).
    """
    return gr.GraphRunner(model.decode, decode_step_inputs(model.cfg), max_batch_size=max_requests,
                          capture_sizes=capture_sizes, name="decode", **options)


def ragged_runner(model: RaggedDecoder, capture_sizes: Sequence[int], max_requests: int,
                  **options: Any) -> gr.GraphRunner:
    """An engine's ragged runner for mixed steps: sizes counting tokens, size T holding min(T, max_requests)
    requests, split on query_lens, named "mixed". Capture it with the decode runner, one pool:
    gr.capture_all(decode, mixed).

    Args:
        model: the ragged step; the runner runs its Decoder's weights and cache.
        capture_sizes: the token counts.
        max_requests: the most requests a size holds.
        options: further GraphRunner arguments (pool=, fallback=, ...).
    """
    return gr.GraphRunner(model, ragged_inputs(model.cfg), capture_sizes=list(capture_sizes), split=SPLIT,
                          max_requests=max_requests, name="mixed", **options)


def default_ragged_sizes(budget: int) -> List[int]:
    """Token counts for a ragged runner whose steps pack at most `budget` tokens: 16, 64, 256, ... below the
    budget, and the budget.

    Args:
        budget: the most tokens a step packs.
    """
    sizes, size = [], 16
    while size < budget:
        sizes.append(size)
        size *= 4
    return sizes + [budget]
