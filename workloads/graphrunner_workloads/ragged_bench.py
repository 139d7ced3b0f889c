"""`python -m graphrunner_workloads.ragged_bench`: ragged steps (prefill chunks and decodes mixed, keyed by token
count) of the built-in decoder, every contender side by side in one process (issue #33).

Per token count T (16, 64, 256, 1024; 8 requests, or T if fewer) and preset (8 and 32 layers), the host waiting
for each step:
- eager: the RaggedDecoder step, its split copied to the device;
- common: the common hand-written pattern, a torch.cuda.CUDAGraph per T with every input copy_'d into static
  buffers and its padding rows refilled, then replay (ragged.CommonRaggedRunner);
- graphrunner: the ragged runner (sizes count tokens, split on query_lens);
- bare: replay of graphrunner's graph of T, the runner having staged the same step (untimed);
- decode: a decode step of 8 requests through the uniform decode runner in the same pool, for the host time of
  a ragged step against a decode step.
The ragged step's attention is --attention (default "flash": torch's FlashAttention-2 varlen kernel, decode steps
on the decode kernel; "flash-attn-4": flash-attn 4's varlen paged kernel for both).
Then the engine loop (engine.py) serving one workload in its decode_only mode (mixed steps eagerly) and its ragged
mode, turn about, on the 8-layer preset; and the pool of the decode and ragged runners captured together with
gr.capture_all against the largest ragged graph alone in a fresh pool. Writes bench-<gpu>-ragged.json, .txt and
.png into --out (bench-<gpu>-ragged-<attention>.* for an attention other than "flash").
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import graphrunner as gr
from graphrunner_workloads.bench import (add_output_arguments, bench_main, reported_lines, target_header,
                                         target_lines, timed)
from graphrunner_workloads.decoder import Decoder, DecoderConfig
from graphrunner_workloads.engine import Engine, Workload
from graphrunner_workloads.ragged import (ATTENTION, SPLIT, CommonRaggedRunner, RaggedDecoder, decode_runner,
                                          page_size_for, ragged_inputs, ragged_runner, random_decode_step,
                                          random_ragged_step)
from graphrunner_workloads.traces import round_ratios

CONTENDERS = ["eager", "common", "graphrunner", "bare", "decode"]
MiB = 1024 * 1024


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The command line; --quick lowers the layers, steps and engine workload for a smoke run.

    Args:
        argv: the arguments, without the program name.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="8,32", help="the presets' layer counts, comma-separated")
    p.add_argument("--sizes", default="16,64,256,1024", help="token counts T, comma-separated")
    p.add_argument("--requests", type=int, default=8, help="requests per step (T if fewer tokens)")
    p.add_argument("--cache-len", type=int, default=512, help="the step benchmark's cache positions per request")
    p.add_argument("--attention", choices=ATTENTION, default="flash",
                   help="the ragged step's attention: flash (torch's FlashAttention-2 varlen kernel on packed keys; "
                   "decode steps run the decode kernel), flash-attn-4 (its varlen paged kernel, the pages read in "
                   "place), decode (the workloads' decode kernel, a row per token) or sdpa (masked padded layout)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per contender and T")
    p.add_argument("--engine-requests", type=int, default=48)
    p.add_argument("--engine-rounds", type=int, default=3, help="runs of the workload per engine mode, turn about")
    p.add_argument("--budget", type=int, default=256, help="the engine's tokens per step")
    p.add_argument("--prompt-max", type=int, default=2000, help="the engine's longest prompt (shortest: 1)")
    p.add_argument("--output-max", type=int, default=128, help="the engine's longest output (shortest: 1)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 layers, 40 steps, a small engine workload")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.engine_requests, args.engine_rounds = "8", 40, 12, 1
    return args


def preset(layers: int, args: argparse.Namespace, cache_len: Optional[int] = None,
           attention: str = "flash") -> DecoderConfig:
    """The benchmark decoder (bench.py's shape: hidden 1024, 8 heads of 128, bf16) with `layers` layers, pages of
    page_size_for(attention) and room for `--requests` requests of `cache_len` positions.

    Args:
        layers: the decoder's layers.
        args: the parsed command line.
        cache_len: positions per request (rounded up to whole pages); default --cache-len.
        attention: the ragged step's attention, which sets the page size.
    """
    page = page_size_for(attention)
    cache = cache_len or args.cache_len
    return DecoderConfig(layers=layers, cache_len=-(-cache // page) * page, page_size=page,
                         max_batch_size=args.requests)


def step_rows(args: argparse.Namespace, layers: int, gen: torch.Generator) -> Tuple[List[Dict[str, object]],
                                                                                    Dict[str, object]]:
    """Every contender at every T on one preset: a row per T, and the preset's keys.

    Args:
        args: the parsed command line.
        layers: the preset's layers.
        gen: draws the steps (on the GPU).
    """
    cfg = preset(layers, args, attention=args.attention)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = RaggedDecoder(Decoder(cfg), attention=args.attention)
    decode, mixed = decode_runner(model, args.requests), ragged_runner(model, sizes, args.requests)
    gr.capture_all(decode, mixed)
    common = CommonRaggedRunner(model, ragged_inputs(cfg), sizes, args.requests)
    decode_step = random_decode_step(cfg, args.requests, gen)

    def eager(step: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return model(**dict(step, **{SPLIT: step[SPLIT].to(gen.device)}))

    rows, res = [], {}
    for size in sizes:
        requests = min(size, args.requests)
        steps = [random_ragged_step(cfg, size, requests, gen) for _ in range(4)]
        graph = mixed.record.entries[size].graph
        contenders: Dict[str, Callable[[Dict[str, torch.Tensor]], object]] = {
            "eager": eager, "common": lambda s: common(**s), "graphrunner": lambda s: mixed(**s),
            "bare": lambda s: graph.replay(), "decode": lambda s: decode(**decode_step)}
        # The bare replay runs the step graphrunner just staged, replayed once more untimed: the first replay after
        # a step gives the staging node its captured parameters back, a host cost that is not the bare replay's.
        prepare = {"bare": lambda s: (mixed(**s), graph.replay())}
        times, _, host_rounds = timed(contenders, steps, args.steps, {}, prepare)
        row: Dict[str, object] = {"tokens": size, "requests": requests}
        for name, (wall, host) in times.items():
            row[f"{name}_wall_us"], row[f"{name}_host_us"] = wall, host
        rows.append(row)
        key = f"T{size}_L{layers}"
        res.update({
            f"ragged_run_vs_eager_{key}": row["eager_wall_us"] / row["graphrunner_wall_us"],
            f"ragged_run_vs_bare_{key}": row["graphrunner_wall_us"] / row["bare_wall_us"],
            f"ragged_run_vs_common_{key}": row["common_wall_us"] / row["graphrunner_wall_us"],
            f"ragged_host_us_{key}": row["graphrunner_host_us"],
            f"ragged_host_vs_decode_{key}": row["graphrunner_host_us"] / row["decode_host_us"],
            f"ragged_host_vs_decode_{key}_rounds": round_ratios(host_rounds, "graphrunner", "decode")})
    res[f"decode_host_us_L{layers}"] = statistics.median(r["decode_host_us"] for r in rows)
    common.close()
    decode.close()
    mixed.close()
    return rows, res


def engine_keys(args: argparse.Namespace) -> Dict[str, object]:
    """The engine loop's generated tokens/s in decode_only and ragged modes, turn about on one workload (8 layers).

    Args:
        args: the parsed command line.
    """
    workload = Workload(requests=args.engine_requests, prompt_lens=(1, args.prompt_max),
                        output_lens=(1, args.output_max))
    cfg = preset(8, args, cache_len=workload.longest, attention=args.attention)
    model = RaggedDecoder(Decoder(cfg), attention=args.attention, sample=True)
    engines = {mode: Engine(model, mode, budget=args.budget, max_running=args.requests)
               for mode in ("decode_only", "ragged")}
    rates: Dict[str, List[float]] = {mode: [] for mode in engines}
    tokens = {}
    try:
        for engine in engines.values():  # first-run costs, outside the rounds
            engine.run(dataclasses.replace(workload, requests=4))
        for _ in range(args.engine_rounds):
            for mode, engine in engines.items():
                result = engine.run(workload)
                rates[mode].append(result.tokens_per_s)
                tokens[mode] = result
    finally:
        for engine in engines.values():
            engine.close()
    ratios = [r / d for r, d in zip(rates["ragged"], rates["decode_only"])]
    ragged = tokens["ragged"]
    return {"engine_tokens_s_decode_only": statistics.median(rates["decode_only"]),
            "engine_tokens_s_ragged": statistics.median(rates["ragged"]),
            "engine_ragged_vs_decode_only": statistics.median(ratios),
            "engine_ragged_vs_decode_only_rounds": (min(ratios), max(ratios)),
            "engine_steps": ragged.steps, "engine_mixed_steps": ragged.mixed_steps,
            "engine_generated_tokens": ragged.generated,
            # Greedy tokens of the two modes in bfloat16 may part at near-ties (engine.py); how many requests do.
            "engine_requests_differing": sum(a != b for a, b in zip(tokens["ragged"].tokens,
                                                                    tokens["decode_only"].tokens)),
            "_engine_rates": rates}


def segment_mib(pool: Tuple[int, int]) -> Dict[str, float]:
    """The pool's segments by torch's kind, MiB: "small" (2 MiB segments for blocks up to 1 MiB, which no larger
    block shares) and "large". Read while its graphs live.

    Args:
        pool: the pool's id (a runner's record.pool).
    """
    # torch.cuda.memory._snapshot() takes no arguments: memory_snapshot(mempool_id=) drops references to the id's
    # items (graphrunner/pool.py, Note [snapshots that take no arguments]).
    mib = {"small": 0.0, "large": 0.0}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        if tuple(seg["segment_pool_id"]) == tuple(pool):
            mib[seg["segment_type"]] += seg["total_size"] / MiB
    return mib


def segment_line(together: Dict[str, float], alone: Dict[str, float]) -> str:
    """The report's line of a pool's segments by kind, together against alone.

    Args:
        together: segment_mib of the pool every runner of the family was captured into.
        alone: segment_mib of the largest size's pool, captured alone.
    """
    return (f"segments (small / large MiB): together {together['small']:.1f} / {together['large']:.1f}, alone "
            f"{alone['small']:.1f} / {alone['large']:.1f}")


def pool_keys(args: argparse.Namespace) -> Dict[str, object]:
    """Pool bytes of the decode and ragged runners captured together (gr.capture_all, one pool) over the largest
    ragged graph alone in a fresh pool, on the 8-layer preset.

    Args:
        args: the parsed command line.
    """
    cfg = preset(8, args, attention=args.attention)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = RaggedDecoder(Decoder(cfg), attention=args.attention)
    pools, growth, segments = {}, {}, {}
    for label, runners in (("together", lambda: [decode_runner(model, args.requests),
                                                  ragged_runner(model, sizes, args.requests)]),
                           ("alone", lambda: [ragged_runner(model, [max(sizes)], args.requests)])):
        torch.cuda.empty_cache()
        built = runners()
        gr.capture_all(*built)
        reports = [r.record.report() for r in built]
        pools[label] = sum(r.pool_bytes for r in reports)
        # Where the pool grew, in capture order's terms: "runner size MiB" for each size that grew it.
        growth[label] = [f"{r.name} {s.size} {s.pool_bytes_added / MiB:.1f}" for r in reports for s in r.sizes
                         if s.pool_bytes_added]
        segments[label] = segment_mib(built[0].record.pool)
        for r in built:
            r.close()
    return {"pool_mib_together": pools["together"] / MiB, "pool_mib_largest_alone": pools["alone"] / MiB,
            "ragged_pool_ratio": pools["together"] / pools["alone"], "pool_growth_together": growth["together"],
            "pool_growth_alone": growth["alone"], "pool_segments_mib_together": segments["together"],
            "pool_segments_mib_alone": segments["alone"]}


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Every part of the benchmark; the results, keys starting with "_" kept out of the JSON.

    Args:
        args: the parsed command line.
    """
    gen = torch.Generator(device="cuda").manual_seed(0)
    res: Dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "attention": args.attention, "requests": args.requests,
                              "_rows": {}}
    for layers in (int(n) for n in args.layers.split(",")):
        rows, keys = step_rows(args, layers, gen)
        res["_rows"][layers] = rows
        res.update(keys)
    res.update(engine_keys(args))
    res.update(pool_keys(args))
    return res


def targets(res: Dict[str, object]) -> List[Tuple[str, str, float]]:
    """The targets, for the sizes and presets the run has.

    Args:
        res: the results.
    """
    out = [("ragged_run_vs_eager_T16_L8", ">=", 5.0)]
    for layers, rows in res["_rows"].items():
        out += [(f"ragged_run_vs_bare_T{r['tokens']}_L{layers}", "<=", 1.03) for r in rows]
    out += [(f"ragged_host_vs_decode_T{r['tokens']}_L8", "<=", 1.3) for r in res["_rows"].get(8, [])]
    return out + [("engine_ragged_vs_decode_only", ">=", 1.5), ("ragged_pool_ratio", "<=", 1.02)]


def table(res: Dict[str, object]) -> str:
    """The text report: per preset a row per T, the engine and pool lines, the targets.

    Args:
        res: the results.
    """
    out = [f"{res['gpu']}, torch {res['torch']}, ragged steps of {res['requests']} requests (T if fewer), "
           f"attention {res['attention']}", "",
           "step wall us (host us), synchronised per step; decode: a decode step of the same requests"]
    for layers, rows in res["_rows"].items():
        out.append(f"{layers} layers")
        out.append(f"{'T':>6} " + " ".join(f"{n:>20}" for n in CONTENDERS))
        for r in rows:
            cells = " ".join(f"{r[n + '_wall_us']:>11.1f} ({r[n + '_host_us']:>6.1f})" for n in CONTENDERS)
            out.append(f"{r['tokens']:>6} {cells}")
        out.append("")
    rates = res["_engine_rates"]
    out += [f"engine (8 layers, {res['engine_generated_tokens']} generated tokens, {res['engine_steps']} steps of which "
            f"{res['engine_mixed_steps']} mixed): decode_only {res['engine_tokens_s_decode_only']:.0f} tokens/s "
            f"({min(rates['decode_only']):.0f}-{max(rates['decode_only']):.0f}), ragged "
            f"{res['engine_tokens_s_ragged']:.0f} ({min(rates['ragged']):.0f}-{max(rates['ragged']):.0f}); "
            f"{res['engine_requests_differing']} requests' bf16 tokens differ between the modes",
            f"pool MiB: decode + ragged runners together {res['pool_mib_together']:.1f}, largest ragged graph alone "
            f"{res['pool_mib_largest_alone']:.1f}",
            f"  grown by (runner size MiB), together: {', '.join(res['pool_growth_together'])}; alone: "
            f"{', '.join(res['pool_growth_alone'])}",
            f"  {segment_line(res['pool_segments_mib_together'], res['pool_segments_mib_alone'])}", ""]
    out += target_header(res.get("_changed", []))
    out += target_lines(res, targets(res))
    reported = [k for k in sorted(res) if k.startswith(("ragged_run_vs_eager", "ragged_run_vs_common"))
                and not k.endswith("_rounds")]
    out += reported_lines(res, reported)
    return "\n".join(out)


def plot(res: Dict[str, object], path: Path) -> None:
    """Wall and host time per T for every contender and preset, and the engine's tokens/s, into `path`.

    Args:
        res: the results.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for (layers, rows), style in zip(res["_rows"].items(), ("-", "--")):
        tokens = [r["tokens"] for r in rows]
        for name, color in zip(CONTENDERS, ("C0", "C1", "C2", "C3", "C4")):
            axes[0].plot(tokens, [r[name + "_wall_us"] for r in rows], style, color=color, marker="o",
                         label=f"{name} ({layers} layers)")
            axes[1].plot(tokens, [r[name + "_host_us"] for r in rows], style, color=color, marker="o",
                         label=f"{name} ({layers} layers)")
    axes[0].set(title="ragged step wall time", xlabel="tokens T", ylabel="us", xscale="log", yscale="log")
    axes[1].set(title="host time per step", xlabel="tokens T", ylabel="us", xscale="log", yscale="log")
    modes = ["decode_only", "ragged"]
    axes[2].bar(modes, [res[f"engine_tokens_s_{m}"] for m in modes], color=["C1", "C2"])
    axes[2].set(title="engine loop, 8 layers", ylabel="generated tokens/s")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"graphrunner ragged steps on {res['gpu']} ({res['attention']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the benchmark and writes bench-<gpu>-ragged.json, .txt and .png (bench-<gpu>-ragged-<attention> for an
    attention other than "flash"); 2 where no GPU is visible.

    Args:
        argv: the command line; None reads sys.argv.
    """
    return bench_main(argv, "graphrunner_workloads.ragged_bench", parse_args, run, table, plot,
                      lambda args: "ragged" + ("" if args.attention == "flash" else f"-{args.attention}"))


if __name__ == "__main__":
    sys.exit(main())
