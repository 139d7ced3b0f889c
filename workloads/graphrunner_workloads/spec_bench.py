"""`python -m graphrunner_workloads.spec_bench` (run by `make bench`): speculative decoding, verify + draft, for
graphrunner, the common runner pattern and eager, in one process.

A trace of rounds whose batch follows a random walk over 1..max and whose acceptance lengths are random (the
benchmark measures the runners, not the draft's quality). Every contender runs the same rounds:
- graphrunner: the verify and draft runners of spec_decode.py in one pool; each round's metadata (positions,
  lengths, KV slots, page rows per token) is computed inside the graphs from the per-request state;
- common runner: torch.cuda.CUDAGraph per size and runner in one pool, copy_ staging, padding rows zeroed, and
  the metadata built in Python per round as engines do today, staged as inputs;
- eager: the graphrunner step modules, run eagerly.
Each runs synchronised (the host waits for every round) and pipelined (no wait inside the trace: acceptance
stays on the device). Writes bench-<gpu>-spec.json, .txt and .png into --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

import graphrunner as gr
from graphrunner_workloads.bench import (DEFAULT_ATTENTION, add_output_arguments, attention_suffix, gpu_missing,
                                         gpu_tag, save_results, target_lines)
from graphrunner_workloads.common_runner import CommonRunner
from graphrunner_workloads.decoder import ATTENTION_BACKENDS, Decoder, DecoderConfig, kv_slot
from graphrunner_workloads.spec_decode import DraftStep, SpecConfig, VerifyStep, make_models, make_runners
from graphrunner_workloads.traces import medians, round_ratios

MiB = 1024 * 1024
REPEATS = 3  # turns of every contender over the trace, per regime


class VerifyFromMetadata(torch.nn.Module):
    """The common runner's verify graph: every token's position and page row come in as inputs."""

    def __init__(self, target: Decoder) -> None:
        super().__init__()
        self.target = target

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, page_rows: torch.Tensor) -> torch.Tensor:
        return self.target(input_ids, positions, (positions + 1).int(), page_rows).argmax(-1)


class DraftFromMetadata(torch.nn.Module):
    """The common runner's draft graph: every step's positions and KV slots come in as inputs [requests, steps]."""

    def __init__(self, draft: Decoder, steps: int) -> None:
        super().__init__()
        self.draft, self.steps = draft, steps

    def forward(self, last: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                page_table: torch.Tensor) -> torch.Tensor:
        token, proposed = last, []
        for k in range(self.steps):
            logits = self.draft(token, positions[:, k], (positions[:, k] + 1).int(), page_table, kv_slots=slots[:, k])
            token = logits.argmax(-1)
            proposed.append(token)
        return torch.stack(proposed, 1)


class Trace:
    """Per-request state for max_batch requests, and the batch of each round."""

    def __init__(self, cfg: SpecConfig, rounds: int, seed: int = 1) -> None:
        t, self.cfg = cfg.target, cfg
        walk, batch = [], max(1, t.max_batch_size // 2)
        order = torch.Generator().manual_seed(seed)
        for _ in range(rounds):
            batch = min(t.max_batch_size, max(1, batch + int(torch.randint(-3, 4, (1,), generator=order))))
            walk.append(batch)
        self.batches = walk
        self.limit = t.cache_len - cfg.steps - 1

    def reset(self) -> None:
        t = self.cfg.target
        gen = torch.Generator(device="cuda").manual_seed(3)
        self.gen = gen
        self.last = torch.randint(0, t.vocab, (t.max_batch_size,), generator=gen, device="cuda")
        self.start = torch.randint(0, self.limit, (t.max_batch_size,), generator=gen, device="cuda")
        pages = torch.arange(1, 1 + t.max_batch_size * t.pages_per_seq, device="cuda", dtype=torch.int32)
        self.page_table = pages.view(t.max_batch_size, t.pages_per_seq)
        self.made = torch.zeros((), dtype=torch.long, device="cuda")

    def advance(self, batch: int, checked: torch.Tensor) -> None:
        """Random acceptance on the device: 0..steps draft tokens accepted, plus the target's own."""
        made = torch.randint(1, self.cfg.steps + 2, (batch,), generator=self.gen, device="cuda")
        start = self.start[:batch]
        start.copy_((start + made) % self.limit)
        self.last[:batch].copy_(checked.view(batch, -1)[:, 0])
        self.made += made.sum()


Round = Callable[[Trace, int], None]


def in_graph_round(verify: Callable[..., Dict[str, torch.Tensor]],
                   drafter: Callable[..., Dict[str, torch.Tensor]]) -> Round:
    """A round whose metadata the steps compute themselves: graphrunner's runners, or the step modules eagerly."""
    @torch.no_grad()
    def run(trace: Trace, batch: int) -> None:
        last, start, pt = trace.last[:batch], trace.start[:batch], trace.page_table[:batch]
        proposed = drafter(last=last, start=start, page_table=pt)["tokens"]
        checked = verify(input_ids=torch.cat([last[:, None], proposed], 1).flatten(), start=start, page_table=pt)
        trace.advance(batch, checked["tokens"])
    return run


def common_round(cfg: SpecConfig, verify: CommonRunner, drafter: CommonRunner) -> Round:
    steps, tokens, page_size = cfg.steps, cfg.steps + 1, cfg.target.page_size
    draft_offsets = torch.arange(steps, device="cuda")
    verify_offsets = torch.arange(tokens, device="cuda")

    def run(trace: Trace, batch: int) -> None:
        last, start, pt = trace.last[:batch], trace.start[:batch], trace.page_table[:batch]
        positions = start[:, None] + draft_offsets  # the engine's per-round metadata, built in Python
        slots = kv_slot(pt.repeat_interleave(steps, 0), positions.flatten(), page_size).view(batch, steps)
        proposed = drafter(last=last, positions=positions, slots=slots, page_table=pt)
        verify_positions = (start[:, None] + verify_offsets).flatten()
        checked = verify(input_ids=torch.cat([last[:, None], proposed], 1).flatten(), positions=verify_positions,
                         page_rows=pt.repeat_interleave(tokens, 0))
        trace.advance(batch, checked)
    return run


def timed_trace(trace: Trace, run: Round, synced: bool, rounds: int) -> float:
    """Tokens per second over the first `rounds` rounds of the trace."""
    trace.reset()
    stream = torch.cuda.current_stream()
    for batch in trace.batches[:5]:  # warm-up: allocator and caches
        run(trace, batch)
    stream.synchronize()
    trace.reset()
    start = time.perf_counter()
    for batch in trace.batches[:rounds]:
        run(trace, batch)
        if synced:
            stream.synchronize()
    made = int(trace.made)  # waits for the device
    return made / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> Dict[str, object]:
    target_cfg = DecoderConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, head_dim=args.head_dim,
                               intermediate=args.intermediate, vocab=args.vocab, cache_len=args.cache_len,
                               page_size=16, max_batch_size=args.max_batch_size, attention=args.attn)
    cfg = SpecConfig(target=target_cfg, draft_layers=args.draft_layers, steps=args.steps)
    target, draft = make_models(cfg)
    sizes = gr.default_capture_sizes(target_cfg.max_batch_size)
    res: Dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "spec_attention": target_cfg.attention, "spec_target_layers": cfg.target.layers,
                              "spec_draft_layers": cfg.draft_layers, "spec_steps": cfg.steps,
                              "spec_max_batch_size": target_cfg.max_batch_size, "spec_capture_sizes": len(sizes),
                              "spec_rounds": args.rounds}
    trace = Trace(cfg, args.rounds)

    # Pool memory: what the captures add to the pool, each runner alone in a fresh pool, then both together.
    alone_mib = []
    for which in (0, 1):
        runners = make_runners(cfg, target, draft, capture_sizes=sizes)
        alone_mib.append(runners[which].capture().pool_bytes / MiB)
        for r in runners:
            r.close()
    verify, drafter = make_runners(cfg, target, draft, capture_sizes=sizes)
    t0 = time.perf_counter()
    reports = gr.capture_all(verify, drafter)
    res["spec_capture_s_run"] = time.perf_counter() - t0
    together_mib = sum(r.pool_bytes for r in reports) / MiB
    res.update({"spec_pool_mib_together": together_mib, "spec_pool_mib_verify_alone": alone_mib[0],
                "spec_pool_mib_draft_alone": alone_mib[1], "spec_pool_ratio": together_mib / max(alone_mib)})

    t0 = time.perf_counter()
    pool, b, tokens = torch.cuda.graph_pool_handle(), target_cfg.max_batch_size, cfg.steps + 1
    zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device="cuda")  # noqa: E731
    common_verify = CommonRunner(VerifyFromMetadata(target), {
        "input_ids": zeros(b * tokens), "positions": zeros(b * tokens),
        "page_rows": zeros(b * tokens, target_cfg.pages_per_seq, dtype=torch.int32)},
        sizes, pool=pool, zero_padding=True)
    common_draft = CommonRunner(DraftFromMetadata(draft, cfg.steps), {
        "last": zeros(b), "positions": zeros(b, cfg.steps), "slots": zeros(b, cfg.steps),
        "page_table": zeros(b, target_cfg.pages_per_seq, dtype=torch.int32)}, sizes, pool=pool, zero_padding=True)
    torch.cuda.synchronize()
    res["spec_capture_s_common"] = time.perf_counter() - t0

    contenders = {"run": in_graph_round(verify, drafter),
                  "common": common_round(cfg, common_verify, common_draft),
                  "eager": in_graph_round(VerifyStep(target, cfg.steps + 1), DraftStep(draft, cfg.steps))}
    # The contenders take turns, REPEATS times (eager once: it is slow and no target reads it); the median is
    # reported and the spread kept.
    spread: Dict[str, List[float]] = {}
    for repeat in range(REPEATS):
        for mode, synced in (("synced", True), ("pipelined", False)):
            for name, round_fn in contenders.items():
                if name == "eager" and repeat:
                    continue
                rounds = args.rounds if name != "eager" else min(args.rounds, args.eager_rounds)
                spread.setdefault(f"spec_tokens_s_{name}_{mode}", []).append(
                    timed_trace(trace, round_fn, synced, rounds))
    res.update(medians(spread, "spec_spread"))
    for name in contenders:
        res[f"spec_tokens_s_{name}"] = res[f"spec_tokens_s_{name}_synced"]
    for mode in ("synced", "pipelined"):
        res[f"spec_run_vs_common_{mode}"] = res[f"spec_tokens_s_run_{mode}"] / res[f"spec_tokens_s_common_{mode}"]
        res[f"spec_run_vs_common_{mode}_rounds"] = round_ratios(spread, f"spec_tokens_s_run_{mode}",
                                                                f"spec_tokens_s_common_{mode}")
        res[f"spec_run_vs_eager_{mode}"] = res[f"spec_tokens_s_run_{mode}"] / res[f"spec_tokens_s_eager_{mode}"]
    verify.close()
    drafter.close()
    common_verify.close()
    common_draft.close()
    return res


TARGETS = [("spec_run_vs_common_synced", ">=", 1.10), ("spec_run_vs_common_pipelined", ">=", 1.03),
           ("spec_pool_ratio", "<=", 1.02)]


def table(res: Dict[str, object]) -> str:
    out = [f"{res['gpu']}, torch {res['torch']}: speculative decoding, target {res['spec_target_layers']} layers, "
           f"draft {res['spec_draft_layers']}, {res['spec_steps']} draft tokens a round, batch random walk over "
           f"1..{res['spec_max_batch_size']}, {res['spec_rounds']} rounds, random acceptance, attention "
           f"{res['spec_attention']}; tokens/s: median of {REPEATS} turns (eager: one)", "",
           f"{'tokens/s':<12} {'synchronised (spread)':>22}  {'pipelined (spread)':>22}"]
    for name, label in (("run", "graphrunner"), ("common", "common"), ("eager", "eager")):
        cells = []
        for mode in ("synced", "pipelined"):
            low, high = res["spec_spread"][f"spec_tokens_s_{name}_{mode}"]
            cells.append(f"{res[f'spec_tokens_s_{name}_{mode}']:>8.0f} ({low:.0f}-{high:.0f})")
        out.append(f"{label:<12} " + "  ".join(f"{c:>22}" for c in cells))
    out += ["", f"pool MiB: both runners together {res['spec_pool_mib_together']:.1f}, verify alone "
                f"{res['spec_pool_mib_verify_alone']:.1f}, draft alone {res['spec_pool_mib_draft_alone']:.1f}",
            f"capture: graphrunner (both runners) {res['spec_capture_s_run']:.2f} s, common runner "
            f"{res['spec_capture_s_common']:.2f} s", "", "targets (median; over rounds, side by side):"]
    return "\n".join(out + target_lines(res, TARGETS))


def plot(res: Dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("run", "graphrunner"), ("common", "common runner"), ("eager", "eager")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, (mode, label) in enumerate((("synced", "synchronised"), ("pipelined", "pipelined"))):
        ax.bar([j + i * width for j in range(3)], [res[f"spec_tokens_s_{n}_{mode}"] for n, _ in names], width,
               label=label)
    ax.set_xticks([j + width / 2 for j in range(3)], [label for _, label in names])
    ax.set(ylabel="tokens/s", title=f"speculative decoding on {res['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="target layers")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="draft tokens a round")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--attn", choices=ATTENTION_BACKENDS, default=DEFAULT_ATTENTION,
                   help="both models' attention over their paged caches")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--eager-rounds", type=int, default=300)
    add_output_arguments(p)
    return p.parse_args(argv)


def main(argv: List[str] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if gpu_missing("graphrunner_workloads.spec_bench"):
        return 2
    res = run(args)
    name = args.name or gpu_tag() + attention_suffix(args.attn)
    save_results(args.out, f"bench-{name}-spec", table(res), res, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
