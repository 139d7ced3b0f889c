"""Capture and replay the built-in decoder through GraphRunner, small enough to run under compute-sanitizer.

    compute-sanitizer --tool memcheck python -m graphrunner_workloads.sanitize
"""
import torch

import graphrunner as gr
from graphrunner_workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs

cfg = DecoderConfig(layers=2, hidden=256, heads=4, head_dim=64, intermediate=512, vocab=1000, cache_len=64,
                    max_batch_size=16)
model = Decoder(cfg)
with gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size, capture_sizes=[1, 4, 16]) as r:
    r.capture()
    for batch in (1, 3, 16, 2):
        step = random_decode_inputs(cfg, batch)
        with torch.no_grad():
            want = model(**step)
        err = ((r(**step).float() - want.float()).norm() / want.float().norm()).item()
        assert err < 2e-2, (batch, err)
print("sanitize_model: captured 3 sizes, 4 steps matched eager")
