"""Speculative decoding on the built-in decoder, EAGLE-style: a small draft model proposes `steps` tokens per
request in one graph, the target model verifies them all in one graph (requests x (steps + 1) tokens), and the
longest matching prefix is accepted on the device. Both runners capture into one pool.

- `VerifyStep`: per request, its last accepted token and the draft's tokens, `steps + 1` tokens, at positions
  start..start+steps; it writes their keys and values into the target's paged cache and returns the target's
  greedy token at every position.
- `DraftStep`: `steps` greedy draft decodes in one graph. Each step's metadata (positions, lengths, KV slots)
  is computed inside the graph from the request's start and page-table row. Its `metadata` option picks how
  the KV slots are made: with torch ops ("torch"), or with a CUDA kernel into a buffer the engine made at
  start-up for both steps (`slot_buffers`), the draft's part sized for batch x steps ("kernel") or, the seed
  bug of sglang issue 26532, for the batch alone ("kernel-seed-bug"): the kernel then writes past it into the
  verify step's part. Common runners never notice (verify rewrites its part before reading it); guard names it.
- `generate`: the loop, with graphs or eagerly; acceptance and cache advance stay on the device.

The draft shares the target's embedding and LM head (as EAGLE drafts do), so it proposes the target's tokens
often. When every draft token is accepted, the draft's cache misses the last one's entry (EAGLE runs a
draft-extend step for it); that lowers acceptance, never correctness: the target verifies every token.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import graphrunner as gr
from graphrunner_workloads.decoder import Decoder, DecoderConfig, kv_slot
from graphrunner_workloads.memory import raw_bytes

METADATA = ("torch", "kernel", "kernel-seed-bug")


@dataclass(frozen=True)
class SpecConfig:
    """A target decoder, a draft of `draft_layers` layers of the same kind, and `steps` draft tokens a round.

    The draft draws its weights from the target's seed, so its layers are the target's first ones; a draft of
    as many layers as the target is the target itself (tests use it to exercise long accepted prefixes).
    """

    target: DecoderConfig = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000,
                                          cache_len=512, page_size=16, max_batch_size=8, dtype=torch.float32)
    draft_layers: int = 1
    steps: int = 3

    @property
    def draft(self) -> DecoderConfig:
        return dataclasses.replace(self.target, layers=self.draft_layers)


# The seed bug's setting: sizes up to 64 and 4 steps. The draft's part of the engine's slot buffer holds 64
# entries; at size s its kernel writes 4 s, past the part at sizes 32 and 64 (into 64 and 192 of verify's).
SEED_BUG_CONFIG = SpecConfig(target=DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512,
                                                  vocab=1000, cache_len=256, page_size=16, max_batch_size=64,
                                                  dtype=torch.float32), steps=4)
SEED_BUG_SIZES = [4, 16, 32, 64]


def make_models(cfg: SpecConfig, device: str = "cuda") -> Tuple[Decoder, Decoder]:
    """The target and the draft; the draft shares the target's embedding and LM head."""
    target, draft = Decoder(cfg.target, device=device), Decoder(cfg.draft, device=device)
    with torch.no_grad():
        draft.embed.copy_(target.embed)
        draft.lm_head.copy_(target.lm_head)
    return target, draft


def slot_buffers(cfg: SpecConfig, metadata: str, device: str = "cuda") -> Tuple[torch.Tensor, torch.Tensor]:
    """The draft's and the verify step's KV-slot buffers for the kernel metadata paths, made once at start-up
    for every graph family, as engines do (SGLang's `init_cuda_graph_state`): one int64 allocation, the
    draft's part first (max batch x steps entries; with the seed bug, max batch), then verify's (max batch x
    (steps + 1)). The seed bug's draft kernel writes past its part into verify's at sizes above max batch /
    steps."""
    rows, steps = cfg.target.max_batch_size, cfg.steps
    draft = rows if metadata == "kernel-seed-bug" else rows * steps
    engine = torch.zeros(draft + rows * (steps + 1), dtype=torch.long, device=device)
    return engine[:draft], engine[draft:]


def _slots_kernel() -> Callable[..., None]:
    """The KV-slot kernel (graphrunner_workloads.reproductions): slots[k * rows + r] = the flat slot of request
    r's token at start[r] + k, for k < steps, written through the raw pointer however big `slots` is."""
    from graphrunner_workloads.reproductions import ops

    return ops().kv_slots_op


class VerifyStep(torch.nn.Module):
    """fn(input_ids [requests * tokens], start [requests], page_table [requests, pages]) -> {"tokens": target's
    greedy token at each of the requests * tokens positions}. With `slots` (an engine buffer, see
    slot_buffers), a kernel writes the KV slots there first, as an attention backend's metadata."""

    def __init__(self, target: Decoder, tokens: int, slots: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.target, self.tokens = target, tokens
        self.register_buffer("offsets", torch.arange(tokens, device=target.embed.device), persistent=False)
        self.register_buffer("slots", slots, persistent=False)

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor,
                page_table: torch.Tensor) -> Dict[str, torch.Tensor]:
        positions = (start[:, None] + self.offsets).flatten()
        slots = None
        if self.slots is not None:
            rows = start.shape[0]
            _slots_kernel()(start, page_table, self.slots, self.tokens, self.target.cfg.page_size)
            slots = self.slots[: rows * self.tokens].view(self.tokens, rows).t().flatten()  # request-major
        logits = self.target(input_ids, positions, (positions + 1).int(), page_table.repeat_interleave(self.tokens, 0),
                             kv_slots=slots)
        return {"tokens": logits.argmax(-1)}


class DraftStep(torch.nn.Module):
    """fn(last [requests], start [requests], page_table [requests, pages]) -> {"tokens": [requests, steps]}: the
    draft's greedy continuation of each request's last token, `steps` decodes in one call.

    `metadata` picks how each step's KV slots are made: "torch" with torch ops inside the graph; "kernel" and
    "kernel-seed-bug" with a kernel, into `slots` (an engine buffer, see slot_buffers), all steps at once."""

    def __init__(self, draft: Decoder, steps: int, metadata: str = "torch",
                 slots: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if metadata not in METADATA:
            raise ValueError(f"metadata must be one of {METADATA}, got {metadata!r}")
        if (metadata == "torch") != (slots is None):
            raise ValueError(f"metadata {metadata!r} takes {'no' if metadata == 'torch' else 'a'} slots buffer "
                             "(make_steps() makes the pair right)")
        self.draft, self.steps = draft, steps
        self.register_buffer("offsets", torch.arange(steps, device=draft.embed.device), persistent=False)
        self.register_buffer("slots", slots, persistent=False)

    def kv_slots(self, start: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
        """Every step's KV slot per request, step-major [steps * requests]."""
        rows, page_size = start.shape[0], self.draft.cfg.page_size
        if self.slots is None:
            positions = (start[None, :] + self.offsets[:, None]).flatten()
            return kv_slot(page_table.repeat(self.steps, 1), positions, page_size)
        _slots_kernel()(start, page_table, self.slots, self.steps, page_size)
        # What the kernel wrote, as every later step reads it: steps x rows entries from the buffer's first,
        # however big the buffer is.
        return raw_bytes(self.slots.data_ptr(), rows * self.steps * 8, start.device).view(torch.long)

    def forward(self, last: torch.Tensor, start: torch.Tensor, page_table: torch.Tensor) -> Dict[str, torch.Tensor]:
        rows = last.shape[0]
        slots = self.kv_slots(start, page_table)
        token, proposed = last, []
        for k in range(self.steps):
            positions = start + k
            logits = self.draft(token, positions, (positions + 1).int(), page_table,
                                kv_slots=slots[k * rows:(k + 1) * rows])
            token = logits.argmax(-1)
            proposed.append(token)
        return {"tokens": torch.stack(proposed, 1)}


def make_steps(cfg: SpecConfig, target: Decoder, draft: Decoder,
               metadata: str = "torch") -> Tuple[VerifyStep, DraftStep]:
    """The verify and draft step modules, sharing the engine's slot buffers on the kernel metadata paths."""
    if metadata == "torch":
        return VerifyStep(target, cfg.steps + 1), DraftStep(draft, cfg.steps)
    draft_slots, verify_slots = slot_buffers(cfg, metadata, str(target.embed.device))
    return VerifyStep(target, cfg.steps + 1, verify_slots), DraftStep(draft, cfg.steps, metadata, draft_slots)


def verify_inputs(cfg: SpecConfig) -> Dict[str, gr.StaticInput]:
    t = cfg.target
    return {"input_ids": gr.StaticInput((), torch.long, high=t.vocab, per_token=True),
            "start": gr.StaticInput((), torch.long, pad=0, high=t.cache_len - cfg.steps - 1),
            "page_table": gr.StaticInput((t.pages_per_seq,), torch.int32, pad=0, low=1, high=t.num_pages)}


def draft_inputs(cfg: SpecConfig) -> Dict[str, gr.StaticInput]:
    t = cfg.target
    return {"last": gr.StaticInput((), torch.long, high=t.vocab),
            "start": gr.StaticInput((), torch.long, pad=0, high=t.cache_len - cfg.steps - 1),
            "page_table": gr.StaticInput((t.pages_per_seq,), torch.int32, pad=0, low=1, high=t.num_pages)}


def random_state(cfg: SpecConfig, batch: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Valid per-request state: a start that leaves room for a round, distinct pages per request."""
    t = cfg.target
    pages = torch.randperm(t.num_pages - 1, generator=gen, device=gen.device)[: batch * t.pages_per_seq] + 1
    return {"start": torch.randint(0, t.cache_len - cfg.steps - 1, (batch,), generator=gen, device=gen.device),
            "page_table": pages.view(batch, t.pages_per_seq).to(torch.int32)}


def random_verify_step(cfg: SpecConfig, batch: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """validate()'s inputs for the verify runner."""
    ids = torch.randint(0, cfg.target.vocab, (batch * (cfg.steps + 1),), generator=gen, device=gen.device)
    return {"input_ids": ids, **random_state(cfg, batch, gen)}


def random_draft_step(cfg: SpecConfig, batch: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """validate()'s inputs for the draft runner."""
    return {"last": torch.randint(0, cfg.target.vocab, (batch,), generator=gen, device=gen.device),
            **random_state(cfg, batch, gen)}


def make_runners(cfg: SpecConfig, target: Decoder, draft: Decoder, metadata: str = "torch",
                 capture_sizes: Optional[List[int]] = None) -> Tuple[gr.GraphRunner, gr.GraphRunner]:
    """The verify and draft runners, built for one pool (capture them together with gr.capture_all)."""
    sizes = capture_sizes or gr.default_capture_sizes(cfg.target.max_batch_size)
    verify_step, draft_step = make_steps(cfg, target, draft, metadata)
    verify = gr.GraphRunner(verify_step, verify_inputs(cfg), capture_sizes=sizes, tokens_per_request=cfg.steps + 1,
                            name="verify")
    drafter = gr.GraphRunner(draft_step, draft_inputs(cfg), capture_sizes=sizes, name="draft")
    return verify, drafter


@dataclass
class Requests:
    """Per-request state on the device: the last accepted token (not yet in either cache), how many tokens
    the caches hold, each request's pages, and the generated tokens so far."""

    last: torch.Tensor
    start: torch.Tensor
    page_table: torch.Tensor
    out: torch.Tensor      # [requests, capacity] generated tokens
    written: torch.Tensor  # [requests] how many of out are filled


def prefill(cfg: SpecConfig, models: List[Decoder], prompts: torch.Tensor, capacity: int) -> Requests:
    """Writes every prompt token but the last into each model's cache (one eager pass over all tokens as rows)."""
    batch, length = prompts.shape
    t = cfg.target
    pages = torch.arange(1, 1 + batch * t.pages_per_seq, device=prompts.device, dtype=torch.int32)
    page_table = pages.view(batch, t.pages_per_seq)
    positions = torch.arange(length - 1, device=prompts.device).repeat(batch)
    with torch.no_grad():
        for model in models:
            model(prompts[:, :-1].flatten(), positions, (positions + 1).int(),
                  page_table.repeat_interleave(length - 1, 0))
    return Requests(last=prompts[:, -1].clone(), start=torch.full((batch,), length - 1, device=prompts.device),
                    page_table=page_table, out=torch.zeros(batch, capacity, dtype=torch.long, device=prompts.device),
                    written=torch.zeros(batch, dtype=torch.long, device=prompts.device))


def accept(state: Requests, draft_tokens: torch.Tensor, target_tokens: torch.Tensor, limit: int) -> torch.Tensor:
    """Greedy acceptance on the device: the longest prefix of the draft's tokens the target agrees with, then
    the target's own next token. Appends them to `out` and advances the caches of requests that have fewer than
    `limit` tokens (finished ones stay put, within their cache); returns tokens made per request."""
    batch, steps = draft_tokens.shape
    target_tokens = target_tokens.view(batch, steps + 1)
    accepted = (draft_tokens == target_tokens[:, :steps]).long().cumprod(1).sum(1)  # [batch], 0..steps
    made = torch.where(state.written < limit, accepted + 1, 0)
    new = torch.cat([draft_tokens, draft_tokens[:, :1]], 1)
    rows = torch.arange(batch, device=new.device)
    new[rows, accepted] = target_tokens[rows, accepted]  # the target's token after the accepted prefix
    columns = state.written[:, None] + torch.arange(steps + 1, device=new.device)
    keep = torch.arange(steps + 1, device=new.device)[None, :] < made[:, None]
    columns = torch.where(keep, columns, state.out.shape[1] - 1).clamp(max=state.out.shape[1] - 1)
    state.out.scatter_(1, columns, torch.where(keep, new, state.out.gather(1, columns)))
    state.written += made
    state.last = torch.where(made > 0, new[rows, accepted], state.last)
    state.start = state.start + made
    return made


Step = Callable[..., Dict[str, torch.Tensor]]


def generate(cfg: SpecConfig, state: Requests, draft: Step, verify: Step, tokens: int) -> torch.Tensor:
    """Rounds of draft, verify and accept until every request has `tokens` new tokens; returns them [requests,
    tokens]. `draft` and `verify` are runners or the eager step modules."""
    with torch.no_grad():
        while int(state.written.min()) < tokens:
            # The draft's output is a view into the shared pool, valid until the next replay of any runner in it:
            # keep a copy before the verify step replays.
            proposed = draft(last=state.last, start=state.start, page_table=state.page_table)["tokens"].clone()
            ids = torch.cat([state.last[:, None], proposed], 1).flatten()
            checked = verify(input_ids=ids, start=state.start, page_table=state.page_table)["tokens"]
            accept(state, proposed, checked, tokens)
    return state.out[:, :tokens]


def greedy(cfg: SpecConfig, target: Decoder, state: Requests, tokens: int) -> torch.Tensor:
    """Plain greedy decoding of the target, one token per request per step, eagerly: the reference."""
    made = []
    last, start = state.last, state.start
    with torch.no_grad():
        for _ in range(tokens):
            logits = target(last, start, (start + 1).int(), state.page_table)
            last, start = logits.argmax(-1), start + 1
            made.append(last)
    return torch.stack(made, 1)
