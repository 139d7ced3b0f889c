"""`python -m graphrunner_workloads.memory_bench`: every byte the decoder's graphs take (#35), on the 8- and
32-layer presets and on speculative decoding's verify + draft runners.

Per preset, as an engine runs it: the model (weights and its full paged KV cache), one eager step (the engine's
profiling pass), then `gr.dry_run` over a stand-in that shares the weights and holds 4 pages of cache, then the
real capture, measured the same way (the report's driver_bytes: the driver's free memory across capture_all,
torch's cache emptied on both sides), then close(), and the driver's free memory against before the capture.
On the 8-layer preset a capture within a budget follows: the plan's bytes for the sizes up to 64, and what
that capture measured.

Each preset runs in a process of its own: the driver keeps the memory of destroyed executables for the
process's later graphs (seen on the H200 with driver 580), so the executables show only in a process's first
capture of a preset, here the dry run's, and the real capture after it reads 0 for them.

Keys (merged into bench-<gpu>.json in --out; run it after the main bench, which rewrites that file):
graph_exec_mib_L8/L32 (the executables' bytes the dry run's report counts), graph_exec_driver_mib_L8/L32 (the
driver's figure: that capture's fall in free memory less the growth of torch's reserved memory),
graph_exec_error_L8/L32 (between the two), dry_run_error_L8/L32/spec (|predicted - real| / real),
close_leftover_mib (the most the real capture's close() left), and budget_* for the budgeted capture. Writes
memory-<gpu>.txt too.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

import graphrunner as gr
from graphrunner_workloads.bench import add_output_arguments, gpu_missing, gpu_tag, target_lines
from graphrunner_workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs
from graphrunner_workloads.spec_decode import SpecConfig, make_models, make_runners

MiB = 1024 * 1024
STAND_IN_PAGES = 4
TARGETS = [("dry_run_error_L8", "<=", 0.02), ("dry_run_error_L32", "<=", 0.02), ("dry_run_error_spec", "<=", 0.02),
           ("graph_exec_error_L8", "<=", 0.05), ("graph_exec_error_L32", "<=", 0.05), ("close_leftover_mib", "<=", 2.0),
           ("budget_over_mib", "<=", 0.0)]


def stand_in(model: Decoder, pages: int = STAND_IN_PAGES) -> Decoder:
    """The model with the same weights (shared, not copied) and a paged KV cache of `pages` pages: what an engine
    hands gr.dry_run before it sizes its cache. Capture stages pad values, whose page table names page 0 only."""
    if not model.cfg.paged:
        raise ValueError("a stand-in needs a paged cache (page_size > 0): a contiguous one has a row per request")
    small = copy.copy(model)
    small._buffers = dict(model._buffers)  # its own buffers; parameters and layers stay shared
    for name in ("k_cache", "v_cache"):
        full = getattr(model, name)
        small.register_buffer(name, torch.zeros((full.shape[0], pages, *full.shape[2:]), dtype=full.dtype,
                                                device=full.device), persistent=False)
    return small


def settled_free() -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def measured(build: Callable[[], List[gr.GraphRunner]]) -> Tuple[gr.PoolReport, int]:
    """The real capture's pool report, and what close() left (the driver's free memory against before)."""
    before = settled_free()
    runners = build()
    reports = gr.capture_all(*runners)
    for r in runners:
        r.close()
    del runners
    return gr.PoolReport(reports), before - settled_free()


def decoder_keys(cfg: DecoderConfig, tag: str, budget_limit: int = 0) -> Tuple[Dict[str, float], List[str]]:
    res: Dict[str, float] = {}
    model = Decoder(cfg)
    with torch.no_grad():  # the engine's profiling pass: first-use costs (kernels, handles) paid here
        model(**random_decode_inputs(cfg, cfg.max_batch_size, torch.Generator(device="cuda").manual_seed(0)))
    small = stand_in(model)
    plan = gr.dry_run(lambda: gr.GraphRunner(small, decode_inputs(cfg), max_batch_size=cfg.max_batch_size),
                      ladder=budget_limit > 0)
    real, leftover = measured(lambda: [gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size)])
    # The executables' memory, from the dry run: the driver keeps destroyed executables' memory for the process's
    # later graphs, so the real capture after it reads 0 for them (capture_exec_mib) and the process's first
    # capture of the preset (each preset runs in a process of its own) is where they show.
    dry = plan.pool
    res[f"graph_exec_mib_{tag}"] = dry.exec_bytes / MiB
    res[f"graph_exec_driver_mib_{tag}"] = dry.outside_bytes / MiB
    res[f"graph_exec_error_{tag}"] = abs(dry.exec_bytes - dry.outside_bytes) / max(dry.outside_bytes, 1)
    res[f"capture_exec_mib_{tag}"] = real.exec_bytes / MiB
    # the driver's figure as the issue words it: the whole fall less pool, workspaces and static buffers
    res[f"graph_exec_rest_mib_{tag}"] = (real.driver_bytes - real.pool_bytes - real.workspace_bytes -
                                         real.static_bytes) / MiB
    res[f"capture_mib_{tag}"] = real.driver_bytes / MiB
    res[f"capture_pool_mib_{tag}"] = real.pool_bytes / MiB
    res[f"capture_workspace_mib_{tag}"] = real.workspace_bytes / MiB
    res[f"dry_run_mib_{tag}"] = plan.bytes / MiB
    res[f"dry_run_error_{tag}"] = abs(plan.bytes - real.driver_bytes) / real.driver_bytes
    res[f"dry_run_leftover_mib_{tag}"] = plan.leftover_bytes / MiB
    res[f"close_leftover_mib_{tag}"] = leftover / MiB
    lines = [f"{tag}: {real.summary()}", f"{tag}: {plan.summary()}"]
    if budget_limit:
        budget = plan.bytes_for(budget_limit)
        runner = gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size)
        before = settled_free()
        got = gr.capture_all(runner, max_bytes=budget, plan=plan)[0]
        res.update({"budget_mib": budget / MiB, "budget_kept_largest": runner.capture_sizes[-1],
                    "budget_dropped": len(got.dropped), "budget_capture_mib": got.driver_bytes / MiB,
                    "budget_over_mib": max(0, got.driver_bytes - budget) / MiB,
                    "budget_prediction_error": abs(got.driver_bytes - plan.bytes_for(runner.capture_sizes[-1]))
                    / got.driver_bytes})
        runner.close()
        del runner
        res["budget_close_leftover_mib"] = (before - settled_free()) / MiB
        lines.append(f"{tag} budget: {got.summary()}")
    del model, small
    return res, lines


def spec_keys() -> Tuple[Dict[str, float], List[str]]:
    """Verify + draft captured together, on the 8-layer preset's decoder (paged, decode attention)."""
    cfg = SpecConfig(target=DecoderConfig(layers=8, cache_len=256, page_size=16, max_batch_size=32,
                                          attention="decode"), draft_layers=1, steps=3)
    target, draft = make_models(cfg)
    with torch.no_grad():
        gen = torch.Generator(device="cuda").manual_seed(0)
        for model in (target, draft):
            model(**random_decode_inputs(cfg.target, cfg.target.max_batch_size, gen))
    small_target, small_draft = stand_in(target), stand_in(draft)
    plan = gr.dry_run(lambda: list(make_runners(cfg, small_target, small_draft)), ladder=False)
    real, leftover = measured(lambda: list(make_runners(cfg, target, draft)))
    res = {"dry_run_error_spec": abs(plan.bytes - real.driver_bytes) / real.driver_bytes,
           "dry_run_mib_spec": plan.bytes / MiB, "capture_mib_spec": real.driver_bytes / MiB,
           "graph_exec_mib_spec": real.exec_bytes / MiB, "close_leftover_mib_spec": leftover / MiB}
    return res, [f"spec: {real.summary()}", f"spec: {plan.summary()}"]


def preset(args: argparse.Namespace, name: str) -> Tuple[Dict[str, float], List[str]]:
    """One preset ("L8", "L32", "spec"), in this process."""
    # graphrunner's own first-use costs (its kernels load lazily) paid before any measurement (one graph, whose
    # executable's chunk the preset's first graphs then share)
    first = gr.GraphRunner(lambda x: x * 2, {"x": gr.StaticInput((), torch.float32)}, capture_sizes=[1])
    first.capture()
    first.close()
    if name == "spec":
        return spec_keys()
    layers = int(name[1:])
    cfg = DecoderConfig(layers=layers, attention=args.attn, page_size=16, max_batch_size=args.max_batch_size)
    return decoder_keys(cfg, name, budget_limit=64 if layers == 8 else 0)


def run(args: argparse.Namespace) -> Tuple[Dict[str, float], List[str]]:
    """Every preset, each in a process of its own (the driver keeps executables' memory for a process's later
    graphs, so only a process's first capture of a preset shows it)."""
    res: Dict[str, float] = {"memory_gpu": torch.cuda.get_device_name()}
    lines: List[str] = []
    for name in [f"L{layers}" for layers in args.layers] + (["spec"] if args.spec else []):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "preset.json"
            # -P as this process was started (make bench imports the installed packages, not the checkout)
            safe = ["-P"] if getattr(sys.flags, "safe_path", False) else []
            cmd = [sys.executable, *safe, "-m", "graphrunner_workloads.memory_bench", "--preset", name, "--preset-out",
                   str(out), "--attn", args.attn, "--max-batch-size", str(args.max_batch_size)]
            done = subprocess.run(cmd)
            if done.returncode != 0:
                lines.append(f"{name}: failed (exit status {done.returncode})")
                continue
            got = json.loads(out.read_text())
        res.update(got["res"])
        lines += got["lines"]
    leftovers = [v for k, v in res.items() if k.startswith("close_leftover_mib_")]
    if leftovers:
        res["close_leftover_mib"] = max(leftovers)
    return res, lines


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 32], help="decoder presets (layers)")
    p.add_argument("--attn", default="decode", help="the decoder's attention (a paged one)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--no-spec", dest="spec", action="store_false", help="leave verify + draft out")
    p.add_argument("--preset", help=argparse.SUPPRESS)  # one preset in this process (run() starts these)
    p.add_argument("--preset-out", type=Path, help=argparse.SUPPRESS)
    add_output_arguments(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if gpu_missing("graphrunner_workloads.memory_bench"):
        return 2
    if args.preset:
        res, lines = preset(args, args.preset)
        args.preset_out.write_text(json.dumps({"res": res, "lines": lines}))
        return 0
    res, lines = run(args)
    report = "\n".join(lines + ["targets:"] + target_lines(res, TARGETS))
    print(report)
    name = args.name or gpu_tag()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory-{name}.txt").write_text(report + "\n")
    path: Path = args.out / f"bench-{name}.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(res)
    path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
