"""Probe: which pool blocks a piecewise capture leaves allocated, and what holds them.

    python benchmarks/pool_probe.py

1. Two graphs into one pool: a tensor allocated in the first capture and freed during the second; is its block
   still allocated after the second capture (the allocator's view), with no Python reference left?
2. The same with an eager kernel reading the tensor on the capture stream between the captures (what a break
   op does).
3. A piecewise ragged runner (8 layers, varlen attention breaks) at one size: the pool's allocated blocks after
   capture, before and after gc.collect(), and for each, the Python objects whose tensors point into it.
"""
from __future__ import annotations

import gc
import warnings

import torch

import graphrunner as gr
from graphrunner.pool import pool_blocks
from graphrunner_workloads.decoder import Decoder
from graphrunner_workloads.piecewise import PiecewiseRaggedDecoder
from graphrunner_workloads.ragged import ragged_runner
from graphrunner_workloads.ragged_bench import preset

MiB = 1 << 20


def allocated(pool, device) -> list:
    return [b for b in pool_blocks(pool, device) if b["state"] == "active_allocated"]


def two_captures(eager_between: bool) -> str:
    device = torch.device("cuda")
    pool = torch.cuda.graph_pool_handle()
    stream = gr.capture_stream(device)
    g1, g2 = gr.Graph(), gr.Graph()
    with g1.capture(pool=pool):
        t = torch.ones(4 * MiB // 4, device=device) * 3
    address = t.data_ptr()
    if eager_between:
        with torch.cuda.stream(stream):
            s = t.sum()  # an eager kernel on the capture stream, outside capture
        del s
    with g2.capture(pool=pool):
        u = t + 1
        del t
    held = [b for b in allocated(pool, device) if b["address"] <= address < b["address"] + b["size"]]
    gc.collect()
    after_gc = [b for b in allocated(pool, device) if b["address"] <= address < b["address"] + b["size"]]
    del u
    return f"t's block allocated after the second capture: {bool(held)}; after gc.collect(): {bool(after_gc)}"


def holders(address: int, size: int) -> list:
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            try:
                ptr = obj.untyped_storage().data_ptr()
            except Exception:
                continue
            if address <= ptr < address + size:
                refs = [type(r).__name__ for r in gc.get_referrers(obj) if r is not found]
                found.append(f"{tuple(obj.shape)} held by {refs[:4]}")
    return found


def piecewise_runner() -> None:
    class Args:
        cache_len, requests = 512, 8

    cfg = preset(8, Args)
    decoder = Decoder(cfg)
    runner = ragged_runner(PiecewiseRaggedDecoder(decoder, "varlen"), [256], 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.capture()
    device = torch.device("cuda")
    pool = runner.record.pool
    blocks = allocated(pool, device)
    print(f"piecewise runner at 256 tokens: {len(caught)} capture warnings; {len(blocks)} allocated pool blocks, "
          f"{sum(b['size'] for b in blocks) / MiB:.1f} MiB")
    gc.collect()
    blocks = allocated(pool, device)
    print(f"after gc.collect(): {len(blocks)} allocated, {sum(b['size'] for b in blocks) / MiB:.1f} MiB")
    for b in blocks[:40]:
        print(f"  {b['size']:>9} bytes at 0x{b['address']:x}: {holders(b['address'], b['size']) or 'no tensor'}")
    runner.close()


def main() -> None:
    print("1. freed during a later capture:", two_captures(False))
    print("2. with an eager kernel between:", two_captures(True))
    piecewise_runner()


if __name__ == "__main__":
    main()
