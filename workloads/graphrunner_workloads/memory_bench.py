"""`python -m graphrunner_workloads.memory_bench`: every byte the decoder's graphs take (#35), on the 8- and
32-layer presets, on speculative decoding's verify + draft runners, and on the ragged and piecewise families.

Per preset, as an engine runs it: the model (weights and its full paged KV cache), one eager step (the engine's
profiling pass), then `gr.dry_run` over a stand-in that shares the weights and holds 4 pages of cache, then the
real capture, measured the same way (the report's driver_bytes: the driver's free memory across capture_all,
torch's cache emptied on both sides), then close(), and the driver's free memory against before the capture.
On the 8-layer preset a capture within a budget follows: the plan's bytes for the sizes up to 64, and what
that capture measured.

The families (ragged_bench's 8-layer decoder: hidden 1024, 8 heads of 128, bf16, pages of 256, --requests
requests of 512 positions), each as an engine captures it, the uniform decode runner and the ragged runner in one
pool through gr.capture_all:
- ragged: ragged.RaggedDecoder (--ragged-attention), sizes counting tokens (--ragged-sizes, ragged_bench's);
- piecewise: piecewise.PiecewiseRaggedDecoder (--piecewise-attention, default "varlen": attention a break op
  taking the lengths on the host, so every size is a graph per layer boundary), the same sizes.
Their eager steps (the profiling pass) are a ragged step at the largest size and a decode step.

Each preset runs in a process of its own: the driver keeps the memory of destroyed executables for the
process's later graphs (seen on the H200 with driver 580), so the executables show only in a process's first
capture of a preset, here the dry run's, and the real capture after it reads 0 for them.

Keys (merged into bench-<gpu>.json in --out; run it after the main bench, which rewrites that file):
graph_exec_mib_L8/L32/ragged/piecewise (the executables' bytes the dry run's report counts),
graph_exec_driver_mib_L8/L32/ragged/piecewise (the driver's figure: that capture's fall in free memory less the
growth of torch's reserved memory, the executables and whatever else left outside torch's allocator),
graph_exec_error_L8/L32/ragged/piecewise (between the two: the issue's target compares the executables alone),
graph_first_use_mib_L8/... (the report's first-use bytes: what the capture took outside torch's allocator beyond the
executables, Note [first-use bytes] in graphrunner/capture.py), graph_outside_error_L8/... (executables and first use
together against the driver's figure), capture_report_error_L8/... (every byte the real capture's report counts,
its other bytes included, capture_other_mib_L8/..., against the driver's fall across it: the other bytes are the
rest of torch's growth, so this checks what the report counts outside torch's allocator),
dry_run_error_L8/L32/spec/ragged/piecewise (|predicted - real| / real), close_leftover_mib (the most the real
capture's close() left, over every preset), and budget_* for the budgeted capture. Writes memory-<gpu>.txt too,
with the pool report (per size and runner, totals per runner and for the pool) of each family's real capture and
dry run.
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
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import graphrunner as gr
from graphrunner_workloads.bench import add_output_arguments, gpu_missing, gpu_tag, reported_lines, target_lines
from graphrunner_workloads.decoder import Decoder, DecoderConfig, decode_inputs, random_decode_inputs
from graphrunner_workloads.piecewise import PiecewiseRaggedDecoder
from graphrunner_workloads.ragged import (ATTENTION, SPLIT, RaggedDecoder, decode_runner, page_size_for,
                                          ragged_runner, random_decode_step, random_ragged_step)
from graphrunner_workloads.spec_decode import SpecConfig, make_models, make_runners

MiB = 1024 * 1024
STAND_IN_PAGES = 4
FAMILIES = ("ragged", "piecewise")
FAMILY_LAYERS = 8
FAMILY_CACHE_LEN = 512  # positions per request (ragged_bench's --cache-len)
PIECEWISE_BREAKS = ("varlen", "loop", "noop")  # piecewise.PIECEWISE_ATTENTION less "packed", which never breaks
TARGETS = [("dry_run_error_L8", "<=", 0.02), ("dry_run_error_L32", "<=", 0.02), ("dry_run_error_spec", "<=", 0.02),
           ("dry_run_error_ragged", "<=", 0.02), ("dry_run_error_piecewise", "<=", 0.02),
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


def capture_keys(tag: str, plan: gr.CapturePlan, real: gr.PoolReport, leftover: int) -> Dict[str, float]:
    """The keys of one preset's dry run (`plan`) against its real capture (`real`, and what its close() left).

    Args:
        tag: the preset ("L8", "ragged", ...), the keys' suffix.
        plan: the dry run's plan, the process's first capture of the preset.
        real: the real capture's pool report, after the dry run.
        leftover: what the real capture's close() left (the driver's free memory against before it).
    """
    # The executables' memory, from the dry run: the driver keeps destroyed executables' memory for the process's
    # later graphs, so the real capture after it reads 0 for them (capture_exec_mib) and the process's first
    # capture of the preset (each preset runs in a process of its own) is where they show.
    dry = plan.pool
    return {
        f"graph_exec_mib_{tag}": dry.exec_bytes / MiB,
        f"graph_exec_driver_mib_{tag}": dry.outside_bytes / MiB,
        f"graph_exec_error_{tag}": abs(dry.exec_bytes - dry.outside_bytes) / max(dry.outside_bytes, 1),
        f"graph_first_use_mib_{tag}": dry.first_use_bytes / MiB,
        # every byte outside torch's allocator the report names, executables and first use, against the driver's
        f"graph_outside_error_{tag}": abs(dry.exec_bytes + dry.first_use_bytes - dry.outside_bytes) /
        max(dry.outside_bytes, 1),
        f"capture_exec_mib_{tag}": real.exec_bytes / MiB,
        # the driver's figure as the issue words it: the whole fall less pool, workspaces and static buffers (the
        # report's other bytes are in it)
        f"graph_exec_rest_mib_{tag}": (real.driver_bytes - real.pool_bytes - real.workspace_bytes -
                                       real.static_bytes) / MiB,
        f"capture_mib_{tag}": real.driver_bytes / MiB,
        # every byte the real capture's report counts against the driver's fall across it; its part inside torch's
        # allocator matches by construction (Note [other bytes]), so this checks the part outside it
        f"capture_report_error_{tag}": abs(real.bytes - real.driver_bytes) / max(real.driver_bytes, 1),
        f"capture_other_mib_{tag}": real.other_bytes / MiB,
        f"capture_pool_mib_{tag}": real.pool_bytes / MiB,
        f"capture_workspace_mib_{tag}": real.workspace_bytes / MiB,
        f"dry_run_mib_{tag}": plan.bytes / MiB,
        f"dry_run_error_{tag}": abs(plan.bytes - real.driver_bytes) / max(real.driver_bytes, 1),
        f"dry_run_leftover_mib_{tag}": plan.leftover_bytes / MiB,
        f"close_leftover_mib_{tag}": leftover / MiB}


def decoder_keys(cfg: DecoderConfig, tag: str, budget_limit: int = 0) -> Tuple[Dict[str, float], List[str]]:
    model = Decoder(cfg)
    with torch.no_grad():  # the engine's profiling pass: first-use costs (kernels, handles) paid here
        model(**random_decode_inputs(cfg, cfg.max_batch_size, torch.Generator(device="cuda").manual_seed(0)))
    small = stand_in(model)
    plan = gr.dry_run(lambda: gr.GraphRunner(small, decode_inputs(cfg), max_batch_size=cfg.max_batch_size),
                      ladder=budget_limit > 0)
    real, leftover = measured(lambda: [gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size)])
    res = capture_keys(tag, plan, real, leftover)
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


def family_config(requests: int, attention: str) -> DecoderConfig:
    """ragged_bench's 8-layer preset: bench.py's decoder shape (hidden 1024, 8 heads of 128, bf16), pages of
    page_size_for(attention), and room for `requests` requests of 512 positions.

    Args:
        requests: the most requests of a step (the decode runner's largest batch, the ragged runner's R).
        attention: the family's attention, which sets the page size.
    """
    return DecoderConfig(layers=FAMILY_LAYERS, cache_len=FAMILY_CACHE_LEN, page_size=page_size_for(attention),
                         max_batch_size=requests)


def family_model(family: str, decoder: Decoder, attention: str) -> RaggedDecoder:
    """The family's step over `decoder`'s weights and cache.

    Args:
        family: "ragged" (a RaggedDecoder) or "piecewise" (a PiecewiseRaggedDecoder).
        decoder: the paged Decoder (or its stand-in).
        attention: the step's attention (ragged.ATTENTION, or for "piecewise" PIECEWISE_BREAKS).
    """
    if family == "ragged":
        return RaggedDecoder(decoder, attention=attention)
    if family == "piecewise":
        return PiecewiseRaggedDecoder(decoder, attention)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def family_runners(model: RaggedDecoder, sizes: Sequence[int], requests: int) -> List[gr.GraphRunner]:
    """The family as an engine captures it, in one pool (gr.capture_all): the uniform decode runner ("decode",
    batches up to `requests`) and the ragged runner ("mixed", sizes of `sizes` tokens, each holding up to
    `requests` requests).

    Args:
        model: the family's step (family_model).
        sizes: the ragged runner's token counts.
        requests: the most requests of a step.
    """
    return [decode_runner(model, requests), ragged_runner(model, sizes, requests)]


def profile_steps(model: RaggedDecoder, sizes: Sequence[int], requests: int, gen: torch.Generator) -> None:
    """The engine's profiling pass, eagerly: a ragged step of the largest size's tokens and a decode step of
    `requests` requests, so first-use costs (kernels, handles) fall outside every measurement.

    Args:
        model: the family's step (family_model).
        sizes: the ragged runner's token counts.
        requests: the most requests of a step (at most model.cfg.max_batch_size).
        gen: draws the steps; its device is where they go (the model's).
    """
    cfg = model.cfg
    step = random_ragged_step(cfg, max(sizes), min(max(sizes), requests), gen)
    with torch.no_grad():
        model(**dict(step, **{SPLIT: step[SPLIT].to(step["input_ids"].device)}))
        model.decode(**random_decode_step(cfg, requests, gen))


def family_keys(args: argparse.Namespace, family: str) -> Tuple[Dict[str, float], List[str]]:
    """A family's dry run over a stand-in against its real capture (decode + ragged runner in one pool).

    Args:
        args: the parsed command line (--requests, --ragged-sizes, the family's attention).
        family: "ragged" or "piecewise".
    """
    sizes = args.ragged_sizes
    attention = args.ragged_attention if family == "ragged" else args.piecewise_attention
    cfg = family_config(args.requests, attention)
    decoder = Decoder(cfg)
    model = family_model(family, decoder, attention)
    profile_steps(model, sizes, args.requests, torch.Generator(device="cuda").manual_seed(0))
    small = family_model(family, stand_in(decoder), attention)
    plan = gr.dry_run(lambda: family_runners(small, sizes, args.requests), ladder=False)
    real, leftover = measured(lambda: family_runners(model, sizes, args.requests))
    res = capture_keys(family, plan, real, leftover)
    res[f"graphs_{family}"] = real.graphs
    lines = [f"{family} ({attention}): {real.summary()}", f"{family}: {plan.summary()}",
             f"{family}: the real capture's pool report:", *indented(str(real)),
             f"{family}: the dry run's pool report (the process's first capture of the family, where the "
             "executables show):", *indented(str(plan.pool))]
    return res, lines


def indented(text: str) -> List[str]:
    """`text`'s lines, indented for the report."""
    return ["  " + line for line in text.splitlines()]


def preset(args: argparse.Namespace, name: str) -> Tuple[Dict[str, float], List[str]]:
    """One preset ("L8", "L32", "spec", "ragged", "piecewise"), in this process."""
    # graphrunner's own first-use costs (its kernels load lazily) paid before any measurement (one graph, whose
    # executable's chunk the preset's first graphs then share)
    first = gr.GraphRunner(lambda x: x * 2, {"x": gr.StaticInput((), torch.float32)}, capture_sizes=[1])
    first.capture()
    first.close()
    if name == "spec":
        return spec_keys()
    if name in FAMILIES:
        return family_keys(args, name)
    layers = int(name[1:])
    cfg = DecoderConfig(layers=layers, attention=args.attn, page_size=16, max_batch_size=args.max_batch_size)
    return decoder_keys(cfg, name, budget_limit=64 if layers == 8 else 0)


def presets(args: argparse.Namespace) -> List[str]:
    """The presets the command line asks for, in the order they run."""
    return ([f"L{layers}" for layers in args.layers] + (["spec"] if args.spec else []) +
            [family for family in FAMILIES if getattr(args, family)])


def preset_command(args: argparse.Namespace, name: str, out: Path) -> List[str]:
    """The command that runs preset `name` in a process of its own, writing its keys and lines to `out`.

    Args:
        args: the parsed command line, whose settings the preset's process gets.
        name: the preset.
        out: the JSON file it writes.
    """
    # -P as this process was started (make bench imports the installed packages, not the checkout)
    safe = ["-P"] if getattr(sys.flags, "safe_path", False) else []
    return [sys.executable, *safe, "-m", "graphrunner_workloads.memory_bench", "--preset", name, "--preset-out",
            str(out), "--attn", args.attn, "--max-batch-size", str(args.max_batch_size),
            "--requests", str(args.requests), "--ragged-sizes", ",".join(str(t) for t in args.ragged_sizes),
            "--ragged-attention", args.ragged_attention, "--piecewise-attention", args.piecewise_attention]


def run(args: argparse.Namespace) -> Tuple[Dict[str, float], List[str]]:
    """Every preset, each in a process of its own (the driver keeps executables' memory for a process's later
    graphs, so only a process's first capture of a preset shows it)."""
    res: Dict[str, float] = {"memory_gpu": torch.cuda.get_device_name()}
    lines: List[str] = []
    for name in presets(args):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "preset.json"
            done = subprocess.run(preset_command(args, name, out))
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


def token_counts(text: str) -> List[int]:
    """--ragged-sizes: comma-separated token counts, each at least 1; returned ascending, without repeats."""
    try:
        sizes = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"token counts must be comma-separated ints, e.g. 16,64,256, got {text!r}")
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"token counts must be at least 1, got {text!r}")
    return sizes


def positive(text: str) -> int:
    """A positive int argument."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The command line, checked (argparse exits with status 2 naming a bad argument).

    Args:
        argv: the arguments, without the program name.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="*", default=[8, 32],
                   help="decoder presets (layers); none (--layers alone) leaves them out")
    p.add_argument("--attn", default="decode", help="the decoder's attention (a paged one)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--no-spec", dest="spec", action="store_false", help="leave verify + draft out")
    p.add_argument("--no-ragged", dest="ragged", action="store_false", help="leave the ragged family out")
    p.add_argument("--no-piecewise", dest="piecewise", action="store_false", help="leave the piecewise family out")
    p.add_argument("--requests", type=positive, default=8,
                   help="the families' most requests a step: the decode runner's largest batch, the ragged runner's R")
    p.add_argument("--ragged-sizes", type=token_counts, default=token_counts("16,64,256,1024"),
                   help="the families' ragged runner's token counts, comma-separated (ragged_bench's)")
    p.add_argument("--ragged-attention", choices=ATTENTION, default="decode", help="the ragged family's attention")
    p.add_argument("--piecewise-attention", choices=PIECEWISE_BREAKS, default="varlen",
                   help="the piecewise family's attention: varlen (a break op taking the host split), loop, or noop "
                   "(a graph-safe attention and a break that does nothing)")
    p.add_argument("--preset", help=argparse.SUPPRESS)  # one preset in this process (run() starts these)
    p.add_argument("--preset-out", type=Path, help=argparse.SUPPRESS)
    add_output_arguments(p)
    args = p.parse_args(argv)
    if max(args.ragged_sizes) > args.requests * FAMILY_CACHE_LEN:
        p.error(f"argument --ragged-sizes: the largest, {max(args.ragged_sizes)} tokens, does not fit --requests "
                f"{args.requests} requests of {FAMILY_CACHE_LEN} positions")
    if args.preset is not None:
        known = args.preset in ("spec", *FAMILIES) or (args.preset[:1] == "L" and args.preset[1:].isdigit())
        if not known or args.preset_out is None:
            p.error(f"--preset {args.preset!r}: a preset is L<layers>, spec, {', '.join(FAMILIES)}, and needs "
                    "--preset-out")
    return args


def main(argv: List[str] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if gpu_missing("graphrunner_workloads.memory_bench"):
        return 2
    if args.preset:
        res, lines = preset(args, args.preset)
        args.preset_out.write_text(json.dumps({"res": res, "lines": lines}))
        return 0
    res, lines = run(args)
    reported = [k for k in sorted(res) if k.startswith(("graph_exec_mib_", "graph_exec_driver_mib_",
                                                        "graph_first_use_mib_", "graph_outside_error_",
                                                        "capture_other_mib_", "capture_report_error_"))]
    report = "\n".join(lines + ["targets:"] + target_lines(res, TARGETS) + reported_lines(res, reported))
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
