"""Nothing leaks: 100 cycles of build, capture 8 sizes, run, close."""
import resource

import torch

import graphrunner as gr
from conftest import gpu, segments, segments_since, settle

INPUTS = {"x": gr.StaticInput((32,), torch.float32), "ids": gr.StaticInput((), torch.long, high=10)}


W = None


def step(x, ids):
    """A matmul too, so every cycle takes and gives back a cuBLAS workspace."""
    return {"y": torch.relu(x * 2 + ids[:, None]) @ W, "s": x.sum(1)}


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@gpu
def test_hundred_cycles_give_everything_back(fresh_memory):
    global W
    W = torch.randn(32, 32, device="cuda")

    def cycle():
        with gr.GraphRunner(step, INPUTS, max_batch_size=64, capture_sizes=[1, 2, 4, 8, 16, 32, 48, 64], keep=[W]) as r:
            r.capture()
            x, ids = torch.randn(5, 32, device="cuda"), torch.randint(0, 10, (5,), device="cuda")
            torch.testing.assert_close(r(x=x, ids=ids)["y"], step(x, ids)["y"])
            del x, ids

    cycle()  # first-run costs (kernels, handles, allocator bookkeeping) before the baseline
    settle()
    start, before, rss = torch.cuda.memory_reserved(), segments(), rss_mib()
    for _ in range(100):
        cycle()
    settle()
    assert torch.cuda.memory_reserved() == start, segments_since(before)
    assert rss_mib() - rss < 50, f"host RSS grew {rss_mib() - rss:.1f} MiB over 100 cycles"
