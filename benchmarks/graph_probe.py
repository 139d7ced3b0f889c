"""Graph against graph, nothing staged: GPU microseconds per step of graphrunner's graphs and of the common runner's
graphs (both of one model, one pool each) replayed bare, queued back to back between CUDA events, at each capture
size and over the benchmark's random walk of sizes; then, at the size where they differ most, the kernels that
differ. Answers whether the graphs themselves, or switching between them, cost one contender more GPU time.
On the GPU machine, after the build:
    PYTHONPATH=. python3 benchmarks/graph_probe.py [attention ...]      (default: decode sdpa)
"""
import statistics
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import graphrunner as gr
from graphrunner.workloads.common_runner import CommonRunner
from graphrunner.workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs
from graphrunner.workloads.traces import walk

ROUNDS = 5
STEPS = 400


def queued_us(graphs) -> float:
    """GPU us per replay of `graphs` in order, queued back to back."""
    for g in graphs[:10]:
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for g in graphs:
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / len(graphs)


def kernels(graph, n: int = 20) -> Counter:
    """GPU us per replay of each kernel name in `graph`."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()
    return Counter({k.key[:70]: k.device_time_total / n for k in prof.key_averages() if k.device_time_total > 0})


def probe(attention: str) -> None:
    cfg = DecoderConfig(layers=2, cache_len=256, max_batch_size=128, attention=attention)
    model, gen = Decoder(cfg), torch.Generator(device="cuda").manual_seed(0)
    sizes = gr.default_capture_sizes(cfg.max_batch_size)
    with torch.no_grad():
        runner = gr.GraphRunner(model, decode_inputs(cfg), capture_sizes=sizes)
        runner.capture()
        example = random_decode_inputs(cfg, cfg.max_batch_size, gen)
        runner(**example)  # the same static contents for both: one full step staged in each
        baseline = CommonRunner(model, example, sizes)
        baseline(**example)
    ours = {s: runner.record.entries[s].graph for s in sizes}
    theirs = baseline.graphs
    print(f"\n== attention {attention}, 2 layers, cache 256, sizes {sizes}")
    patterns = {f"size {s}": [s] * STEPS for s in sizes}
    patterns["walk"] = [runner.size_for(b) for b in walk(cfg.max_batch_size, STEPS)]
    patterns["64/128 alternating"] = [64, 128] * (STEPS // 2)
    gaps = {}
    for name, order in patterns.items():
        times = {"graphrunner": [], "common": []}
        for _ in range(ROUNDS):
            times["graphrunner"].append(queued_us([ours[s] for s in order]))
            times["common"].append(queued_us([theirs[s] for s in order]))
        a, b = statistics.median(times["graphrunner"]), statistics.median(times["common"])
        print(f"  {name:<20} graphrunner {a:8.1f} ({min(times['graphrunner']):.1f}-{max(times['graphrunner']):.1f})"
              f"  common {b:8.1f} ({min(times['common']):.1f}-{max(times['common']):.1f})  ratio {a / b:.4f}")
        if name.startswith("size"):
            gaps[int(name.split()[1])] = a - b
    worst = max(gaps, key=lambda s: abs(gaps[s]))
    mine, other = kernels(ours[worst]), kernels(theirs[worst])
    print(f"  kernels at size {worst} (us per replay), graphrunner - common, largest differences:")
    diff = {k: mine.get(k, 0.0) - other.get(k, 0.0) for k in set(mine) | set(other)}
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[:8]:
        print(f"    {diff[k]:+7.1f}  (ours {mine.get(k, 0):6.1f}, common {other.get(k, 0):6.1f})  {k}")
    runner.close()
    baseline.close()


def main() -> None:
    for attention in sys.argv[1:] or ["decode", "sdpa"]:
        probe(attention)


if __name__ == "__main__":
    main()
