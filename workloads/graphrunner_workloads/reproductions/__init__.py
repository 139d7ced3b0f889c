"""Step functions that are correct in eager mode but unsafe in a shared graph pool, each with its fixed twin:
the hazard demo (graphrunner_workloads.hazards) and the tests use them. The CUDA ops build on first use."""
from __future__ import annotations

import argparse
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import graphrunner as gr
from graphrunner_workloads.reproductions import paged

PLANES = 16  # entries per row the metadata kernel writes
HERE = Path(__file__).parent


@functools.lru_cache(None)
def ops():
    from torch.utils.cpp_extension import load

    return load(name="graphrunner_hazard_ops", sources=[str(HERE / "hazard_ops.cu")], verbose=False)


def validated(runner: gr.GraphRunner, **options: object) -> str:
    """What runner.validate(scrub=True, guard=True, steps_per_size=3, **options) names, or that it passed, as a
    line of the hazard demo; the runner is closed after.

    Args:
        runner: a captured runner of a reproduction (buggy or its fixed twin).
        options: further validate() arguments (make_inputs=..., say).
    """
    try:
        return f"validate passed: {runner.validate(scrub=True, guard=True, steps_per_size=3, **options)}"
    except gr.GraphHazardError as exc:
        return f"GraphHazardError: {exc}"
    finally:
        runner.close()


def child_main(argv: Optional[List[str]], description: str, common: Callable[..., str], checked: Callable[..., str],
               runner: str, cases: Optional[Dict[str, str]] = None) -> int:
    """A reproduction's command line (hazards.py's child protocol): prints one RESULT line, of `common` or `checked`
    called as f(case, fixed) where the reproduction has cases, else f(fixed).

    Args:
        argv: the command line; None reads sys.argv.
        description: the reproduction module's docstring.
        common: what --common runs (the common runner's form for the reproduction).
        checked: what --checked runs (graphrunner's validate(scrub=True, guard=True)).
        runner: how --common's help names that runner.
        cases: the reproduction's cases (name -> what it is), chosen by --case; None: one case.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--common", action="store_true", help=runner)
    p.add_argument("--checked", action="store_true", help="graphrunner's validate(scrub=True, guard=True)")
    if cases is not None:
        p.add_argument("--case", choices=sorted(cases), required=True, help="which bug")
    p.add_argument("--fixed", action="store_true", help="the fixed twin")
    args = p.parse_args(argv)
    if args.common == args.checked:
        p.error("pass one of --common, --checked")
    which = [args.case] if cases is not None else []
    print("RESULT", (common if args.common else checked)(*which, args.fixed), flush=True)
    return 0


def capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def under_allocated(x):
    """1. The graph path sizes per-row metadata for one entry per row; its kernel writes PLANES per row."""
    rows = x.shape[0] if capturing() else x.shape[0] * PLANES
    meta = torch.empty(rows, dtype=torch.int32, device=x.device)
    return ops().planes_op(x, meta, PLANES)


def under_allocated_fixed(x):
    meta = torch.empty(x.shape[0] * PLANES, dtype=torch.int32, device=x.device)
    return ops().planes_op(x, meta, PLANES)


def stale_counter(x):
    """2. The kernel resets its counter on exit, so the graph path skips zeroing a workspace it allocates
    inside the call; in a shared pool other sizes' intermediates overwrite it between replays."""
    h = x * 2
    counter = torch.empty(2, dtype=torch.int32, device=x.device)
    if not capturing():
        counter.zero_()
    return ops().counter_op(h, counter) + h


def stale_counter_fixed(x):
    h = x * 2
    counter = gr.workspace("tests.stale_counter", 8, zero=True)
    return ops().counter_op(h, counter) + h


class CachedTable:
    """3. A table cached on first use inside a capture: it lives in the pool and only the first captured
    graph computes it; every other size reads whatever the memory holds when it replays."""

    def __init__(self):
        self.table = None

    def __call__(self, x):
        if capturing():
            if self.table is None:
                self.table = fill_table(torch.empty(x.shape[1], device=x.device))
            table = self.table
        else:
            table = fill_table(torch.empty(x.shape[1], device=x.device))
        return x + table


def fill_table(t):
    torch.arange(t.numel(), out=t)
    return t.mul_(0.1).sin_().add_(2)


def cached_table_fixed(x):
    table = gr.workspace("tests.table", x.shape[1] * 4, init=lambda t: fill_table(t.view(torch.float32)))
    return x + table.view(torch.float32)


@dataclass(frozen=True)
class Reproduction:
    buggy: Callable[[], Callable]  # each makes the step function
    fixed: Callable[[], Callable]
    inputs: Dict[str, gr.StaticInput]
    needs: Optional[str] = None  # a module it needs, where not every machine has it

    def missing(self) -> Optional[str]:
        """Why it cannot run here, or None."""
        if self.needs and not installed(self.needs):
            return f"needs {self.needs}, which is not installed"
        return None


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


SIZES = [1, 2, 4, 8, 16, 32, 64]
WIDTH = 8
INPUTS = {"x": gr.StaticInput((WIDTH,), torch.float32)}

REPRODUCTIONS = {
    "under-allocated metadata": Reproduction(lambda: under_allocated, lambda: under_allocated_fixed, INPUTS),
    "stale workspace counter": Reproduction(lambda: stale_counter, lambda: stale_counter_fixed, INPUTS),
    "capture-allocated cache": Reproduction(CachedTable, lambda: cached_table_fixed, INPUTS),
    "under-allocated page table (flash-attn 4)": Reproduction(
        lambda: paged.PagedDecode(fixed=False), lambda: paged.PagedDecode(fixed=True), paged.INPUTS,
        needs="flash_attn.cute"),
}


def make(name: str, fixed: bool = False):
    repro = REPRODUCTIONS[name]
    return (repro.fixed if fixed else repro.buggy)()
