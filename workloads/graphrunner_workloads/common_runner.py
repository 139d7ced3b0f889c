"""The common runner: what serving engines write by hand, kept as they write it, for the benchmarks to compare against.

One torch.cuda.CUDAGraph per batch size, all in one pool, two warm-ups per size before its capture, captured
on a torch.cuda.Stream(); each step copies the inputs into static buffers with copy_ and replays the smallest
graph that fits. An input or output may have several rows per request (a verify step's tokens): the example
inputs, at the largest size, say how many, and each is staged and sliced in proportion.
"""
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch


class CommonRunner:
    """Args:
        fn: the step function, fn(**inputs).
        example_inputs: one step's inputs at the largest capture size (their shapes and dtypes size the static
            buffers; an input with k times that many rows has k rows per request).
        capture_sizes: the sizes to capture.
        descending: capture largest first (True) or smallest first.
        pool: the pool to capture into (shared by several runners); None makes one.
        zero_padding: zero the padding rows of every input each step (engines do, for metadata such as page
            tables, so padding rows never index real pages); off, they keep the last step's values.
    """

    def __init__(self, fn: Callable[..., Any], example_inputs: Dict[str, torch.Tensor], capture_sizes: Sequence[int],
                 descending: bool = True, pool: Optional[Tuple[int, int]] = None, zero_padding: bool = False) -> None:
        self.fn, self.sizes, self.zero_padding = fn, sorted(capture_sizes), zero_padding
        max_bs = self.sizes[-1]
        self.rows = {name: max(1, t.shape[0] // max_bs) for name, t in example_inputs.items()}
        self.static = {name: torch.zeros((max_bs * self.rows[name], *t.shape[1:]), dtype=t.dtype, device=t.device)
                       for name, t in example_inputs.items()}
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, Any] = {}
        self.stream = torch.cuda.Stream()
        with torch.no_grad():
            self._capture(descending)
        self.size_for = {b: next(s for s in self.sizes if s >= b) for b in range(1, max_bs + 1)}

    def _capture(self, descending: bool) -> None:
        for size in sorted(self.sizes, reverse=descending):
            views = {name: buf[: size * self.rows[name]] for name, buf in self.static.items()}
            with torch.cuda.stream(self.stream):
                for _ in range(2):
                    self.fn(**views)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(), whose gc.collect() per size would slow this
            # runner down for reasons unrelated to graphs.
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool)
                self.outputs[size] = self.fn(**views)
                graph.capture_end()
            self.graphs[size] = graph

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> Any:
        batch = min(t.shape[0] // self.rows[name] for name, t in inputs.items())
        size = self.size_for[batch]
        for name, t in inputs.items():
            self.static[name][: t.shape[0]].copy_(t)
            if self.zero_padding:
                self.static[name][t.shape[0]: size * self.rows[name]].zero_()
        self.graphs[size].replay()
        out = self.outputs[size]
        if isinstance(out, dict):
            return {k: v[: batch * (v.shape[0] // size)] for k, v in out.items()}
        return out[: batch * (out.shape[0] // size)]

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.reset()
        self.graphs, self.outputs, self.static = {}, {}, {}
