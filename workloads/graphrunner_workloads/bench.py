"""`python -m graphrunner_workloads.bench` (`make bench`): every contender on the built-in decoder, in one process.

Per batch, the host waiting each step: eager; the common runner (torch.cuda.CUDAGraph per size, copy_ staging,
common_runner.py); bare replay of graphrunner's graph through Graph.replay(), of the common runner's graph through
torch.cuda.CUDAGraph.replay(), each after its runner staged the same step (untimed); graphrunner itself; and a
C++ loop of cudaGraphLaunch on the same graph that times the host side with no Python (the floor). Then the
random-walk traces of traces.py, pipelined and synchronised, for a draft-sized preset and the main one. Writes
bench-<gpu>.json, .txt and .png into --out (default: the current directory); ratios are taken side by side in
this one run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from tqdm import tqdm

import graphrunner as gr
from graphrunner_workloads._launch_floor import launch_floor_us
from graphrunner_workloads.common_runner import CommonRunner
from graphrunner_workloads.traces import round_ratios, run_traces
from graphrunner_workloads.decoder import (ATTENTION_BACKENDS, Decoder, DecoderConfig, decode_inputs,
                                           random_decode_inputs)
from graphrunner_workloads.memory import alias

BATCHES = [1, 3, 8, 17, 64, 200, 256]
DEFAULT_ATTENTION = "decode"  # results files of other backends are named with a suffix
MiB = 1024 * 1024


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DecoderConfig()
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--cache-len", type=int, default=d.cache_len)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--attn", choices=ATTENTION_BACKENDS, default=DEFAULT_ATTENTION,
                   help="the decoder's attention (default: decode, the kernel reading only each row's keys; "
                   "sdpa masks the whole cache)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks, one per GPU: run under "
                   "torchrun --nproc-per-node N -m graphrunner_workloads.bench --tp N")
    p.add_argument("--steps", type=int, default=300, help="timed steps per contender and batch")
    p.add_argument("--trace-steps", type=int, default=2000,
                   help="steps of each random-walk trace of the draft preset (the main preset runs half)")
    p.add_argument("--draft-layers", type=int, default=2, help="layers of the draft-sized preset's decoder")
    p.add_argument("--draft-cache-len", type=int, default=256)
    p.add_argument("--draft-max-batch-size", type=int, default=128)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the torch.compile contenders (compile_ro, run_compiled)")
    add_output_arguments(p)
    return p.parse_args(argv)


def changed_settings(args: argparse.Namespace,
                     parse: Optional[Callable[[List[str]], argparse.Namespace]] = None) -> List[str]:
    """The flags `args` sets away from their defaults, output flags aside, as "--flag value (default)" ("--flag" or
    "--no-flag" for a switch). The targets are set for the defaults, so a run with any of these prints its verdicts
    as indicative only.

    Args:
        args: the parsed command line.
        parse: the benchmark's own parse_args (this module's by default), which gives the defaults.
    """
    defaults = vars((parse or parse_args)([]))
    out = []
    for key, value in vars(args).items():
        if key in ("out", "name") or value == defaults[key]:
            continue
        flag = key.replace("_", "-")
        out.append((f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else
                   f"--{flag} {value} ({defaults[key]})")
    return out


def bench_main(argv: Optional[List[str]], module: str, parse: Callable[[List[str]], argparse.Namespace],
               run: Callable[[argparse.Namespace], Dict[str, object]], table: Callable[[Dict[str, object]], str],
               plot: Callable[[Dict[str, object], Path], None],
               suffix: Union[str, Callable[[argparse.Namespace], str]]) -> int:
    """A one-GPU benchmark's main: parse, run, note the settings away from the defaults, and write
    bench-<gpu>-<suffix>.json, .txt and .png; 2 where no GPU is visible.

    Args:
        argv: the command line without the program name; None reads sys.argv.
        module: the benchmark's module, for the no-GPU message.
        parse: its parse_args.
        run: runs it on the parsed command line, returning the results.
        table: the report from the results.
        plot: plot(results, path) draws the PNG.
        suffix: the results files' suffix ("ragged"), or a function of the parsed command line that gives it.
    """
    args = parse(sys.argv[1:] if argv is None else argv)
    if gpu_missing(module):
        return 2
    res = run(args)
    res["_changed"] = changed_settings(args, parse)
    suffix = suffix(args) if callable(suffix) else suffix
    save_results(args.out, f"bench-{args.name or gpu_tag()}-{suffix}", table(res), res, plot)
    return 0


def attention_suffix(attention: str) -> str:
    """What a results file's name gains for a decoder attention other than the default: "-sdpa", say."""
    return "" if attention == DEFAULT_ATTENTION else f"-{attention}"


def gpu_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    return next((t for t in ("h100", "h200", "a100", "b200", "l40s") if t in name), name.split()[-1])


ROUNDS = 5  # contenders take turns in this many blocks
BLOCK_WARMUP = 5  # untimed steps at the start of each block, after another contender ran


def timed(contenders: Dict[str, Callable[[Dict[str, torch.Tensor]], object]], steps: List[Dict[str, torch.Tensor]],
          n: int, loops: Dict[str, Callable[[int], float]],
          prepare: Dict[str, Callable[[Dict[str, torch.Tensor]], object]]
          ) -> Tuple[Dict[str, Tuple[float, float]], Dict[str, float], Dict[str, List[float]]]:
    """Median wall and host microseconds of one step per contender, synchronised after each step as a
    serving loop is; the median of each C++ reference loop's `loop(steps)` (loops that time themselves); and per
    contender its median host microseconds in each round, so that host ratios get a spread. `prepare[name](step)`,
    where given, runs untimed (and waited for) before each of that contender's steps: a bare replay's inputs are
    staged there, so that it runs the same step as the runner it replays.

    The contenders take turns in ROUNDS blocks of n / ROUNDS steps, so whatever drifts on the machine
    during the run (clocks, neighbours) falls on every contender alike; blocks, not single steps, so that
    no contender runs on caches another one just evicted. Each step waits for the current stream, as the
    C++ loops do and as a serving loop waiting for its step's output does: a whole-device synchronize
    made the next launch's host time both slower and bimodal on the H100."""
    wall: Dict[str, List[float]] = {name: [] for name in contenders}
    host: Dict[str, List[float]] = {name: [] for name in contenders}
    host_rounds: Dict[str, List[float]] = {name: [] for name in contenders}
    loop_us: Dict[str, List[float]] = {name: [] for name in loops}
    stream = torch.cuda.current_stream()
    for _ in range(ROUNDS):
        for name, fn in contenders.items():
            block = []
            for i in range(BLOCK_WARMUP + n // ROUNDS):
                s = steps[i % len(steps)]
                if name in prepare:
                    prepare[name](s)
                    stream.synchronize()
                t0 = time.perf_counter()
                fn(s)
                t1 = time.perf_counter()
                stream.synchronize()
                t2 = time.perf_counter()
                if i >= BLOCK_WARMUP:
                    block.append((t1 - t0) * 1e6)
                    wall[name].append((t2 - t0) * 1e6)
            host[name] += block
            host_rounds[name].append(statistics.median(block))
        for name, loop in loops.items():
            loop_us[name].append(loop(n // ROUNDS))
    medians = {name: (statistics.median(wall[name]), statistics.median(host[name])) for name in contenders}
    return medians, {name: statistics.median(us) for name, us in loop_us.items()}, host_rounds


def pool_bytes(model: torch.nn.Module, static: Dict[str, torch.Tensor], order: List[int]):
    """Pool memory of capturing `order` into one fresh pool with graphrunner's Graph: total and per size."""
    # Warm up on the capture stream first, as GraphRunner does: cuBLAS makes that stream's workspace outside
    # the pool then (a runner captured earlier took the last one with its graphs).
    stream = gr.capture_stream(torch.cuda.current_device())
    with torch.no_grad(), torch.cuda.stream(stream):
        model(**{n: t[: order[0]] for n, t in static.items()})
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_reserved()
    pool, graphs, outputs, added = torch.cuda.graph_pool_handle(), [], [], []
    with torch.no_grad():
        for size in order:
            before = torch.cuda.memory_reserved()
            graph = gr.Graph()
            with graph.capture(pool=pool):
                out = model(**{n: t[:size] for n, t in static.items()})
            outputs.append(alias(out))  # as GraphRunner does: outputs live until the next step only
            del out
            graphs.append(graph)
            added.append(torch.cuda.memory_reserved() - before)
    total = torch.cuda.memory_reserved() - start
    for graph in graphs:
        graph.reset()
    del outputs
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return total, added


def run(args: argparse.Namespace) -> Dict[str, object]:
    cfg = DecoderConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, head_dim=args.head_dim,
                        intermediate=args.intermediate, vocab=args.vocab, cache_len=args.cache_len,
                        max_batch_size=args.max_batch_size, attention=args.attn)
    # Under --tp every rank runs every step below in the same order (the graphs hold NCCL all-reduces);
    # the same seeds give every rank the same inputs.
    group = dist.group.WORLD if dist.is_initialized() else None
    rank = dist.get_rank() if group is not None else 0
    model = Decoder(cfg, tp_rank=rank, tp_size=args.tp, tp_group=group)
    sizes = gr.default_capture_sizes(cfg.max_batch_size)
    gen = torch.Generator(device="cuda").manual_seed(0)
    example = random_decode_inputs(cfg, cfg.max_batch_size, gen)
    res: Dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "attention": cfg.attention, "layers": cfg.layers,
                              "hidden": cfg.hidden, "capture_sizes": len(sizes), "tp": args.tp,
                              "distributed": dist.is_initialized(), "_rank": rank}
    bar = tqdm(total=6, desc="bench", unit="stage", file=sys.stderr, disable=rank != 0)

    def make_runner() -> gr.GraphRunner:
        runner = gr.GraphRunner(model, decode_inputs(cfg), max_batch_size=cfg.max_batch_size)
        runner.capture()
        return runner

    # First-run costs (kernel loading, library handles, per-shape heuristics) are paid here, for both.
    with torch.no_grad():
        model(**example)
    make_runner().close()
    CommonRunner(model, example, sizes).close()
    bar.update()

    t0 = time.perf_counter()
    runner = make_runner()
    res["capture_s_graphrunner"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    common = CommonRunner(model, example, sizes)
    torch.cuda.synchronize()
    res["capture_s_common"] = time.perf_counter() - t0
    res["capture_ratio"] = res["capture_s_graphrunner"] / res["capture_s_common"]
    bar.update()

    def eager(s):
        with torch.no_grad():
            return model(**s)

    def size_contenders(size: int) -> Tuple[Dict[str, Callable], Dict[str, Callable], Dict[str, Callable]]:
        """The contenders of one captured size, the C++ loops timing themselves, and what runs before a step."""
        ours, theirs = runner.record.entries[size].graph, common.graphs[size]
        contenders = {"eager": eager, "common": lambda s: common(**s), "graphrunner": lambda s: runner(**s),
                      "bare": lambda s: ours.replay(), "torch_replay": lambda s: theirs.replay()}
        loops = {"floor": lambda k: launch_floor_us(ours.exec_handle, torch.cuda.current_stream().cuda_stream, k)}
        # Each bare replay runs the step its runner just staged (untimed): with attention whose cost follows the
        # lengths, replaying whatever the last step left skewed run_vs_bare_bs1 (1.054 with flash-attn 4, run AE8).
        # graphrunner's graph is replayed once more untimed: the first bare replay after a step gives the staging
        # node its captured parameter back, a host cost that is not the bare replay's (run AE10).
        prepare = {"bare": lambda s: (runner(**s), ours.replay()), "torch_replay": lambda s: common(**s)}
        return contenders, loops, prepare

    # One untimed pass first: otherwise the first row measured runs every contender's host path cold (run Z2 of
    # gpu-log-h100.txt: the common runner 74 us at batch 1 against 49-55 at the other batches).
    first, first_loops, first_prepare = size_contenders(runner.size_for(BATCHES[0]))
    timed(first, [random_decode_inputs(cfg, BATCHES[0], gen)], args.steps, first_loops, first_prepare)
    rows, host_rounds = [], {}  # host_rounds[batch]: each contender's median host us per round
    for batch in BATCHES:
        steps = [random_decode_inputs(cfg, batch, gen) for _ in range(8)]
        size = runner.size_for(batch)
        contenders, loops, prepare = size_contenders(size)
        times, loop_us, host_rounds[batch] = timed(contenders, steps, args.steps, loops, prepare)
        row = {"batch": batch, "size": size, "floor_host_us": loop_us["floor"]}
        for name, (wall, host) in times.items():
            row[f"{name}_wall_us"], row[f"{name}_host_us"] = wall, host
        rows.append(row)
        for key, value in row.items():
            if key not in ("batch",):
                res[f"{key}_bs{batch}"] = value
    bar.update()

    bs1 = rows[0]
    res.update({
        "run_vs_bare_bs1": bs1["graphrunner_wall_us"] / bs1["bare_wall_us"],
        "common_vs_bare_bs1": bs1["common_wall_us"] / bs1["bare_wall_us"],
        "run_host_us_bs1": bs1["graphrunner_host_us"], "common_host_us_bs1": bs1["common_host_us"],
        "bare_host_us_bs1": bs1["bare_host_us"], "torch_replay_host_us_bs1": bs1["torch_replay_host_us"],
        "run_host_vs_bare_bs1": bs1["graphrunner_host_us"] / bs1["bare_host_us"],
        "run_host_vs_bare_bs1_rounds": round_ratios(host_rounds[bs1["batch"]], "graphrunner", "bare"),
        "bare_host_vs_torch_replay_bs1": bs1["bare_host_us"] / bs1["torch_replay_host_us"],
        "launch_floor_us": bs1["floor_host_us"],
        "run_host_vs_floor_bs1": bs1["graphrunner_host_us"] / bs1["floor_host_us"],
        "eager_vs_run_bs1": bs1["eager_wall_us"] / bs1["graphrunner_wall_us"],
    })

    if not dist.is_initialized():  # the traces run on one GPU (the tensor-parallel run is a smoke test)
        draft = replace(cfg, layers=args.draft_layers, cache_len=args.draft_cache_len,
                        max_batch_size=args.draft_max_batch_size)
        # The main preset's steps cost several times the draft's: half as many keep its share of the run in bounds.
        for preset, prefix, steps in ((draft, "draft_", args.trace_steps), (cfg, "", args.trace_steps // 2)):
            res.update(run_traces(preset, steps, args.compile, prefix, gen))
            res[f"_{prefix}preset"] = preset
    bar.update()

    make_inputs = functools.partial(random_decode_inputs, cfg)
    t0 = time.perf_counter()
    runner.validate(make_inputs=make_inputs)
    res["validate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.validate(scrub=True, guard=True, make_inputs=make_inputs)
    res["validate_scrub_guard_s"] = time.perf_counter() - t0
    res["validated"] = True
    res["audit_borrowed"] = len(runner.audit().borrowed)
    res["capture_workspace_mib"] = runner.record.report().workspace_bytes / MiB
    static = {n: t.clone() for n, t in runner.record.static_inputs.items()}
    runner.close()
    common.close()
    bar.update()

    desc, desc_added = pool_bytes(model, static, sorted(sizes, reverse=True))
    asc, asc_added = pool_bytes(model, static, sorted(sizes))
    alone, _ = pool_bytes(model, static, [max(sizes)])
    res.update({"pool_mib_desc": desc / MiB, "pool_mib_asc": asc / MiB, "pool_mib_largest_alone": alone / MiB,
                "pool_ratio_desc": desc / alone, "pool_ratio_asc": asc / alone})
    bar.update()
    bar.close()
    res["_rows"], res["_pool_added"] = rows, {"desc": list(zip(sorted(sizes, reverse=True), desc_added)),
                                              "asc": list(zip(sorted(sizes), asc_added))}
    return res


# The traces' targets are the draft preset's, where host and staging costs show. On the main preset a step
# costs several hundred us of GPU time: its ratios are reported, not held to the draft's bounds (its pipelined
# run/common, say, cannot exceed bare/common, about 1.02).
TARGETS = [("run_vs_bare_bs1", "<=", 1.03), ("run_host_vs_bare_bs1", "<=", 1.3),
           ("bare_host_vs_torch_replay_bs1", "<=", 1.1), ("run_host_vs_floor_bs1", "<=", 2.0),
           ("pool_ratio_desc", "<=", 1.02), ("capture_ratio", "<=", 0.5),
           ("draft_pipelined_run_vs_common", ">=", 1.03), ("draft_pipelined_run_vs_bare", ">=", 0.99),
           ("draft_synced_run_vs_common", ">=", 1.10), ("draft_run_compiled_vs_compile_ro", ">=", 1.5)]
REPORTED = ["draft_synced_run_compiled_vs_compile_ro", "draft_run_compiled_vs_compile_ro_host_limit",
            "pipelined_run_vs_common", "pipelined_run_vs_bare",
            "synced_run_vs_common", "run_compiled_vs_compile_ro", "synced_run_compiled_vs_compile_ro"]
TRACE_CONTENDERS = ["run", "common", "bare", "compile_ro", "run_compiled"]


def trace_table(res: Dict[str, object], prefix: str) -> List[str]:
    """The traces of one preset: steps/s per regime, host time inside a synchronised step call and queued step
    time, median (min-max) over rounds."""
    preset, spread = res[f"_{prefix}preset"], res[f"{prefix}trace_spread"]
    out = [f"{prefix.rstrip('_') or 'main'} preset: {preset.layers} layers, cache {preset.cache_len}, "
           f"batches 1..{preset.max_batch_size}, attention {preset.attention}"]
    if res.get(f"{prefix}compile_error"):
        out.append(f"  torch.compile contenders left out: {res[prefix + 'compile_error']}")
    columns = [("pipelined steps/s", "trace_pipelined_steps_s"), ("synced steps/s", "trace_synced_steps_s"),
               ("synced host us", "trace_synced_host_us"), ("queued us bs1", "gpu_us_bs1"),
               ("queued us bs64", "gpu_us_bs64")]
    out.append(f"  {'contender':<13} " + " ".join(f"{title:>22}" for title, _ in columns))
    for name in TRACE_CONTENDERS + ["eager"]:
        cells = []
        for _, key in columns:
            key = f"{prefix}{key}_{name}"
            low, high = spread.get(key, (None, None))
            cells.append(f"{res[key]:>8.1f} ({low:.1f}-{high:.1f})".rjust(22) if key in res else "-".rjust(22))
        out.append(f"  {name:<13} " + " ".join(cells))
    return out


def table(res: Dict[str, object]) -> str:
    rows = res["_rows"]
    names = ["eager", "common", "graphrunner", "bare", "torch_replay"]
    out = [f"{res['gpu']}, torch {res['torch']}, {res['layers']} layers, hidden {res['hidden']}, "
           f"attention {res['attention']}" + (f", tensor parallel over {res['tp']} GPUs (NCCL)"
                                              if res["distributed"] else ""), "",
           "step wall us (host us), synchronised per step; floor = host us of cudaGraphLaunch in a C++ loop",
           f"{'batch':>5} " + " ".join(f"{n:>20}" for n in names) + f" {'floor':>7}"]
    for r in rows:
        cells = " ".join(f"{r[n + '_wall_us']:>11.1f} ({r[n + '_host_us']:>6.1f})" for n in names)
        out.append(f"{r['batch']:>5} {cells} {r['floor_host_us']:>7.1f}")
    out.append("")
    for prefix in ("draft_", ""):
        if f"_{prefix}preset" in res:
            out += trace_table(res, prefix) + [""]
    out += [f"capture: graphrunner {res['capture_s_graphrunner']:.2f} s, common runner "
            f"{res['capture_s_common']:.2f} s",
            f"pool MiB: descending {res['pool_mib_desc']:.0f}, ascending {res['pool_mib_asc']:.0f}, largest alone "
            f"{res['pool_mib_largest_alone']:.0f}",
            f"validate: {res['validate_s']:.2f} s, with scrub+guard {res['validate_scrub_guard_s']:.2f} s", ""]
    out += target_header(res.get("_changed", []))
    out += target_lines(res, TARGETS)
    out += reported_lines(res, [key for key in REPORTED if key in res])
    return "\n".join(out)


def target_header(changed: List[str]) -> List[str]:
    """The line above the targets, and where the run changed settings (`changed_settings`), one naming them.

    Args:
        changed: the flags the run set away from their defaults.
    """
    out = ["targets (median; over rounds, side by side):"]
    if changed:
        out.append(f"  set for the default settings; this run changed {', '.join(changed)}: its verdicts are "
                   "indicative only")
    return out


def target_lines(res: Dict[str, object], targets: List[Tuple[str, str, float]]) -> List[str]:
    """One line per target: its value, bound, verdict and spread over rounds ("not run" where `res` lacks it).

    Args:
        res: the results.
        targets: (key, "<=" or ">=", bound) each.
    """
    out = []
    for key, op, bound in targets:
        if key not in res:
            out.append(f"  {key:<44} {'not run':>8}")
            continue
        value = res[key]
        verdict = "met" if (value <= bound if op == "<=" else value >= bound) else "MISSED"
        out.append(f"  {key:<44} {value:8.3f} {op} {bound:<5} {verdict:<6} {round_spread(res, key)}".rstrip())
    return out


def reported_lines(res: Dict[str, object], keys: List[str]) -> List[str]:
    """The "reported, no target:" block: one line per key, its value and spread over rounds.

    Args:
        res: the results.
        keys: the keys to report, each in `res`.
    """
    return ["reported, no target:"] + [f"  {key:<44} {res[key]:8.3f} {'':<15} {round_spread(res, key)}".rstrip()
                                      for key in keys]


def round_spread(res: Dict[str, object], key: str) -> str:
    """`key`'s spread over rounds, as the table prints it ("" where the run kept none)."""
    spread = res.get(f"{key}_rounds")
    return f"({spread[0]:.3f}-{spread[1]:.3f})" if spread else ""


def plot(res: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["_rows"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for order, marker in (("desc", "o"), ("asc", "s")):
        pts = sorted(res["_pool_added"][order])
        axes[0].plot([p[0] for p in pts], [p[1] / MiB for p in pts], marker=marker, ms=3,
                     label=f"{'largest' if order == 'desc' else 'smallest'} first")
    axes[0].set(title="pool MiB added when each size is captured", xlabel="captured size", ylabel="MiB")
    for name in ["eager", "common", "graphrunner", "bare"]:
        axes[1].plot([r["batch"] for r in rows], [r[name + "_wall_us"] for r in rows], marker="o", label=name)
        axes[2].plot([r["batch"] for r in rows], [r[name + "_host_us"] for r in rows], marker="o", label=name)
    axes[2].plot([r["batch"] for r in rows], [r["floor_host_us"] for r in rows], "k--", label="cudaGraphLaunch (C++)")
    axes[1].set(title="step wall time", xlabel="batch", ylabel="us", xscale="log", yscale="log")
    axes[2].set(title="host time per step", xlabel="batch", ylabel="us", xscale="log", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"graphrunner on {res['gpu']} ({res['layers']}-layer decoder, {res['attention']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def init_tensor_parallel(tp: int) -> None:
    """One process per GPU, started by torchrun; NCCL with NVLink multicast off unless asked for. Under
    torchrun, --tp 1 runs a world of one with its all-reduces captured."""
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"--tp {tp} runs one process per GPU: torchrun --nproc-per-node {tp} "
                         "-m graphrunner_workloads.bench "
                         f"--tp {tp}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    if dist.get_world_size() != tp:
        raise SystemExit(f"--tp {tp} needs {tp} processes, torchrun started {dist.get_world_size()}")


def gpu_missing(program: str) -> bool:
    """True, with a line on stderr saying so, where no CUDA GPU is visible: a benchmark then exits with status 2."""
    if torch.cuda.is_available():
        return False
    print(f"{program} needs a CUDA GPU; torch.cuda.is_available() is False on this machine.", file=sys.stderr)
    return True


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """--out and --name, as every benchmark takes them."""
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the results files")
    p.add_argument("--name", default=None, help="results file suffix (default: the GPU, e.g. h100)")


def main(argv: List[str] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if gpu_missing("graphrunner_workloads.bench"):
        return 2
    distributed = args.tp > 1 or "LOCAL_RANK" in os.environ
    if distributed:
        init_tensor_parallel(args.tp)
    try:
        res = run(args)
    finally:
        if distributed:
            dist.destroy_process_group()
    if res["_rank"] != 0:  # rank 0 reports for every rank
        return 0
    return write_results(args, res)


def save_results(out: Path, stem: str, report: str, res: Dict[str, object],
                 draw: Callable[[Dict[str, object], Path], None]) -> Dict[str, object]:
    """Prints `report` and writes out/stem.txt, .png (by `draw`) and .json (keys not starting with "_");
    returns what went into the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    print(report)
    (out / f"{stem}.txt").write_text(report + "\n")
    draw(res, out / f"{stem}.png")
    flat = {k: v for k, v in res.items() if not k.startswith("_")}
    (out / f"{stem}.json").write_text(json.dumps(flat, indent=1, sort_keys=True) + "\n")
    return flat


def write_results(args: argparse.Namespace, res: Dict[str, object]) -> int:
    tp = f"x{args.tp}" if res["distributed"] else ""
    name = args.name or gpu_tag() + tp + attention_suffix(args.attn)
    if res["distributed"]:  # the headline numbers again, under names that say how many ranks
        res.update(headline(f"tp{args.tp}", res))
    res["_changed"] = changed_settings(args)
    flat = save_results(args.out, f"bench-{name}", table(res), res, plot)
    if args.attn in BACKEND_KEY_PREFIX and args.name is None:
        add_backend_keys(args.out / f"bench-{gpu_tag()}{tp}.json", BACKEND_KEY_PREFIX[args.attn], flat)
    return 0


# A flash-attn run also records its headline numbers, prefixed, in the GPU's main results file.
BACKEND_KEY_PREFIX = {"flash-attn-4": "fa4", "flash-attn": "fa2"}
HEADLINE_KEYS = ("eager_vs_run_bs1", "run_vs_bare_bs1")


def headline(prefix: str, res: Dict[str, object]) -> Dict[str, object]:
    return {f"{prefix}_{key}": res[key] for key in HEADLINE_KEYS}


def add_backend_keys(path: Path, prefix: str, res: Dict[str, object]) -> None:
    main = json.loads(path.read_text()) if path.exists() else {}
    main.update(headline(prefix, res))
    path.write_text(json.dumps(main, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
