"""Piecewise attention for the ragged decoder (issue #34): attention as a graphrunner break op that takes the
step's lengths on the host, which no captured graph can hold, and the common hand-written pattern it replaces.

`PiecewiseRaggedDecoder(decoder, attention=...)` is a RaggedDecoder (ragged.py) whose every layer calls its
attention through a break op (`gr.breaking_op`): captured by a GraphRunner, each size becomes one graph per layer
boundary (segment 0: the step's metadata, the embedding and layer 0 up to its attention; segment i: the rest of
layer i-1 and layer i up to its attention; the last: the rest of the last layer and the LM head), and a step runs
segment 0, attention, segment 1, ... in one native call. Between the segments the op runs eagerly, with the step's
split (`query_lens`) on the host from the gr.StepInfo it gets (`step.inputs`); a uniform decode runner's steps
have one token per request (`step.tokens // step.requests`). Attention:
- "varlen": torch's built-in FlashAttention-2 varlen kernel (aten::_flash_attention_forward) with the longest
  request's token count from the host split as max_seqlen_q: the host integer an engine's varlen call takes, and
  what a captured kernel would freeze. Each request's keys are packed request after request (gathered from its
  pages in the segment before the break, by slots computed once per step on the device), cu_seqlens of queries
  and keys are built on the device, max_seqlen_k is the cache's length: no sync. CUDA, float16 or bfloat16.
- "packed": the same attention inside the graph, max_seqlen_q the step's token count T (its grid sized for the
  padded step), no break: the full-graph twin of "varlen", graph-safe (ragged.py's "flash").
- "loop": per request, SDPA of its tokens (rows sliced by the host split) over its own pages, each token masked to
  the keys up to its position: a loop over host lengths, any device and dtype (the float32 tests run it).
- "noop": a graph-safe attention (`inner`: "packed", or one of ragged.py's) followed by a break op
  that does nothing (it returns its input as its out= buffer): graphrunner's own cost of a break, nothing else.

The op writes its result into the boundary buffer `out=` the model allocates before the call (so it lives in the
graph pool, where the next segment reads it); padding token rows, in no request, are zeroed in the next segment
as ragged.py's "flash" zeroes them. Outside a replay (step None: eagerly, and the once at capture, where
graphrunner replays the segment before the break first, so the op reads real data) "varlen" takes T as its bound,
like "packed", and "loop" reads the lengths from the device (a sync).

`CommonPiecewiseRunner` is the common runner's piecewise form, the breakable pattern engines' users write by hand,
which the benchmark compares against: per token count, a torch.cuda.CUDAGraph per segment captured between
attention calls into one shared pool, and a step that copy_'s its inputs into static buffers, replays segment 0,
runs attention eagerly and copy_'s its result into the next segment's static input, replays segment 1, and so on,
in a Python loop.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import graphrunner as gr
from graphrunner_workloads.decoder import Decoder
from graphrunner_workloads.ragged import (ATTENTION, SPLIT, CommonRaggedRunner, RaggedDecoder, RaggedMeta,
                                          flash_ragged, flash_runs, packed_keys, ragged_inputs, varlen_flash)

PIECEWISE_ATTENTION = ("varlen", "packed", "loop", "noop")


class _HostLengths:
    """Each real request's new tokens on the host, and the longest, read once per step: every layer's break op
    gets the step's one StepInfo, so the split is turned into Python ints once, as an engine's metadata builder
    does. Weakly held, so the step's inputs are not kept past the step; assigned as one tuple, so a runner on
    another thread never sees one step's StepInfo with another's lengths."""

    def __init__(self) -> None:
        self._last: Tuple[Optional[weakref.ref], List[int], int] = (None, [], 0)

    def of(self, step: gr.StepInfo) -> Tuple[List[int], int]:
        """(lengths, longest) of a replayed step (step.inputs set).

        Args:
            step: the StepInfo the break op got.
        """
        ref, lens, longest = self._last
        if ref is None or ref() is not step:
            split = step.inputs.get(SPLIT)
            # A uniform runner's step (the decode runner) has no split: each request has tokens // requests.
            lens = split.tolist() if split is not None else [step.tokens // step.requests] * step.requests
            longest = max(lens)
            self._last = (weakref.ref(step), lens, longest)
        return lens, longest


host_lengths = _HostLengths()


def varlen_into(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seqlens_q: torch.Tensor,
                cu_seqlens_k: torch.Tensor, longest: int, out: torch.Tensor) -> torch.Tensor:
    """varlen_flash written into `out` (torch's kernel takes no out=: a copy)."""
    return out.copy_(varlen_flash(q, keys, values, cu_seqlens_q, cu_seqlens_k, longest))


@gr.breaking_op(name="varlen_attention")
def varlen_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, out: torch.Tensor, step: Optional[gr.StepInfo]) -> torch.Tensor:
    """The "varlen" break op: varlen_into with the longest request from the host split (T eagerly)."""
    if step is None:
        return varlen_into(q, keys, values, cu_seqlens_q, cu_seqlens_k, q.shape[0], out)
    return varlen_into(q, keys, values, cu_seqlens_q, cu_seqlens_k, host_lengths.of(step)[1], out)


@gr.breaking_op(name="loop_attention")
def loop_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                   positions: torch.Tensor, page_table: torch.Tensor, key_positions: torch.Tensor, *,
                   out: torch.Tensor, step: Optional[gr.StepInfo]) -> torch.Tensor:
    """The "loop" break op: per request, SDPA of its tokens over its pages, masked to the keys up to each token's
    position; token rows past the step's last request are zeroed. The lengths come from the host split, or
    eagerly from cu_seqlens on the device (a sync).

    Args:
        q: the step's queries [T, heads, dim].
        k_cache: one layer's keys [pages, page_size, heads, dim].
        v_cache: its values.
        cu_seqlens: [R + 1] int32 where each request's tokens start (read only eagerly).
        positions: [T] int64 each token's position.
        page_table: [R, pages_per_seq] int32 each request's pages.
        key_positions: [cache_len] the positions 0..cache_len - 1 (the decoder's cache_positions).
        out: where the result goes, q's shape.
        step: the StepInfo while replaying, None outside a replay.
    """
    lens = cu_seqlens.diff().tolist() if step is None else host_lengths.of(step)[0]
    start = 0
    for request, n in enumerate(lens):
        if n:
            rows = slice(start, start + n)
            keys = k_cache[page_table[request]].flatten(0, 1).transpose(0, 1)  # [heads, cache_len, dim]
            values = v_cache[page_table[request]].flatten(0, 1).transpose(0, 1)
            mask = key_positions[None, :] <= positions[rows, None]
            out[rows] = F.scaled_dot_product_attention(q[rows].transpose(0, 1), keys, values,
                                                       attn_mask=mask).transpose(0, 1)
        start += n
    out[start:].zero_()
    return out


@gr.breaking_op(name="noop_break")
def noop_break(x: torch.Tensor, *, out: torch.Tensor, step: Optional[gr.StepInfo]) -> torch.Tensor:
    """A break that does nothing: called as noop_break(x, out=x), the next segment reads x as the one before
    left it. What a step pays for it is graphrunner's own cost of a break."""
    return out


class PiecewiseRaggedDecoder(RaggedDecoder):
    """The ragged decoder step (RaggedDecoder) with every layer's attention called through a break op, or its
    graph-safe twin "packed": see the module's docstring. Same call, inputs and outputs as RaggedDecoder; it runs
    the given Decoder's weights and cache, so it shares them with other RaggedDecoders built on that Decoder.

    Args:
        decoder: a paged Decoder on one GPU, or on the CPU for "loop" (and "noop" with inner "sdpa").
        attention: "varlen", "packed", "loop" or "noop" (PIECEWISE_ATTENTION).
        sample: return each request's greedy token instead of its logits.
        inner: the graph-safe attention inside the segments of "noop": "packed", or one of ragged.py's (ATTENTION).
    """

    def __init__(self, decoder: Decoder, attention: str = "varlen", sample: bool = False,
                 inner: str = "packed") -> None:
        if attention not in PIECEWISE_ATTENTION:
            raise ValueError(f"attention must be one of {PIECEWISE_ATTENTION}, got {attention!r}")
        if attention == "noop" and inner not in ("packed", *ATTENTION):
            raise ValueError(f"inner must be a graph-safe attention, 'packed' or one of {ATTENTION}, got {inner!r}")
        kernel = inner if attention == "noop" else attention
        # RaggedDecoder checks the decoder for its own backends; "sdpa" runs where "loop" does.
        super().__init__(decoder, attention=kernel if kernel in ATTENTION else "sdpa", sample=sample)
        if kernel in ("varlen", "packed") and not flash_runs(decoder):
            raise ValueError(f"attention {kernel!r} runs torch's FlashAttention-2 varlen kernel: it needs a CUDA "
                             f"Decoder in float16 or bfloat16; this one is on {decoder.embed.device} in "
                             f"{decoder.cfg.dtype}: use attention 'loop'")
        self.piecewise = attention
        # RaggedDecoder.forward builds the step's metadata for self.attention: ours read the varlen layout that
        # ragged.py's "flash" reads (cu_seqlens, the packed keys' slots, and real for the padding tokens).
        self.attention = kernel if kernel in ATTENTION else "flash"
        # Decode steps too go through this attention (and its break op).
        self.decode_attention = self.attention
        attends = {"varlen": self._attend_varlen, "packed": flash_ragged, "loop": self._attend_loop}
        if attention == "noop":
            self.inner = attends.get(kernel, self.attend)  # ragged.py's backend, set by RaggedDecoder
            self.attend = self._attend_noop
        else:
            self.attend = attends[attention]
        # The op the attention calls: CommonPiecewiseRunner swaps it while it captures by hand.
        self.op: Callable[..., Any] = loop_attention if attention == "loop" else varlen_attention

    def _attend_varlen(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: RaggedMeta) -> torch.Tensor:
        keys, values = packed_keys(k_cache, v_cache, meta)
        out = torch.empty_like(q)  # the boundary buffer, allocated in the segment before the break
        self.op(q, keys, values, meta.cu_seqlens, meta.cu_seqlens_k, out=out)
        return torch.where(meta.real[:, None, None], out, 0)

    def _attend_loop(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: RaggedMeta) -> torch.Tensor:
        out = torch.empty_like(q)
        self.op(q, k_cache, v_cache, meta.cu_seqlens, meta.positions, meta.page_table,
                self.decoder.cache_positions, out=out)
        return out

    def _attend_noop(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: RaggedMeta) -> torch.Tensor:
        attn = self.inner(q, k_cache, v_cache, meta)
        return noop_break(attn, out=attn)


class _HandPieces:
    """One token count of the common breakable pattern: its segments (torch.cuda.CUDAGraph each) and the attention
    call before each segment after the first, its tensors as captured. replay() runs them in a Python loop."""

    def __init__(self, pool: Any, longest: List[int]) -> None:
        self.pool, self.longest = pool, longest
        self.graphs: List[torch.cuda.CUDAGraph] = []
        self.calls: List[Tuple[Tuple[torch.Tensor, ...], torch.Tensor]] = []

    def begin(self) -> None:
        self.graphs.append(torch.cuda.CUDAGraph())
        self.graphs[-1].capture_begin(pool=self.pool)

    def split(self, *args: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Stands in for the attention op while capturing: ends the segment, keeps the call, begins the next."""
        self.graphs[-1].capture_end()
        self.calls.append((args, out))
        self.begin()
        return out

    def replay(self) -> None:
        longest = self.longest[0]
        self.graphs[0].replay()
        for (args, out), graph in zip(self.calls, self.graphs[1:]):
            varlen_into(*args, longest, out)  # copy_'s into `out`, the next segment's static input
            graph.replay()

    def reset(self) -> None:
        for graph in self.graphs:
            graph.reset()
        self.graphs, self.calls = [], []


class CommonPiecewiseRunner(CommonRaggedRunner):
    """The common breakable pattern, by hand (see the module's docstring): CommonRaggedRunner's static buffers,
    staging and sizes, each size captured as a torch.cuda.CUDAGraph per segment between the attention calls, and
    replayed segment, attention, segment, ... in a Python loop, the attention getting the step's longest request
    from its host split.

    Args:
        model: a PiecewiseRaggedDecoder with attention "varlen"; the runner runs its Decoder's weights and cache.
        capture_sizes: the token counts to capture.
        max_requests: requests per size: size T holds min(T, max_requests).
        pool: the pool to capture into; None makes one.
    """

    def __init__(self, model: PiecewiseRaggedDecoder, capture_sizes: Sequence[int], max_requests: int,
                 pool: Optional[Any] = None) -> None:
        if getattr(model, "piecewise", None) != "varlen":
            raise ValueError("CommonPiecewiseRunner runs a PiecewiseRaggedDecoder with attention 'varlen'")
        self.longest = [1]  # the step's longest request, which every size's attention calls read
        # A wrapper of its own over the same Decoder, whose op it swaps while capturing.
        hand = PiecewiseRaggedDecoder(model.decoder, "varlen", sample=model.sample)
        super().__init__(hand, ragged_inputs(model.cfg), capture_sizes, max_requests, pool=pool)

    def _capture(self, views: Any, stream: torch.cuda.Stream) -> Tuple[_HandPieces, torch.Tensor]:
        pieces = _HandPieces(self.pool, self.longest)
        self.fn.op = pieces.split
        try:
            with torch.cuda.stream(stream):
                pieces.begin()
                out = self.fn(**views)
                pieces.graphs[-1].capture_end()
        finally:
            self.fn.op = varlen_attention
        torch.cuda.current_stream().wait_stream(stream)
        return pieces, out

    def __call__(self, **step: torch.Tensor) -> torch.Tensor:
        self.longest[0] = max(step[SPLIT].tolist())
        return super().__call__(**step)
