"""The seed's class (sglang issue 26532: metadata sized for the batch, not batch x steps) in a ragged graph: a
varlen backend's per-token metadata sized for the step's requests instead of its tokens.

Varlen attention backends build a token -> request map each step (the request of every packed token, from the
cumulative query lengths) into a buffer their kernels read through a raw pointer. Here the graph path sizes that
buffer for one entry per request, as the decode graphs it was first written for have one token per request; eager
steps size it for the tokens. A ragged graph of T tokens over R requests then writes T entries into a buffer of R:
at T = 16 and 64 the allocator's 512-byte rounding hides it, at T = 256 and 1024 the map runs 1.5 and 7.5 KiB past
the buffer into whatever the pool put there. The step reads back what it wrote, so its own output is right: the
common runner stays silent while another graph's memory is overwritten (or faults, if the write leaves the pool's
segment). validate(scrub=True, guard=True) names the size, the buffer written and its owner; the fixed twin, sized
for the tokens, passes.

    python -m graphrunner_workloads.reproductions.ragged --common [--fixed]   # RESULT lines, as hazards.py reads
    python -m graphrunner_workloads.reproductions.ragged --checked [--fixed]
"""
from __future__ import annotations

import random
import sys
from typing import Dict, List, Optional

import torch

import graphrunner as gr
from graphrunner.testing import relative_error
from graphrunner_workloads.memory import raw_bytes
from graphrunner_workloads.reproductions import child_main, validated
from graphrunner_workloads.ragged import SPLIT, CommonRaggedRunner

WIDTH = 8
SIZES = [16, 64, 256, 1024]  # token counts
MAX_REQUESTS = 8
INPUTS = {"x": gr.StaticInput((WIDTH,), torch.float32, per_token=True),
          SPLIT: gr.StaticInput((), torch.int32, pad=0, low=1, high=max(SIZES) + 1)}


class TokenMap(torch.nn.Module):
    """fn(x [T, WIDTH], query_lens [R]) -> [R, WIDTH]: each request's tokens summed through the token -> request
    map, plus its last token's row. Correct eagerly; in a graph, `fixed=False` sizes the map for R entries.

    Args:
        fixed: size the map for the tokens in the graph path too.
    """

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed = fixed

    def forward(self, x: torch.Tensor, query_lens: torch.Tensor) -> torch.Tensor:
        tokens, requests = x.shape[0], query_lens.shape[0]
        ends = torch.cumsum(query_lens, 0)
        token_index = torch.arange(tokens, device=x.device)
        weighted = x * (token_index < ends[-1]).to(x.dtype)[:, None]  # padding tokens are no request's
        out = x[(ends - 1).clamp(min=0)]
        # Everything else is allocated before the map, so the map's entries stay as written until read back.
        capturing = torch.cuda.is_current_stream_capturing()
        entries = tokens if self.fixed or not capturing else requests  # the bug: one entry per request
        buffer = torch.empty(entries, dtype=torch.long, device=x.device)
        # The metadata kernel's view: one entry per token at the buffer's address, whatever its size.
        request = raw_bytes(buffer.data_ptr(), tokens * 8, x.device).view(torch.long)
        torch.searchsorted(ends, token_index, right=True, out=request)
        out.index_add_(0, request.clamp_(max=requests - 1), weighted)
        del buffer  # kept alive until the kernels that read it are queued
        return out


def random_step(tokens: int, requests: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """One step of `tokens` tokens over `requests` requests (a random split, each >= 1): make_inputs for validate.

    Args:
        tokens: the step's tokens.
        requests: the step's requests (<= tokens).
        gen: the generator; its device is where x goes (the split stays on the CPU).
    """
    cuts = sorted(random.Random(int(torch.randint(0, 2 ** 31, (1,), generator=gen, device=gen.device)))
                  .sample(range(1, tokens), requests - 1))
    lens = [b - a for a, b in zip([0] + cuts, cuts + [tokens])]
    return {"x": torch.randn(tokens, WIDTH, generator=gen, device=gen.device),
            SPLIT: torch.tensor(lens, dtype=torch.int32)}


def make_runner(fixed: bool = False) -> gr.GraphRunner:
    """The reproduction's ragged runner, captured.

    Args:
        fixed: the fixed twin (the map sized for the tokens).
    """
    runner = gr.GraphRunner(TokenMap(fixed), INPUTS, capture_sizes=SIZES, split=SPLIT, max_requests=MAX_REQUESTS,
                            name="mixed")
    runner.capture()
    return runner


def eager(fn: TokenMap, step: Dict[str, torch.Tensor]) -> torch.Tensor:
    """`fn` on `step` eagerly, its split moved to the GPU (as the runner stages it).

    Args:
        fn: the step.
        step: its inputs (the split on the CPU).
    """
    return fn(**dict(step, **{SPLIT: step[SPLIT].cuda()}))


def common(fixed: bool = False) -> str:
    """The common runner's ragged form (torch.cuda.CUDAGraph per T, copy_ staging: ragged.CommonRaggedRunner):
    interleaved steps against eager, then whether a size-256 replay overwrites size 1024's live output.

    Args:
        fixed: the fixed twin.
    """
    fn = TokenMap(fixed)
    gen = torch.Generator(device="cuda").manual_seed(0)
    runner = CommonRaggedRunner(fn, INPUTS, SIZES, MAX_REQUESTS)
    rng = random.Random(0)
    wrong, worst, steps = 0, 0.0, 40
    for _ in range(steps):
        size = rng.choice(SIZES)
        tokens = rng.randint(max(1, size // 4), size)
        step = random_step(tokens, rng.randint(1, min(tokens, MAX_REQUESTS)), gen)
        err = relative_error(runner(**step).clone(), eager(fn, step))
        worst, wrong = max(worst, err), wrong + (not err <= 1e-5)
    big = runner(**random_step(1024, 8, gen)).clone()
    runner(**random_step(256, 8, gen))
    torch.cuda.synchronize()
    clobbered = not torch.equal(runner.outputs[1024][:8], big)
    runner.close()
    return (f"{wrong}/{steps} interleaved steps wrong (worst relative error {worst:.3g}); size 1024's live output "
            f"{'overwritten' if clobbered else 'intact'} after a size-256 replay")


def checked(fixed: bool = False) -> str:
    """graphrunner's validate(scrub=True, guard=True) on the ragged runner: what it names, or that it passed.

    Args:
        fixed: the fixed twin.
    """
    return validated(make_runner(fixed), make_inputs=random_step)


def main(argv: Optional[List[str]] = None) -> int:
    """Prints one RESULT line (hazards.py's child protocol) for --common or --checked, buggy or --fixed.

    Args:
        argv: the command line; None reads sys.argv.
    """
    return child_main(argv, __doc__, common, checked, "the common runner's ragged form")


if __name__ == "__main__":
    sys.exit(main())
