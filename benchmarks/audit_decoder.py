"""Prints the capture report and runner.audit() of the built-in decoder (the example in README and docs/hazards.md).

    python -P benchmarks/audit_decoder.py
"""
import graphrunner as gr
from graphrunner_workloads.decoder import Decoder, DecoderConfig, decode_inputs

cfg = DecoderConfig()
runner = gr.GraphRunner(Decoder(cfg), decode_inputs(cfg), max_batch_size=cfg.max_batch_size)
print(runner.capture().summary())
print(runner.audit())
runner.close()
