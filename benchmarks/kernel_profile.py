"""Where a decoder step's GPU time goes: the kernels of graphrunner's replays at batch 1 and 64, from
torch.profiler (CUPTI), for the 8-layer preset and the 2-layer draft preset. On the GPU machine, after the build:
    PYTHONPATH=. python3 benchmarks/kernel_profile.py [attention]      (default: decode)
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import graphrunner as gr
from graphrunner_workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs

STEPS = 20
TOP = 10


def main() -> None:
    attention = sys.argv[1] if len(sys.argv) > 1 else "decode"
    for layers, cache_len in ((8, 512), (2, 256)):
        cfg = DecoderConfig(layers=layers, cache_len=cache_len, max_batch_size=64, attention=attention)
        with gr.GraphRunner(Decoder(cfg), decode_inputs(cfg), capture_sizes=[1, 64]) as runner:
            runner.capture()
            for batch in (1, 64):
                step = random_decode_inputs(cfg, batch)
                for _ in range(STEPS):
                    runner(**step)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(STEPS):
                        runner(**step)
                    torch.cuda.synchronize()
                kernels = prof.key_averages()
                total = sum(k.device_time_total for k in kernels) / STEPS
                print(f"{attention}, layers {layers} cache {cache_len} batch {batch}: kernel us per step {total:.1f}")
                for k in sorted(kernels, key=lambda k: -k.device_time_total)[:TOP]:
                    print(f"   {k.device_time_total / STEPS:8.1f} us  x{k.count // STEPS:<3} {k.key[:90]}")


if __name__ == "__main__":
    main()
