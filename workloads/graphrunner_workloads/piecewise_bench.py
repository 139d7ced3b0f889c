"""`python -m graphrunner_workloads.piecewise_bench`: ragged steps of the built-in decoder whose attention cannot be
captured (it takes the step's lengths on the host), every contender side by side in one process (issue #34).

Per token count T (16, 64, 256, 1024; 8 requests, or T if fewer) and preset (8 and 32 layers, ragged_bench's
shape), the wall time of a step, synchronised per step, and the host time until the call returns:
- eager: the piecewise decoder step (piecewise.PiecewiseRaggedDecoder, attention "varlen"), its split copied to
  the device;
- common: the common breakable pattern by hand (piecewise.CommonPiecewiseRunner): a torch.cuda.CUDAGraph per
  segment between attention calls, one pool; a step copy_'s its inputs into static buffers, replays segment 0,
  runs the varlen attention eagerly and copy_'s it into the next segment's static input, replays segment 1, ...
  in a Python loop;
- piecewise: graphrunner's ragged runner of the same decoder: the same segments and the same attention call, a
  step in one native call;
- shared: the piecewise runner with share_segments=True: the layers' segments (one structure) run on one
  executable, which each segment's launch first loads with its own parameters (cudaGraphExecUpdate): its host time
  over piecewise's, per break, is what sharing costs;
- full: graphrunner's ragged runner of the graph-safe twin (attention "packed": the same kernel on the same packed
  keys with T as its bound, inside the graph): what the step costs where attention can be captured;
- noop: the full graph's step with a break after every layer's attention that does nothing
  (attention "noop"): its host time over full's, per break, is graphrunner's own cost of a break.
The contenders take turns in blocks (bench.timed), --rounds times; each key is the median over rounds of the
round's ratio, its spread (min-max over rounds) beside it. Beside piecewise's speedup over the common pattern,
full's and noop's are reported: the step with no break, and with breaks that cost a segment's launch and nothing
else, what the target over the common pattern leaves room for. Then the pool of the piecewise decode and ragged
runners captured together (gr.capture_all, one pool) against the piecewise runner of the largest T alone, and the
executables a size holds, without sharing (one a segment) and with it, against the distinct segment structures
among them (Graph.structure()). Writes bench-<gpu>-piecewise.json, .txt and .png into --out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import graphrunner as gr
from graphrunner_workloads.bench import (add_output_arguments, bench_main, reported_lines, target_header,
                                         target_lines, timed)
from graphrunner_workloads.decoder import Decoder
from graphrunner_workloads.piecewise import CommonPiecewiseRunner, PiecewiseRaggedDecoder
from graphrunner_workloads.ragged import SPLIT, decode_runner, ragged_runner, random_ragged_step
from graphrunner_workloads.ragged_bench import preset, segment_line, segment_mib

CONTENDERS = ["eager", "common", "piecewise", "shared", "full", "noop"]
MiB = 1024 * 1024
Times = Dict[str, Tuple[float, float]]  # contender -> (wall us, host us), one round's medians


def parse_args(argv: List[str]) -> argparse.Namespace:
    """The command line; --quick: 8 layers, T of 16 and 256, fewer steps and rounds, for a smoke run.

    Args:
        argv: the arguments, without the program name.
    """
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ragged_bench's presets and steps (its preset() reads --cache-len and --requests), then the timing.
    for flag, kind, default, what in (
            ("--layers", str, "8,32", "the presets' layer counts, comma-separated"),
            ("--sizes", str, "16,64,256,1024", "token counts T, comma-separated"),
            ("--requests", int, 8, "requests per step (T if fewer tokens)"),
            ("--cache-len", int, 512, "cache positions per request"),
            ("--steps", int, 300, "timed steps per contender and T, over all rounds"),
            ("--rounds", int, 3, "rounds of side-by-side blocks (bench.timed) per T")):
        p.add_argument(flag, type=kind, default=default, help=what)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 layers, T 16 and 256, 60 steps, 2 rounds")
    add_output_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.sizes, args.steps, args.rounds = "8", "16,256", 60, 2
    return args


def over_rounds(rounds: List[Times], ratio: Callable[[Times], float]) -> Tuple[float, Tuple[float, float]]:
    """The median of `ratio` over rounds, and its (min, max).

    Args:
        rounds: each round's medians.
        ratio: a round's value.
    """
    values = [ratio(r) for r in rounds]
    return statistics.median(values), (min(values), max(values))


def structures(graphs: List[gr.Graph]) -> int:
    """How many distinct structures `graphs` hold (Graph.structure(): the same nodes, launch shapes and edges,
    whatever their addresses): what one executable each could serve, updated per segment."""
    return len({graph.structure() for graph in graphs})


def executables(graphs: List[gr.Graph]) -> int:
    """How many distinct executables `graphs` run on (one a graph without sharing)."""
    return len({graph.exec_handle for graph in graphs})


def token_counts(args: argparse.Namespace) -> List[int]:
    """The T of --sizes."""
    return [int(s) for s in args.sizes.split(",")]


def preset_rows(args: argparse.Namespace, layers: int, gen: torch.Generator) -> Tuple[List[Dict[str, object]],
                                                                                      Dict[str, object]]:
    """Runs the contenders side by side on the `layers`-layer preset, steps drawn by `gen` (on the GPU); returns a
    row of medians per T and the preset's keys (ratios with their spreads over rounds, executables)."""
    cfg, sizes = preset(layers, args), token_counts(args)
    decoder = Decoder(cfg)
    piecewise = PiecewiseRaggedDecoder(decoder, "varlen")
    runners = {"piecewise": ragged_runner(piecewise, sizes, args.requests),
               "shared": ragged_runner(piecewise, sizes, args.requests, share_segments=True),
               "full": ragged_runner(PiecewiseRaggedDecoder(decoder, "packed"), sizes, args.requests),
               "noop": ragged_runner(PiecewiseRaggedDecoder(decoder, "noop"), sizes, args.requests)}
    for runner in runners.values():
        runner.capture()
    common = CommonPiecewiseRunner(piecewise, sizes, args.requests)

    def eager(step: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return piecewise(**dict(step, **{SPLIT: step[SPLIT].to(gen.device)}))

    contenders: Dict[str, Callable[[Dict[str, torch.Tensor]], object]] = {
        "eager": eager, "common": lambda s: common(**s), "piecewise": lambda s: runners["piecewise"](**s),
        "shared": lambda s: runners["shared"](**s), "full": lambda s: runners["full"](**s),
        "noop": lambda s: runners["noop"](**s)}
    per_round = max(1, args.steps // args.rounds)
    rows, res = [], {}
    for size in sizes:
        requests = min(size, args.requests)
        steps = [random_ragged_step(cfg, size, requests, gen) for _ in range(4)]
        rounds = [timed(contenders, steps, per_round, {}, {})[0] for _ in range(args.rounds)]
        row: Dict[str, object] = {"tokens": size, "requests": requests}
        for name in CONTENDERS:
            row[f"{name}_wall_us"] = statistics.median(r[name][0] for r in rounds)
            row[f"{name}_host_us"] = statistics.median(r[name][1] for r in rounds)
        rows.append(row)
        key = f"T{size}_L{layers}"
        for other in ("common", "eager", "full"):  # speedups: the other's wall over piecewise's
            res[f"piecewise_run_vs_{other}_{key}"], res[f"piecewise_run_vs_{other}_{key}_rounds"] = over_rounds(
                rounds, lambda r, o=other: r[o][0] / r["piecewise"][0])
        # The room the target over the common pattern leaves: the step with no break (full) and with breaks that
        # cost a segment's launch and nothing else (noop), over the common pattern.
        for bound in ("full", "noop"):
            res[f"{bound}_run_vs_common_{key}"], res[f"{bound}_run_vs_common_{key}_rounds"] = over_rounds(
                rounds, lambda r, b=bound: r["common"][0] / r[b][0])
        res[f"piecewise_host_us_{key}"] = row["piecewise_host_us"]
        res[f"piecewise_host_us_per_break_{key}"], res[f"piecewise_host_us_per_break_{key}_rounds"] = over_rounds(
            rounds, lambda r: (r["noop"][1] - r["full"][1]) / layers)
        # With sharing: a break's own cost plus what sharing adds it (shared's host time over piecewise's).
        res[f"shared_host_us_per_break_{key}"], res[f"shared_host_us_per_break_{key}_rounds"] = over_rounds(
            rounds, lambda r: (r["noop"][1] - r["full"][1] + r["shared"][1] - r["piecewise"][1]) / layers)
    largest = {name: runners[name].record.entries[max(sizes)] for name in ("piecewise", "shared", "full")}
    res.update({f"piecewise_executables_L{layers}": executables(largest["piecewise"].graphs),
                f"piecewise_executables_shared_L{layers}": executables(largest["shared"].graphs),
                f"piecewise_structures_L{layers}": structures(largest["piecewise"].graphs),
                f"piecewise_exec_mib_T{max(sizes)}_L{layers}": largest["piecewise"].exec_bytes / MiB,
                f"shared_exec_mib_L{layers}": runners["shared"].record.capture_report.exec_bytes / MiB,
                f"unshared_exec_mib_L{layers}": runners["piecewise"].record.capture_report.exec_bytes / MiB,
                f"full_exec_mib_T{max(sizes)}_L{layers}": largest["full"].exec_bytes / MiB})
    common.close()
    for runner in runners.values():
        runner.close()
    return rows, res


def pool_keys(args: argparse.Namespace, layers: int) -> Dict[str, object]:
    """Pool bytes of the piecewise decode and ragged runners captured together (one pool) over the piecewise
    runner of the largest T alone in a fresh pool, on the preset of `layers` layers.

    Args:
        args: the parsed command line.
        layers: the preset's layers.
    """
    cfg, sizes = preset(layers, args), token_counts(args)
    model = PiecewiseRaggedDecoder(Decoder(cfg), "varlen")
    families = {"together": lambda: [decode_runner(model, args.requests), ragged_runner(model, sizes, args.requests)],
                "alone": lambda: [ragged_runner(model, [max(sizes)], args.requests)]}
    reports, segments = {}, {}
    for label, family in families.items():
        torch.cuda.empty_cache()
        captured = family()
        gr.capture_all(*captured)
        reports[label] = [runner.record.report() for runner in captured]
        segments[label] = segment_mib(captured[0].record.pool)
        for runner in captured:
            runner.close()
    pool = {label: sum(r.pool_bytes for r in family) for label, family in reports.items()}
    return {"piecewise_pool_mib_together": pool["together"] / MiB, "piecewise_pool_mib_largest_alone":
            pool["alone"] / MiB, "piecewise_pool_ratio": pool["together"] / pool["alone"], "pool_layers": layers,
            "piecewise_pool_segments_mib_together": segments["together"],
            "piecewise_pool_segments_mib_alone": segments["alone"],
            # The executables of the family, outside the pool: one a segment of every size of both runners.
            "piecewise_family_executables": sum(r.graphs for r in reports["together"]),
            "piecewise_family_exec_mib": sum(r.exec_bytes for r in reports["together"]) / MiB}


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Every part of the benchmark; the results, keys starting with "_" kept out of the JSON.

    Args:
        args: the parsed command line.
    """
    gen = torch.Generator(device="cuda").manual_seed(0)
    presets = [int(n) for n in args.layers.split(",")]
    res: Dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "requests": args.requests, "rounds": args.rounds,
                              "_rows": {}}
    for layers in presets:
        rows, keys = preset_rows(args, layers, gen)
        res["_rows"][layers] = rows
        res.update(keys)
    # The headline numbers: a break's host cost, without and with sharing, where the most breaks average it
    # (smallest T, most layers); the executables of the largest T of the fewest layers' preset (8 by default).
    fewest = min(presets)
    res["per_break_key"] = key = f"T{min(token_counts(args))}_L{max(presets)}"
    for name in ("piecewise", "shared"):
        for suffix in ("", "_rounds"):
            res[f"{name}_host_us_per_break{suffix}"] = res[f"{name}_host_us_per_break_{key}{suffix}"]
    res["piecewise_executables_unshared"] = res[f"piecewise_executables_L{fewest}"]
    res["piecewise_executables_shared"] = res[f"piecewise_executables_shared_L{fewest}"]
    res["piecewise_distinct_structures"] = res[f"piecewise_structures_L{fewest}"]
    res["executables_layers"] = fewest
    res.update(pool_keys(args, min(presets)))
    return res


def targets(res: Dict[str, object]) -> List[Tuple[str, str, float]]:
    """The targets, for the presets the run has.

    Args:
        res: the results.
    """
    out = [("piecewise_host_us_per_break", "<=", 2.0)]
    out += [(f"piecewise_run_vs_common_T16_L{layers}", ">=", 1.15) for layers in res["_rows"]]
    return out + [("piecewise_run_vs_eager_T16_L32", ">=", 4.0), ("piecewise_pool_ratio", "<=", 1.02),
                  ("piecewise_executables_shared", "<=", res["piecewise_distinct_structures"])]


def table(res: Dict[str, object]) -> str:
    """The text report: per preset a row per T, the speedups, executables and pool lines, the targets.

    Args:
        res: the results.
    """
    out = [f"{res['gpu']}, torch {res['torch']}, ragged steps of {res['requests']} requests (T if fewer), attention "
           f"a break op (torch's flash varlen kernel, the longest request from the host split); {res['rounds']} "
           "rounds", "",
           "step wall us (host us), synchronised per step; noop: the full graph with a break that does nothing after "
           "every layer's attention"]
    for layers, rows in res["_rows"].items():
        out.append(f"{layers} layers")
        out.append(f"{'T':>6} " + " ".join(f"{n:>20}" for n in CONTENDERS) + "   piecewise speedup over "
                   "common / eager / full")
        for r in rows:
            key = f"T{r['tokens']}_L{layers}"
            cells = " ".join(f"{r[n + '_wall_us']:>11.1f} ({r[n + '_host_us']:>6.1f})" for n in CONTENDERS)
            speedups = " / ".join(f"{res[f'piecewise_run_vs_{o}_{key}']:.2f}" for o in ("common", "eager", "full"))
            out.append(f"{r['tokens']:>6} {cells}   {speedups}")
        big = max(r["tokens"] for r in rows)
        out.append(f"  size {big}: {res[f'piecewise_executables_L{layers}']} executables (one a segment), "
                   f"{res[f'piecewise_executables_shared_L{layers}']} shared, "
                   f"{res[f'piecewise_structures_L{layers}']} distinct structures; executables' memory "
                   f"{res[f'piecewise_exec_mib_T{big}_L{layers}']:.1f} MiB against the full graph's "
                   f"{res[f'full_exec_mib_T{big}_L{layers}']:.1f}; every size's: "
                   f"{res[f'unshared_exec_mib_L{layers}']:.1f} MiB unshared, "
                   f"{res[f'shared_exec_mib_L{layers}']:.1f} MiB shared")
        out.append("")
    out += [f"pool MiB ({res['pool_layers']} layers): piecewise decode + ragged runners together "
            f"{res['piecewise_pool_mib_together']:.1f}, the largest piecewise size alone "
            f"{res['piecewise_pool_mib_largest_alone']:.1f}; the family's {res['piecewise_family_executables']} "
            f"executables take {res['piecewise_family_exec_mib']:.1f} MiB besides",
            "  " + segment_line(res["piecewise_pool_segments_mib_together"], res["piecewise_pool_segments_mib_alone"]),
            f"executables a size ({res['executables_layers']} layers, largest T): "
            f"{res['piecewise_executables_unshared']} unshared (one a segment), "
            f"{res['piecewise_executables_shared']} with share_segments ({res['piecewise_distinct_structures']} "
            f"distinct structures)",
            f"a break's host us ({res['per_break_key']}, where the most breaks average it): "
            f"{res['piecewise_host_us_per_break']:.2f} unshared, {res['shared_host_us_per_break']:.2f} shared",
            ""]
    targeted = targets(res)
    out += target_header(res.get("_changed", [])) + target_lines(res, targeted)
    names = ("piecewise_run_vs_common", "full_run_vs_common", "noop_run_vs_common", "piecewise_run_vs_eager",
             "piecewise_run_vs_full", "piecewise_host_us_per_break", "shared_host_us_per_break")
    out += reported_lines(res, [key for layers, rows in res["_rows"].items() for name in names
                                for key in (f"{name}_T{r['tokens']}_L{layers}" for r in rows)
                                if key not in (t[0] for t in targeted)])
    return "\n".join(out)


def plot(res: Dict[str, object], path: Path) -> None:
    """Draws, into the PNG at `path`, each contender's wall and host time per T on every preset of `res`, and
    piecewise's speedup over the common pattern, eager and the full graph."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    fig, (wall, host, speedup) = pyplot.subplots(1, 3, figsize=(18, 5))
    for (layers, rows), style in zip(res["_rows"].items(), ("-", "--")):
        tokens = [r["tokens"] for r in rows]
        for index, name in enumerate(CONTENDERS):
            for ax, part in ((wall, "wall"), (host, "host")):
                ax.plot(tokens, [r[f"{name}_{part}_us"] for r in rows], style, color=f"C{index}", marker="o",
                        label=f"{name} ({layers} layers)")
        for other in ("common", "eager", "full"):
            speedup.plot(tokens, [res[f"piecewise_run_vs_{other}_T{t}_L{layers}"] for t in tokens], style,
                         color=f"C{CONTENDERS.index(other)}", marker="o", label=f"over {other} ({layers} layers)")
    speedup.axhline(1.0, color="k", lw=0.8)
    titles = ("step wall time (us)", "host time per step (us)", "piecewise speedup (other's wall / piecewise's)")
    for ax, title in zip((wall, host, speedup), titles):
        ax.set(title=title, xlabel="tokens T", xscale="log", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"graphrunner piecewise steps on {res['gpu']} (attention a break op)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the benchmark and writes bench-<gpu>-piecewise.json, .txt and .png; 2 where no GPU is visible.

    Args:
        argv: the command line; None reads sys.argv.
    """
    return bench_main(argv, "graphrunner_workloads.piecewise_bench", parse_args, run, table, plot, "piecewise")


if __name__ == "__main__":
    sys.exit(main())
