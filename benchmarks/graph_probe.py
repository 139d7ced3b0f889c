"""Graph against graph, nothing staged: GPU microseconds per step of graphrunner's graphs, of graphrunner's Graph
captured without a staging node, and of the common runner's torch graphs (one model, one pool each) replayed bare,
queued back to back between CUDA events, at each capture size and over the benchmark's random walk of sizes; at
the size where they differ most, the kernels that differ. Answers whether the graphs themselves, or switching
between them, cost one contender more GPU time. On the GPU machine, after the build:
    PYTHONPATH=. python3 benchmarks/graph_probe.py [attention ...]      (default: decode)
"""
import random
import statistics
import sys
from collections import Counter
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

import graphrunner as gr
from graphrunner_workloads.common_runner import CommonRunner
from graphrunner_workloads.decoder import Decoder, decode_inputs, random_decode_inputs
from graphrunner_workloads.traces import DRAFT_PRESET, queued_us, walk

ROUNDS = 3
STEPS = 400


def replayed_us(graphs) -> float:
    """GPU us per replay of `graphs` in order, queued back to back."""
    return queued_us(lambda i: graphs[i].replay(), len(graphs))


def kernels(graph, n: int = 20) -> Counter:
    """GPU us per replay of each kernel name in `graph`."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    return Counter({k.key[:70]: k.device_time_total / n for k in prof.key_averages() if k.device_time_total > 0})


def probe(attention: str) -> None:
    cfg = replace(DRAFT_PRESET, attention=attention)
    model, gen = Decoder(cfg), torch.Generator(device="cuda").manual_seed(0)
    sizes = gr.default_capture_sizes(cfg.max_batch_size)
    with torch.no_grad():
        runner = gr.GraphRunner(model, decode_inputs(cfg), capture_sizes=sizes)
        runner.capture()
        example = random_decode_inputs(cfg, cfg.max_batch_size, gen)
        runner(**example)  # the same static contents for all: one full step staged in each
        common = CommonRunner(model, example, sizes)
        common(**example)
        # graphrunner's Graph without a staging node: the common runner's static views, captured into one pool
        # largest first (the common runner warmed every size up)
        unstaged, pool = {}, torch.cuda.graph_pool_handle()
        for size in sorted(sizes, reverse=True):
            unstaged[size] = gr.Graph()
            with unstaged[size].capture(pool=pool):
                model(**{name: buf[:size] for name, buf in common.static.items()})
    contenders = {"graphrunner": {s: runner.record.entries[s].graph for s in sizes},
                  "gr.Graph, no staging": unstaged, "torch CUDAGraph": common.graphs}
    print(f"\n== attention {attention}, 2 layers, cache 256, sizes {sizes}")
    walked = [runner.size_for(b) for b in walk(cfg.max_batch_size, STEPS)]
    shuffled = sizes * (STEPS // len(sizes))
    random.Random(0).shuffle(shuffled)
    patterns = {f"size {s}": [s] * STEPS for s in sizes}
    patterns.update({"walk": walked, "64/128 alternating": [64, 128] * (STEPS // 2),
                     "every size in turn": sizes * (STEPS // len(sizes)), "sizes shuffled": shuffled})
    per_size = {name: {} for name in contenders}
    print(f"  {'pattern':<20}" + "".join(f"{name:>24}" for name in contenders) + "   (GPU us per step, median)")
    for pattern, order in patterns.items():
        medians = {}
        for name, graphs in contenders.items():
            medians[name] = statistics.median(replayed_us([graphs[s] for s in order]) for _ in range(ROUNDS))
            if pattern.startswith("size"):
                per_size[name][order[0]] = medians[name]
        print(f"  {pattern:<20}" + "".join(f"{medians[n]:24.1f}" for n in contenders))
        if not pattern.startswith("size"):  # what the same steps cost without switching graphs
            expected = {n: statistics.fmean(per_size[n][s] for s in order) for n in contenders}
            print(f"  {'  same, unswitched':<20}" + "".join(f"{expected[n]:24.1f}" for n in contenders))
    worst = max(sizes, key=lambda s: abs(per_size["graphrunner"][s] - per_size["torch CUDAGraph"][s]))
    mine, other = kernels(contenders["graphrunner"][worst]), kernels(common.graphs[worst])
    print(f"  kernels at size {worst} (us per replay), graphrunner - common, largest differences:")
    diff = {k: mine.get(k, 0.0) - other.get(k, 0.0) for k in set(mine) | set(other)}
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[:8]:
        print(f"    {diff[k]:+7.1f}  (ours {mine.get(k, 0):6.1f}, common {other.get(k, 0):6.1f})  {k}")
    for graph in unstaged.values():
        graph.reset()
    runner.close()
    common.close()


def main() -> None:
    for attention in sys.argv[1:] or ["decode"]:
        probe(attention)


if __name__ == "__main__":
    main()
