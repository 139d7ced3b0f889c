"""The common runner: what serving engines write by hand, kept plain as the benchmark's baseline.

One torch.cuda.CUDAGraph per batch size, all in one pool, two warm-ups per size before its capture, captured
on a torch.cuda.Stream(); each step copies the inputs into static buffers with copy_ and replays the smallest
graph that fits.
"""
from typing import Any, Callable, Dict, Sequence

import torch


class CommonRunner:
    """Args:
        fn: the step function, fn(**inputs).
        example_inputs: one step's inputs at the largest size (their shapes and dtypes size the static buffers).
        capture_sizes: the sizes to capture.
        descending: capture largest first (True) or smallest first.
    """

    def __init__(self, fn: Callable[..., Any], example_inputs: Dict[str, torch.Tensor], capture_sizes: Sequence[int],
                 descending: bool = True) -> None:
        self.fn, self.sizes = fn, sorted(capture_sizes)
        max_bs = self.sizes[-1]
        self.static = {name: torch.zeros((max_bs, *t.shape[1:]), dtype=t.dtype, device=t.device)
                       for name, t in example_inputs.items()}
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: Dict[int, Any] = {}
        self.stream = torch.cuda.Stream()
        with torch.no_grad():
            self._capture(descending)
        self.size_for = {b: next(s for s in self.sizes if s >= b) for b in range(1, max_bs + 1)}

    def _capture(self, descending: bool) -> None:
        for size in sorted(self.sizes, reverse=descending):
            views = {name: buf[:size] for name, buf in self.static.items()}
            with torch.cuda.stream(self.stream):
                for _ in range(2):
                    self.fn(**views)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(), whose gc.collect() per size would slow this
            # baseline down for reasons unrelated to graphs.
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool)
                self.outputs[size] = self.fn(**views)
                graph.capture_end()
            self.graphs[size] = graph

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> Any:
        batch = next(iter(inputs.values())).shape[0]
        size = self.size_for[batch]
        for name, t in inputs.items():
            self.static[name][:batch].copy_(t)
        self.graphs[size].replay()
        return self.outputs[size][:batch]

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.reset()
        self.graphs, self.outputs, self.static = {}, {}, {}
