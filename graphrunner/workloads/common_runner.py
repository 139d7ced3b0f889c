"""The common runner: what serving engines write by hand, kept plain as the benchmark's baseline.

One torch.cuda.CUDAGraph per batch size, all in one pool, two warm-ups per size before its capture;
each step copies the inputs into static buffers with copy_ and replays the smallest graph that fits.
"""
import torch


class CommonRunner:
    def __init__(self, fn, example_inputs, capture_sizes, descending=True):
        self.fn, self.sizes = fn, sorted(capture_sizes)
        max_bs = self.sizes[-1]
        self.static = {name: torch.zeros((max_bs, *t.shape[1:]), dtype=t.dtype, device=t.device)
                       for name, t in example_inputs.items()}
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs, self.outputs = {}, {}
        stream = torch.cuda.Stream()
        with torch.no_grad():
            self._capture(fn, stream, descending)
        self.size_for = {b: next(s for s in self.sizes if s >= b) for b in range(1, max_bs + 1)}

    def _capture(self, fn, stream, descending):
        for size in sorted(self.sizes, reverse=descending):
            views = {name: buf[:size] for name, buf in self.static.items()}
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(**views)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # capture_begin/end rather than torch.cuda.graph(), whose gc.collect() per size would slow this
            # baseline down for reasons unrelated to graphs.
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self.pool)
                self.outputs[size] = fn(**views)
                graph.capture_end()
            self.graphs[size] = graph

    @torch.no_grad()
    def __call__(self, **inputs):
        batch = next(iter(inputs.values())).shape[0]
        size = self.size_for[batch]
        for name, t in inputs.items():
            self.static[name][:batch].copy_(t)
        self.graphs[size].replay()
        return self.outputs[size][:batch]

    def close(self):
        for graph in self.graphs.values():
            graph.reset()
        self.graphs, self.outputs, self.static = {}, {}, {}
