"""The benchmark's traces: every contender on one decoder preset, with the host waiting each step and running ahead.

A trace is a random walk of batch sizes over 1..max_batch_size with fresh inputs each step. Contenders:
- run: graphrunner (staging inside the graph);
- common: the common runner (torch.cuda.CUDAGraph per size, copy_ staging; common_runner.py);
- bare: pre-staged inputs. Per step, a graph of the step's size captured the way graphrunner captures (its capture
  stream, one pool) on the step's own inputs, padded: a replay runs what the runner's graph runs for that step,
  attention over the step's own lengths included, with nothing staged. The host leads the GPU by at most the
  runner's max_lead steps;
- compile_ro: torch.compile(mode="reduce-overhead") with each step's inputs padded, outside the timed loop, to the
  size graphrunner runs it at;
- run_compiled: graphrunner around torch.compile(mode="default") of the same model, compiled at every capture
  size before capture;
- eager (synchronised only, on the first steps).
Synchronised: the host waits for each step, as a loop reading sampled tokens does. Pipelined: no wait inside the
loop, as overlap schedulers run. Each contender also runs 200 steps of batch 1 and of batch 64 back to back, timed
with CUDA events: the time of one step while the GPU never waits for the host (for contenders whose host time
per step exceeds their GPU time, that host time).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import graphrunner as gr
from graphrunner_workloads.common_runner import CommonRunner
from graphrunner_workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs

Step = Callable[[int], object]  # runs step i of the trace (or of a fixed-batch run)
ROUNDS = 5  # each (contender, regime) runs this many times, in turns; the median is reported, the spread kept
EAGER_STEPS = 200
GPU_STEPS = 200
GPU_BATCHES = (1, 64)
UNCOMPILED = ("run", "common", "bare")
COMPILED = ("compile_ro", "run_compiled")
# The bench's draft preset at its default flags, which the probes in benchmarks/ run.
DRAFT_PRESET = DecoderConfig(layers=2, cache_len=256, max_batch_size=128, attention="decode")


def walk(max_batch_size: int, steps: int, seed: int = 1) -> List[int]:
    """Batch sizes of a random walk over 1..max_batch_size starting at half of it."""
    order = torch.Generator().manual_seed(seed)
    batches, batch = [], max(1, max_batch_size // 2)
    for _ in range(steps):
        batch = min(max_batch_size, max(1, batch + int(torch.randint(-8, 9, (1,), generator=order))))
        batches.append(batch)
    return batches


def padded(cfg: DecoderConfig, step: Dict[str, torch.Tensor], size: int) -> Dict[str, torch.Tensor]:
    """`step` with padding rows up to `size`, each holding its input's pad value."""
    specs = decode_inputs(cfg)
    out = {}
    for name, t in step.items():
        pad = torch.full((size - t.shape[0], *t.shape[1:]), specs[name].pad, dtype=t.dtype, device=t.device)
        out[name] = torch.cat([t, pad])
    return out


class Contenders:
    """Every contender built on one model, with the steps each runs prepared outside the timed loops.

    Args:
        cfg: the decoder preset.
        batches: the trace's batch sizes, one per step.
        compiled: build the torch.compile contenders too.
        gen: the CUDA generator the steps' inputs are drawn from.
    """

    def __init__(self, cfg: DecoderConfig, batches: List[int], compiled: bool, gen: torch.Generator) -> None:
        self.cfg, self.model = cfg, Decoder(cfg)
        self.sizes = gr.default_capture_sizes(cfg.max_batch_size)
        self.steps = [random_decode_inputs(cfg, b, gen) for b in batches]
        self.fixed = {b: random_decode_inputs(cfg, b, gen) for b in GPU_BATCHES if b <= cfg.max_batch_size}
        self.bare_pool = torch.cuda.graph_pool_handle()
        # Each bare graph with the padded inputs it reads, which must live as long as it does.
        self.bare: List[Tuple[gr.Graph, Dict[str, torch.Tensor]]] = []
        example = random_decode_inputs(cfg, cfg.max_batch_size, gen)
        self.compile_ro: Optional[Callable[..., object]] = None
        self.run_compiled: Optional[gr.GraphRunner] = None
        self.compile_error: Optional[str] = None
        # Compiled first: reduce-overhead frees cuBLAS workspaces whenever it records, which the common runner's
        # graphs captured before would still use (graphrunner's own graphs keep theirs).
        if compiled:
            try:
                self._compile(example)
            except Exception as exc:  # the report says why these contenders are missing; the others still run
                self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
                self.close_compiled()
        self.runner = gr.GraphRunner(self.model, decode_inputs(cfg), capture_sizes=self.sizes)
        self.runner.capture()
        self.common = CommonRunner(self.model, example, self.sizes)

    def _prestaged(self, pad: List[Dict[str, torch.Tensor]]) -> List[gr.Graph]:
        """Per step of `pad` (inputs padded to the runner's size for them), a graph captured on the step's own
        inputs, on graphrunner's capture stream, into one pool: replayed, it runs the step with nothing staged."""
        stream = gr.capture_stream(torch.cuda.current_device())
        with torch.cuda.stream(stream):  # this stream's cuBLAS workspace, made before any capture
            self.model(**pad[0])
        stream.synchronize()
        graphs = []
        for step in pad:
            graph = gr.Graph()
            with graph.capture(pool=self.bare_pool, stream=stream):
                self.model(**step)
            graphs.append(graph)
        self.bare += zip(graphs, pad)
        return graphs

    def _compile(self, example: Dict[str, torch.Tensor]) -> None:
        torch._dynamo.reset()
        self.compile_ro = torch.compile(self.model, mode="reduce-overhead", dynamic=True)
        compiled = torch.compile(self.model, dynamic=True)
        for size in self.sizes:  # compile (and, for reduce-overhead, record) every size before anything is timed
            views = {n: t[:size] for n, t in example.items()}
            compiled(**views)  # graphrunner captures it on views of its static buffers
            # The trace calls reduce-overhead on tensors of their own, not views: warmed up on views, dynamo
            # compiled and recorded again inside the first timed round (gpu-log-h100.txt, run AE3).
            own = {n: t.clone() for n, t in views.items()}
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                self.compile_ro(**own)
        self.run_compiled = gr.GraphRunner(compiled, decode_inputs(self.cfg), capture_sizes=self.sizes,
                                           name="run_compiled")
        self.run_compiled.capture()

    def step_functions(self, steps: List[Dict[str, torch.Tensor]]) -> Dict[str, Step]:
        """Per contender, a function running step i % len(steps) of `steps`: the trace, or one fixed batch."""
        runner, common, n = self.runner, self.common, len(steps)
        pad = [padded(self.cfg, s, runner.size_for(s["input_ids"].shape[0])) for s in steps]
        graphs = self._prestaged(pad)
        # Bare replays lead the GPU by as many steps as the runner's own, so that run against bare weighs
        # staging alone, not how full the launch queue is.
        out: Dict[str, Step] = {"run": lambda i: runner(**steps[i % n]),
                                "common": lambda i: common(**steps[i % n]),
                                "bare": paced(lambda i: graphs[i % n].replay(), runner.spec.max_lead)}
        if self.compile_ro is not None:
            ro, rc = self.compile_ro, self.run_compiled

            def compile_ro(i: int) -> object:
                torch.compiler.cudagraph_mark_step_begin()
                return ro(**pad[i % n])

            out.update({"compile_ro": compile_ro, "run_compiled": lambda i: rc(**steps[i % n])})
        return out

    def eager_step(self) -> Step:
        """A function running step i of the trace eagerly."""
        return lambda i: self.model(**self.steps[i])

    def close_compiled(self) -> None:
        """Drops the compiled contenders and dynamo's caches."""
        if self.run_compiled is not None:
            self.run_compiled.close()
        self.compile_ro = self.run_compiled = None
        torch._dynamo.reset()

    def close(self) -> None:
        """Gives back every contender's graphs and pools."""
        self.runner.close()
        self.common.close()
        for graph, _ in self.bare:
            graph.reset()
        self.bare = []
        self.close_compiled()


def draft_contenders(trace_steps: int, compiled: bool) -> Contenders:
    """Contenders on DRAFT_PRESET over a `trace_steps`-step walk, inputs drawn from a CUDA generator seeded 0: the
    set-up the probes in benchmarks/ share. Build them under torch.no_grad(), as the bench does.

    Args:
        trace_steps: steps of the random-walk trace.
        compiled: build the torch.compile contenders too.
    """
    return Contenders(DRAFT_PRESET, walk(DRAFT_PRESET.max_batch_size, trace_steps), compiled,
                      torch.Generator(device="cuda").manual_seed(0))


def paced(step: Step, lead: Optional[int]) -> Step:
    """`step` with the host at most `lead` calls ahead of the GPU, as GraphRunner(max_lead=lead) keeps its own
    steps: call i waits until call i - lead - 1 has finished (an event after each call). None: unbounded."""
    if lead is None:
        return step
    marks = [torch.cuda.Event() for _ in range(lead + 1)]

    def call(i: int) -> object:
        mark = marks[i % len(marks)]
        mark.synchronize()  # recorded after call i - lead - 1 (a mark never recorded is complete)
        out = step(i)
        mark.record()
        return out

    return call


def medians(spread: Dict[str, List[float]], spread_key: str) -> Dict[str, object]:
    """Each key's median over rounds, and under `spread_key` each key's (min, max)."""
    out: Dict[str, object] = {key: statistics.median(values) for key, values in spread.items()}
    out[spread_key] = {key: (min(values), max(values)) for key, values in spread.items()}
    return out


def round_ratios(spread: Dict[str, List[float]], a: str, b: str) -> Optional[Tuple[float, float]]:
    """(min, max) over rounds of a / b, each round's two values taken side by side; None if either is missing."""
    if a not in spread or b not in spread:
        return None
    ratios = [x / y for x, y in zip(spread[a], spread[b])]
    return min(ratios), max(ratios)


def host_limit(res: Dict[str, object], spread: Dict[str, List[float]], prefix: str) -> Dict[str, object]:
    """`{prefix}run_compiled_vs_compile_ro_host_limit` (with `_rounds`): the pipelined run_compiled/compile_ro
    ratio that compile_ro's host time alone allows, had each of its steps taken its host time a step
    (synchronised trace) and nothing more; its GPU work may take longer. Empty where either value is missing.

    Args:
        res: the medians over rounds.
        spread: each key's values, one per round.
        prefix: the preset's key prefix.
    """
    host, rate = f"{prefix}trace_synced_host_us_compile_ro", f"{prefix}trace_pipelined_steps_s_run_compiled"
    if host not in res or rate not in res:
        return {}
    limits = [h * r / 1e6 for h, r in zip(spread[host], spread[rate])]
    key = f"{prefix}run_compiled_vs_compile_ro_host_limit"
    return {key: res[host] * res[rate] / 1e6, f"{key}_rounds": (min(limits), max(limits))}


def steps_per_s(step: Step, n: int, synced: bool) -> Tuple[float, List[float]]:
    """Steps per second over steps 0..n-1, the host waiting for each (synced) or never inside the loop; and the
    seconds the host spent inside each step call. Synchronised, each call finds the GPU idle, so that is the
    contender's own host time a step; pipelined, it includes waiting for room to launch."""
    stream = torch.cuda.current_stream()
    for i in range(min(n, 20)):  # after another contender ran: its caches, not this one's first steps
        step(i)
    torch.cuda.synchronize()
    host = []
    t0 = time.perf_counter()
    for i in range(n):
        t1 = time.perf_counter()
        step(i)
        host.append(time.perf_counter() - t1)
        if synced:
            stream.synchronize()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), host


def queued_us(step: Step, n: int = GPU_STEPS) -> float:
    """Microseconds per step of n steps queued back to back, between two CUDA events."""
    for i in range(10):
        step(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(n):
        step(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / n


def kernel_us(step: Step, n: int) -> Dict[str, float]:
    """Device us a step of each kernel (by name) over steps 0..n-1 of `step`, from torch.profiler (CUPTI), after
    10 untimed steps."""
    for i in range(10):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            step(i)
        torch.cuda.synchronize()
    return {k.key: k.device_time_total / n for k in prof.key_averages() if k.device_time_total}


def _run_contenders(contenders: Contenders, trace_steps: int, prefix: str,
                    spread: Dict[str, List[float]]) -> Optional[str]:
    """Runs every contender's traces and fixed-batch steps in turns, ROUNDS times, into `spread`; closes the
    contenders. Returns why the compiled contenders are missing, if they are."""
    try:
        trace = contenders.step_functions(contenders.steps)
        fixed = {batch: contenders.step_functions([step]) for batch, step in contenders.fixed.items()}
        # The compiled contenders run after every round of the others: a reduce-overhead function may free cuBLAS
        # workspaces when it runs, and the common runner's graphs (unlike graphrunner's) would then use freed
        # memory (the co-tenant hazard; an illegal memory access here when the two took turns).
        for group in (UNCOMPILED, COMPILED):
            # One untimed pipelined trace of each first: right after set-up the first traces ran up to 9% slower
            # with the SM clock at its maximum all along (benchmarks/round_probe.py, run AE6).
            for name in group:
                if name in trace:
                    steps_per_s(trace[name], trace_steps, False)
            for _ in range(ROUNDS):
                for name in group:
                    if name not in trace:
                        continue
                    for regime, synced in (("pipelined", False), ("synced", True)):
                        rate, host = steps_per_s(trace[name], trace_steps, synced)
                        spread.setdefault(f"{prefix}trace_{regime}_steps_s_{name}", []).append(rate)
                        if synced:
                            spread.setdefault(f"{prefix}trace_synced_host_us_{name}", []).append(
                                statistics.median(host) * 1e6)
            for batch, steps in fixed.items():
                for _ in range(ROUNDS):
                    for name in group:
                        if name in steps:
                            spread.setdefault(f"{prefix}gpu_us_bs{batch}_{name}", []).append(queued_us(steps[name]))
        rate, host = steps_per_s(contenders.eager_step(), EAGER_STEPS, True)
        spread[f"{prefix}trace_synced_steps_s_eager"] = [rate]
        spread[f"{prefix}trace_synced_host_us_eager"] = [statistics.median(host) * 1e6]
        return contenders.compile_error
    finally:
        contenders.close()


def run_traces(cfg: DecoderConfig, trace_steps: int, compiled: bool, prefix: str,
               gen: torch.Generator) -> Dict[str, object]:
    """Results, medians over rounds: `{prefix}trace_{pipelined,synced}_steps_s_{contender}`,
    `{prefix}trace_synced_host_us_{contender}` (host us inside one step call) and
    `{prefix}gpu_us_bs{1,64}_{contender}`; the ratios the targets read (of medians) with each ratio's spread over
    rounds under `<ratio>_rounds`; and each key's spread over rounds under `{prefix}trace_spread`.

    Args:
        cfg: the decoder preset.
        trace_steps: steps of the random-walk trace.
        compiled: include the torch.compile contenders.
        prefix: the keys' prefix ("draft_" for the draft preset, "" for the main one).
        gen: the CUDA generator the steps' inputs are drawn from.
    """
    res: Dict[str, object] = {}
    spread: Dict[str, List[float]] = {}
    # Everything under no_grad, compiling included: a compiled function compiled with autograd on would compile
    # again (inside a capture) when called with it off.
    with torch.no_grad():
        res[f"{prefix}compile_error"] = _run_contenders(
            Contenders(cfg, walk(cfg.max_batch_size, trace_steps), compiled, gen), trace_steps, prefix, spread)
    res.update(medians(spread, f"{prefix}trace_spread"))

    def add_ratio(key: str, a: str, b: str) -> None:
        if a in res and b in res:
            res[key], res[f"{key}_rounds"] = res[a] / res[b], round_ratios(spread, a, b)

    for regime in ("pipelined", "synced"):
        for other in ("common", "bare"):
            add_ratio(f"{prefix}{regime}_run_vs_{other}", f"{prefix}trace_{regime}_steps_s_run",
                      f"{prefix}trace_{regime}_steps_s_{other}")
    add_ratio(f"{prefix}run_compiled_vs_compile_ro", f"{prefix}trace_pipelined_steps_s_run_compiled",
              f"{prefix}trace_pipelined_steps_s_compile_ro")
    add_ratio(f"{prefix}synced_run_compiled_vs_compile_ro", f"{prefix}trace_synced_steps_s_run_compiled",
              f"{prefix}trace_synced_steps_s_compile_ro")
    res.update(host_limit(res, spread, prefix))
    return {k: v for k, v in res.items() if v is not None}
