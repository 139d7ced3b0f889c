"""`python -P benchmarks/launch_depth_probe.py` (GPU): the host time of one graph launch against the number of
launches of the same stream still queued before it. A piecewise step launches one graph per segment back to back
(33 at 32 layers, 9 at 8), each queued behind the ones before while the GPU works: piecewise_bench's host time a
break grew from 2.3 us at 8 layers to 6.7 at 32 (bench-h200-piecewise.txt). Each graph here is one kernel that spins
about 100 us (torch.cuda._sleep) and `nodes - 1` tiny kernels; per round, 40 replays are launched back to back after
a synchronize, each timed on the host; the medians over rounds are printed per position in the queue. Then bursts
taking 9, 33 or 132 distinct graphs in turn, as a piecewise step's segments are: 40 launches deep, 132 for 132 graphs
(so that every graph is launched; the one-graph bursts show no growth with depth up to 40, none was measured deeper).
"""
import statistics
import time

import torch

ROUNDS = 30
DEPTH = 40


def graph_of(nodes: int) -> torch.cuda.CUDAGraph:
    """A graph of one kernel spinning about 100 us and `nodes` - 1 tiny ones.

    Args:
        nodes: its kernel nodes.
    """
    x = torch.zeros(16, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x.add_(1)  # warm-up outside the capture
        with torch.cuda.graph(g, stream=s):
            torch.cuda._sleep(200_000)
            for _ in range(nodes - 1):
                x.add_(1)
    torch.cuda.synchronize()
    g._keep = x  # the graph reads x
    return g


def profile(graphs: list) -> list:
    """Median host us of each position in a burst of DEPTH launches (or one per graph, if more), taking the graphs
    in turn.

    Args:
        graphs: the graphs, launched in turn.
    """
    depth = max(DEPTH, len(graphs))
    times = [[] for _ in range(depth)]
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        for i in range(depth):
            g = graphs[i % len(graphs)]
            start = time.perf_counter_ns()
            g.replay()
            times[i].append((time.perf_counter_ns() - start) / 1000)
    torch.cuda.synchronize()
    return [statistics.median(t) for t in times]


def main() -> None:
    """Prints the host time of a launch by its position in a burst, then for distinct graphs in turn."""
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: host us of CUDAGraph.replay() by its position "
          f"in a burst of {DEPTH} (median of {ROUNDS} rounds); each graph spins ~100 us on the GPU")
    for nodes in (1, 12):
        medians = profile([graph_of(nodes)])
        print(f"{nodes:>3} nodes, one graph: " + " ".join(f"{m:5.1f}" for m in medians))
    # A piecewise step launches a different executable per segment: 9 at 8 layers, 33 at 32 (and 4 sizes of each).
    for distinct in (9, 33, 132):
        graphs = [graph_of(12) for _ in range(distinct)]
        medians = profile(graphs)
        print(f" 12 nodes, {distinct:>3} graphs in turn: median {statistics.median(medians[1:]):.1f} us a launch "
              f"(first {medians[0]:.1f})")


if __name__ == "__main__":
    main()
