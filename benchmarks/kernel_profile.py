import torch, graphrunner as gr
from torch.profiler import profile, ProfilerActivity
from graphrunner.workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs
for layers, cache in ((8, 512), (2, 256)):
    cfg = DecoderConfig(layers=layers, cache_len=cache, max_batch_size=64)
    m = Decoder(cfg)
    r = gr.GraphRunner(m, decode_inputs(cfg), capture_sizes=[1, 64]); r.capture()
    for b in (1, 64):
        s = random_decode_inputs(cfg, b)
        for _ in range(20): r(**s)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(20): r(**s)
            torch.cuda.synchronize()
        ev = [e for e in p.key_averages()]
        tot = sum(e.device_time_total for e in ev) / 20
        print(f"layers {layers} cache {cache} batch {b}: kernel us per step {tot:.1f}")
        for e in sorted(ev, key=lambda e: -e.device_time_total)[:6]:
            print(f"   {e.device_time_total/20:8.1f} us  x{e.count//20:<3} {e.key[:90]}")
    r.close()
