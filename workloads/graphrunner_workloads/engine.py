"""A serving engine's loop over the ragged decoder: continuous batching with chunked prefill, greedy sampling on the
device, pages from a free list.

Requests (random prompts and output lengths, `Workload`) wait in arrival order; one is admitted while fewer than
`max_running` run and the free list holds the pages of its whole prompt and output. Each step packs every running
request's next tokens up to a token budget: each decoding request's one token first, then prefill chunks in
admission order (a long prompt takes several steps). A request's first output token comes from the step that ends
its prompt; it finishes after its output length and gives its pages back.

Modes, what each step runs through:
- "eager": every step eagerly (the CPU tests run it);
- "decode_only": steps of one token per request through a uniform decode graph runner (RaggedDecoder.decode, sizes
  count requests), mixed steps eagerly: graphrunner before ragged runners;
- "ragged": every step through gr.Dispatch: decode steps to that runner, mixed steps to a ragged runner (sizes
  count tokens), both captured into one pool.

Correctness, as engine users judge it: every request's tokens equal running that request alone through the plain
eager Decoder, its whole prompt in one step and then one token a step (`reference_tokens`). That holds exactly in
float32. In bfloat16 it does not: steps of other shapes round differently, and a near-tie between a request's two
best tokens flips its greedy choice, and every token after it.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch

import graphrunner as gr
from graphrunner_workloads.decoder import Decoder
from graphrunner_workloads.ragged import SPLIT, RaggedDecoder, decode_runner, default_ragged_sizes, ragged_runner

MODES = ("eager", "decode_only", "ragged")


@dataclass(frozen=True)
class Workload:
    """The requests an engine run serves: `requests` of them, prompt and output lengths uniform in the given
    inclusive ranges, random token ids; request i arrives at step i * arrival_gap (0: all wait at the start).

    Args:
        requests: how many.
        prompt_lens: (shortest, longest) prompt.
        output_lens: (fewest, most) tokens to generate.
        arrival_gap: engine steps between arrivals.
        seed: seeds the lengths and token ids.
    """

    requests: int = 32
    prompt_lens: Tuple[int, int] = (1, 2000)
    output_lens: Tuple[int, int] = (1, 128)
    arrival_gap: int = 0
    seed: int = 0

    def draw(self, vocab: int) -> List[Tuple[List[int], int]]:
        """Each request's prompt and output length.

        Args:
            vocab: token ids are drawn from 0..vocab-1.
        """
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for _ in range(self.requests):
            prompt = int(torch.randint(self.prompt_lens[0], self.prompt_lens[1] + 1, (1,), generator=gen))
            output = int(torch.randint(self.output_lens[0], self.output_lens[1] + 1, (1,), generator=gen))
            out.append((torch.randint(0, vocab, (prompt,), generator=gen).tolist(), output))
        return out

    @property
    def longest(self) -> int:
        """The most cache positions one request needs: its longest prompt and output."""
        return self.prompt_lens[1] + self.output_lens[1]


@dataclass
class Request:
    """One request's state in the engine.

    Attributes:
        index: its place in the workload.
        prompt_len: its prompt's tokens.
        max_new: tokens to generate.
        arrival: the step it arrives at.
        tokens: its prompt, then what it generated.
        computed: tokens whose keys and values are in the cache.
        pages: its pages, in order.
    """

    index: int
    prompt_len: int
    max_new: int
    arrival: int
    tokens: List[int]
    computed: int = 0
    pages: List[int] = field(default_factory=list)

    @property
    def generated(self) -> List[int]:
        return self.tokens[self.prompt_len:]


@dataclass
class EngineResult:
    """What one run served.

    Attributes:
        tokens: each request's generated tokens, in workload order.
        seconds: wall time of the loop.
        steps: steps run.
        mixed_steps: steps with more tokens than requests (a prefill chunk in them).
        graph_steps: steps that ran through a graph runner.
    """

    tokens: List[List[int]]
    seconds: float
    steps: int
    mixed_steps: int
    graph_steps: int

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the loop."""
        return self.generated / self.seconds


class Engine:
    """Continuous batching with chunked prefill over one RaggedDecoder (see the module's docstring).

    Args:
        model: the ragged step, built with sample=True (it returns each request's greedy token).
        mode: "eager", "decode_only" or "ragged".
        budget: the most tokens a step packs (>= max_running, so every decoding request fits).
        max_running: the most requests a step holds; at most the decoder's max_batch_size.
        capture_sizes: the ragged runner's token counts, the largest at least the budget; default
            default_ragged_sizes(budget).
    """

    def __init__(self, model: RaggedDecoder, mode: str, budget: int = 256, max_running: int = 8,
                 capture_sizes: Optional[Sequence[int]] = None) -> None:
        cfg = model.cfg
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not model.sample:
            raise ValueError("the engine samples on the device: build the RaggedDecoder with sample=True")
        if not 1 <= max_running <= min(budget, cfg.max_batch_size):
            raise ValueError(f"max_running ({max_running}) must be 1..min(budget, the decoder's max_batch_size) = "
                             f"{min(budget, cfg.max_batch_size)}")
        self.model, self.mode, self.budget, self.max_running = model, mode, budget, max_running
        self.device = model.decoder.embed.device
        self.decode: Optional[gr.GraphRunner] = None
        self.mixed: Optional[gr.GraphRunner] = None
        self.dispatch: Optional[gr.Dispatch] = None
        if mode != "eager":
            self.decode = decode_runner(model, max_running)
        sizes = list(capture_sizes or default_ragged_sizes(budget))
        if max(sizes) < budget:
            raise ValueError(f"the ragged runner's largest size ({max(sizes)}) must hold the budget ({budget})")
        if mode == "ragged":
            self.mixed = ragged_runner(model, sizes, max_running)
            gr.capture_all(self.decode, self.mixed)
            self.dispatch = gr.Dispatch(self.mixed, self.decode)
        elif mode == "decode_only":
            self.decode.capture()

    def run(self, workload: Workload) -> EngineResult:
        """Serves `workload` to the end; returns every request's tokens and the loop's time.

        Args:
            workload: the requests; each must fit the decoder's cache (workload.longest <= cache_len).
        """
        cfg = self.model.cfg
        if workload.longest > cfg.cache_len:
            raise ValueError(f"a request may need {workload.longest} cache positions; the decoder has {cfg.cache_len}")
        waiting: Deque[Request] = deque(
            Request(i, len(prompt), max_new, i * workload.arrival_gap, prompt)
            for i, (prompt, max_new) in enumerate(workload.draw(cfg.vocab)))
        free = list(range(cfg.num_pages - 1, 0, -1))  # page 0 is the padding tokens' scratch page
        running: List[Request] = []
        done: Dict[int, List[int]] = {}
        clock = steps = mixed = graphs = 0  # clock: the step arrivals are counted in, idle ones included
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        while waiting or running:
            while waiting and waiting[0].arrival <= clock and len(running) < self.max_running:
                need = -(-(waiting[0].prompt_len + waiting[0].max_new) // cfg.page_size)
                if need > len(free):
                    break
                req = waiting.popleft()
                req.pages = [free.pop() for _ in range(need)]
                running.append(req)
            if not running:  # nothing has arrived: idle until the next arrival
                clock = waiting[0].arrival
                continue
            batch = self._schedule(running)
            out, graphed = self._step(batch)
            clock, steps = clock + 1, steps + 1
            mixed, graphs = mixed + (len(out) < sum(n for _, n in batch)), graphs + graphed
            for (req, n), token in zip(batch, out):
                req.computed += n
                if req.computed == len(req.tokens):  # this step ended its prompt, or decoded its last token
                    req.tokens.append(token)
                if len(req.generated) == req.max_new:
                    running.remove(req)
                    free.extend(req.pages)
                    done[req.index] = req.generated
        seconds = time.perf_counter() - start
        return EngineResult([done[i] for i in range(len(done))], seconds, steps, mixed, graphs)

    def _schedule(self, running: List[Request]) -> List[Tuple[Request, int]]:
        """This step's (request, new tokens): every decoding request's one token, then prefill chunks in
        admission order until the budget is spent."""
        decoding = [(req, 1) for req in running if req.computed >= req.prompt_len]
        left, batch = self.budget - len(decoding), decoding
        for req in running:
            if req.computed < req.prompt_len and left:
                n = min(req.prompt_len - req.computed, left)
                batch.append((req, n))
                left -= n
        return batch

    def _step(self, batch: List[Tuple[Request, int]]) -> Tuple[List[int], bool]:
        """Runs one step; returns each request's sampled token and whether a graph runner ran it."""
        inputs = step_inputs(self.model.decoder, [(req.tokens, req.computed, n, req.pages) for req, n in batch])
        if self.dispatch is not None:  # decode steps to the uniform runner, the rest to the ragged one
            return self.dispatch(**inputs).tolist(), True
        if self.decode is not None and all(n == 1 for _, n in batch):
            del inputs[SPLIT]  # the decode runner's inputs are the ragged ones without the split
            return self.decode(**inputs).tolist(), True
        inputs[SPLIT] = inputs[SPLIT].to(self.device)  # the eager step reads the split on the device
        with torch.no_grad():
            return self.model(**inputs).tolist(), False

    def close(self) -> None:
        """Destroys the runners' graphs."""
        for runner in (self.decode, self.mixed):
            if runner is not None:
                runner.close()
        self.decode = self.mixed = self.dispatch = None


def step_inputs(decoder: Decoder, batch: Sequence[Tuple[Sequence[int], int, int, Sequence[int]]]
                ) -> Dict[str, torch.Tensor]:
    """One ragged step's inputs, built on the host and moved to the decoder's device in two copies (query_lens stays
    on the host, as a ragged runner takes it).

    Args:
        decoder: the decoder (its config and device).
        batch: per request (its tokens, how many are in the cache, new tokens this step, its pages): the step
            runs tokens[cached:cached + new] at positions cached..cached + new - 1.
    """
    cfg, device = decoder.cfg, decoder.embed.device
    query_lens = torch.tensor([n for _, _, n, _ in batch], dtype=torch.int32)
    starts = torch.tensor([cached for _, cached, _, _ in batch])
    table = torch.zeros(len(batch), cfg.pages_per_seq, dtype=torch.int32)
    for row, (_, _, _, pages) in zip(table, batch):
        row[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
    request = torch.repeat_interleave(torch.arange(len(batch)), query_lens)
    first = torch.cumsum(query_lens, 0) - query_lens  # each request's first token row
    positions = torch.arange(len(request)) - first[request] + starts[request]
    ids = list(itertools.chain.from_iterable(tokens[cached:cached + n] for tokens, cached, n, _ in batch))
    slots = table[request, positions // cfg.page_size].long() * cfg.page_size + positions % cfg.page_size
    # Two copies to the device instead of five: per-token rows as one int64 block, per-request ones as one int32.
    per_token = torch.stack([torch.tensor(ids), positions, slots]).to(device)
    per_request = torch.cat([(starts + query_lens).int(), table.flatten()]).to(device)
    return {"input_ids": per_token[0], "positions": per_token[1], "slots": per_token[2], SPLIT: query_lens,
            "seq_lens": per_request[: len(batch)], "page_table": per_request[len(batch):].view(len(batch), -1)}


def reference_tokens(decoder: Decoder, prompt: Sequence[int], max_new: int) -> List[int]:
    """`prompt`'s greedy continuation through the plain eager Decoder, alone: the whole prompt in one step (its
    tokens as rows, each attending to its position's keys), then one token a step. It writes into pages
    1..pages_per_seq of the decoder's cache.

    Args:
        decoder: the Decoder (paged, attention "sdpa"), as the engine's RaggedDecoder wraps it.
        prompt: the prompt's token ids.
        max_new: tokens to generate.
    """
    cfg, device = decoder.cfg, decoder.embed.device
    table = torch.arange(1, cfg.pages_per_seq + 1, dtype=torch.int32, device=device)[None, :]
    ids = torch.tensor(list(prompt), device=device)
    positions = torch.arange(len(prompt), device=device)
    out: List[int] = []
    with torch.no_grad():
        while len(out) < max_new:
            logits = decoder(ids, positions, (positions + 1).int(), table.expand(len(ids), -1))
            out.append(int(logits[-1].argmax()))
            ids, positions = torch.tensor([out[-1]], device=device), positions[-1:] + 1
    return out
