"""Break ops that break gr.breaking_op's contract (issue #34), each with its fixed twin. The step, `Scaled`, is
two segments around one break op: segment 0 computes h = 2x + 1, the op writes 3h into the boundary buffer out=,
segment 1 returns tanh(out) + h. Both bugs are right eagerly, and capture accepts both ops.

- "fresh": the class of vLLM #37363 and #53915, a piece's producer whose result lands in fresh memory. The op's
  replay path (step set: it has the step's host counts and zeroes the padding rows) computes its result into a
  fresh tensor and returns None; eagerly, and so once at capture (step None), it writes out=. Every replay's next
  segment then reads out= as whatever last wrote that memory. Fixed twin: the replay path writes out= too.
- "past": the op's kernel writes whole tiles of TILE rows from out='s start (rows past the step's hold 0). The
  model sizes out= for the tiles eagerly, but for the step's rows in a graph (its capture branch), so every
  replay writes up to TILE - 1 rows past out= into whatever the pool put there. Fixed twin: out= sized for the
  tiles in the graph too.

The common runner's piecewise form (`CommonPieces`: the hand-written pattern, a torch.cuda.CUDAGraph per segment, sizes
largest first into one pool, the op called eagerly between them on the tensors captured, as vLLM's piecewise
backend replays its pieces) gives no error for either. validate(scrub=True, guard=True) names the op, the size and
the buffer (graphrunner.break_checks); the fixed twins pass.

    python -m graphrunner_workloads.reproductions.piecewise --common --case fresh [--fixed]   # a RESULT line
    python -m graphrunner_workloads.reproductions.piecewise --checked --case past [--fixed]
"""
from __future__ import annotations

import random
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import graphrunner as gr
from graphrunner.testing import relative_error
from graphrunner_workloads.memory import raw_bytes
from graphrunner_workloads.reproductions import child_main, validated

WIDTH = 16
SIZES = [8, 16, 32, 48]
TILE = 64  # rows the "past" op's kernel writes at a time
INPUTS = {"x": gr.StaticInput((WIDTH,), torch.float32)}
CASES = {"fresh": "a break op leaving out= unwritten on replay (its result in fresh memory; vllm #37363, #53915)",
         "past": "a break op writing past out= (its kernel writes whole 64-row tiles; out= sized for the step's rows)"}


def tiled(rows: int) -> int:
    """`rows` rounded up to whole tiles.

    Args:
        rows: the step's rows.
    """
    return -(-rows // TILE) * TILE


def _scale(x: torch.Tensor, out: torch.Tensor, step: Optional[gr.StepInfo]) -> None:
    """3x into out=, the padding rows (past a replayed step's tokens) zeroed."""
    rows = x.shape[0] if step is None else step.tokens
    torch.mul(x[:rows], 3, out=out[:rows])
    out[rows:].zero_()


@gr.breaking_op(name="scale_fresh")
def scale_fresh(x: torch.Tensor, *, out: torch.Tensor, step: Optional[gr.StepInfo]) -> None:
    """The "fresh" bug: replayed, the result goes into a fresh tensor (and the op returns None).

    Args:
        x: h, from the segment before.
        out: the boundary buffer.
        step: the StepInfo while replaying, None outside a replay.
    """
    if step is None:
        _scale(x, out, None)
        return
    result = torch.zeros_like(x)  # the bug: the replay path's result never reaches out=
    torch.mul(x[: step.tokens], 3, out=result[: step.tokens])


@gr.breaking_op(name="scale_into")
def scale_into(x: torch.Tensor, *, out: torch.Tensor, step: Optional[gr.StepInfo]) -> None:
    """scale_fresh's fixed twin: every path writes out=.

    Args:
        x: h, from the segment before.
        out: the boundary buffer.
        step: the StepInfo while replaying, None outside a replay.
    """
    _scale(x, out, step)


@gr.breaking_op(name="tile_scale")
def tile_scale(x: torch.Tensor, *, out: torch.Tensor, step: Optional[gr.StepInfo]) -> torch.Tensor:
    """3x by a kernel that writes whole tiles of TILE rows from out='s start, whatever out='s rows (its rows past
    x's get 0): out= must hold tiled(rows) rows.

    Args:
        x: h, from the segment before.
        out: the boundary buffer.
        step: unused: the op is the same eagerly and replayed.
    """
    rows = x.shape[0]
    tiles = raw_bytes(out.data_ptr(), tiled(rows) * WIDTH * out.element_size(), out.device).view(out.dtype)
    tiles = tiles.view(tiled(rows), WIDTH)  # the kernel's view: its tiles at out='s address
    torch.mul(x, 3, out=tiles[:rows])
    tiles[rows:].zero_()
    return out


class Scaled(torch.nn.Module):
    """fn(x [B, WIDTH]) -> [B, WIDTH]: tanh(3h) + h, h = 2x + 1, with 3h computed by a break op (the module's
    docstring).

    Args:
        case: "fresh" or "past" (CASES).
        fixed: the fixed twin.
    """

    def __init__(self, case: str, fixed: bool = False) -> None:
        super().__init__()
        if case not in CASES:
            raise ValueError(f"case must be one of {sorted(CASES)}, got {case!r}")
        self.case, self.fixed = case, fixed
        # The op segment 0 hands h to: CommonPieces swaps it while it captures by hand.
        self.op: Callable[..., Any] = tile_scale if case == "past" else scale_into if fixed else scale_fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2 + 1
        rows = x.shape[0]
        if self.case == "past":
            # The bug: a graph sizes the boundary buffer for the step's rows, not for the tiles the kernel writes.
            graph_path = torch.cuda.is_current_stream_capturing() and not self.fixed
            out = torch.empty(rows if graph_path else tiled(rows), WIDTH, device=x.device)
        else:
            out = torch.empty_like(h)
        self.op(h, out=out)
        return torch.tanh(out[:rows]) + h


class CommonPieces:
    """The hand-written piecewise pattern (the module's docstring): per size, a torch.cuda.CUDAGraph per segment,
    captured largest first into one pool after an eager warm-up, the break op's calls kept with the tensors
    captured; a step copy_'s x into a static buffer (padding rows keep the last step's values), replays segment 0,
    calls the op eagerly with the step's StepInfo, replays segment 1, and returns a view of the output.

    Args:
        model: a Scaled step.
        sizes: the batch sizes to capture.
    """

    def __init__(self, model: Scaled, sizes: List[int]) -> None:
        self.model, self.sizes, self.op = model, sorted(sizes), model.op
        self.static = torch.zeros(self.sizes[-1], WIDTH, device="cuda")
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.pieces: Dict[int, Tuple[List[torch.cuda.CUDAGraph], List[Tuple[Tuple[Any, ...], torch.Tensor]]]] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for size in reversed(self.sizes):
                self._capture(size)

    def _capture(self, size: int) -> None:
        x = self.static[:size]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.model(x)  # the warm-up, eagerly
        torch.cuda.synchronize()
        graphs: List[torch.cuda.CUDAGraph] = []
        calls: List[Tuple[Tuple[Any, ...], torch.Tensor]] = []

        def begin() -> None:
            graphs.append(torch.cuda.CUDAGraph())
            graphs[-1].capture_begin(pool=self.pool)

        def split(*args: Any, out: torch.Tensor) -> torch.Tensor:
            graphs[-1].capture_end()
            calls.append((args, out))
            begin()
            return out

        self.model.op = split
        try:
            with torch.cuda.stream(self.stream):
                begin()
                self.outputs[size] = self.model(x)
                graphs[-1].capture_end()
        finally:
            self.model.op = self.op
        torch.cuda.current_stream().wait_stream(self.stream)
        self.pieces[size] = (graphs, calls)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        self.static[:batch].copy_(x)
        info = gr.StepInfo(batch, size, batch, size, {"x": self.static[:size]}, {"x": x})
        graphs, calls = self.pieces[size]
        graphs[0].replay()
        for (args, out), graph in zip(calls, graphs[1:]):
            self.op.fn(*args, out=out, step=info)  # the op itself, eagerly, on the tensors captured
            graph.replay()
        return self.outputs[size][:batch]

    def close(self) -> None:
        """Destroys the graphs."""
        for graphs, _ in self.pieces.values():
            for graph in graphs:
                graph.reset()
        self.pieces, self.outputs = {}, {}


def common(case: str, fixed: bool = False) -> str:
    """The common runner's piecewise form: interleaved steps against eager, then whether a size-8 replay changes
    size 48's live output.

    Args:
        case: "fresh" or "past".
        fixed: the fixed twin.
    """
    model = Scaled(case, fixed)
    runner = CommonPieces(model, SIZES)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rng = random.Random(0)
    wrong, worst, steps = 0, 0.0, 40
    for _ in range(steps):
        x = torch.randn(rng.randint(1, max(SIZES)), WIDTH, generator=gen, device="cuda")
        with torch.no_grad():
            err = relative_error(runner(x).clone(), model(x))
        worst = max(worst, err) if err == err else float("nan")
        wrong += not err <= 1e-5
    big = runner(torch.randn(48, WIDTH, generator=gen, device="cuda")).clone()
    runner(torch.randn(8, WIDTH, generator=gen, device="cuda"))
    torch.cuda.synchronize()
    clobbered = not torch.equal(runner.outputs[48], big)
    runner.close()
    return (f"{wrong}/{steps} interleaved steps wrong (worst relative error {worst:.3g}), no error raised; size 48's "
            f"live output {'overwritten' if clobbered else 'intact'} after a size-8 replay")


def make_runner(case: str, fixed: bool = False) -> gr.GraphRunner:
    """The reproduction's GraphRunner, captured.

    Args:
        case: "fresh" or "past".
        fixed: the fixed twin.
    """
    runner = gr.GraphRunner(Scaled(case, fixed), INPUTS, capture_sizes=SIZES, no_grad=True)
    runner.capture()
    return runner


def checked(case: str, fixed: bool = False) -> str:
    """graphrunner's validate(scrub=True, guard=True): what it names, or that it passed.

    Args:
        case: "fresh" or "past".
        fixed: the fixed twin.
    """
    return validated(make_runner(case, fixed))


def main(argv: Optional[List[str]] = None) -> int:
    """Prints one RESULT line (hazards.py's child protocol) for --common or --checked, of --case, buggy or --fixed.

    Args:
        argv: the command line; None reads sys.argv.
    """
    return child_main(argv, __doc__, common, checked, "the common runner's piecewise form", CASES)


if __name__ == "__main__":
    sys.exit(main())
