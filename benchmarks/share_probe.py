"""Probe: graphs sharing one executable (Graph.share) replayed back to back, with and without a sync between
replays, and which graph's result each output holds when it is wrong.

    python benchmarks/share_probe.py

Three graphs of one structure (y = tanh(x) * 2 + 1 over their own x and y) share graph 0's executable; each
order replays them on one stream, refilling x and poisoning y first, and checks every y against its own
expected value, then says what a wrong y matches instead (another graph's expected value, or none). Once with
the graphs in one pool (where one graph's scratch may be another's output) and once with a pool each; the same
graphs with executables of their own are the control.
"""
from __future__ import annotations

from typing import List

import torch

import graphrunner as gr

N = 4096


def run(order: List[int], graphs, xs, ys, sync: bool) -> str:
    want = {}
    for k in order:
        xs[k].normal_()
        ys[k].fill_(float("nan"))
        graphs[k].replay()
        want[k] = torch.tanh(xs[k]) * 2 + 1
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    wrong = []
    for k, expected in want.items():
        if torch.allclose(ys[k], expected, atol=1e-5, equal_nan=False):
            continue
        like = [f"graph {j}'s" for j, e in want.items() if j != k and torch.allclose(ys[k], e, atol=1e-5)]
        nan = int(ys[k].isnan().sum())
        wrong.append(f"y{k} wrong ({nan} NaN; matches {', '.join(like) or 'no other expected value'})")
    return "; ".join(wrong) or "all right"


def probe(separate_pools: bool) -> None:
    shared_pool = torch.cuda.graph_pool_handle()
    xs = [torch.randn(N, device="cuda") for _ in range(3)]
    graphs, ys = [], []
    for i, x in enumerate(xs):
        g = gr.Graph(keep_graph=True)
        pool = torch.cuda.graph_pool_handle() if separate_pools else shared_pool
        with g.capture(pool=pool, instantiate=i == 0):
            y = torch.tanh(x) * 2 + 1
        graphs.append(g)
        ys.append(y)
    print(f"pools of their own: {separate_pools}; shared:", [g.share(graphs[0]) for g in graphs[1:]])
    for order in ([0, 1, 2], [0, 1, 2, 2, 1, 0, 2], [2, 2], [1, 0]):
        for sync in (False, True):
            print(f"order {order}, sync between replays {sync}: {run(order, graphs, xs, ys, sync)}")
    # Control: three graphs of their own executables, same work.
    own = []
    for x in xs:
        g = gr.Graph()
        with g.capture(pool=torch.cuda.graph_pool_handle() if separate_pools else shared_pool):
            y = torch.tanh(x) * 2 + 1
        own.append((g, y))
    print("own executables, order [0, 1, 2, 2, 1, 0, 2]:",
          run([0, 1, 2, 2, 1, 0, 2], [g for g, _ in own], xs, [y for _, y in own], False))


def main() -> None:
    for separate_pools in (False, True):
        probe(separate_pools)


if __name__ == "__main__":
    main()
