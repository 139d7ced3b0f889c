"""`validate(isolate=True)`: run the hazard checks in a child process.

A graph that faults (an illegal address from a stale index, say) poisons the CUDA context of the process that
replays it. The child builds a runner from the same frozen spec, captures and validates it, and reports back;
the caller's context survives whatever the child meets.
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable, Dict

import torch.multiprocessing as mp

from graphrunner.errors import GraphHazardError
from graphrunner.validate import ValidationReport

CHILD_TIMEOUT_S = 600


def _child(build: Callable[[Any], Any], spec: Any, options: Dict[str, Any], results: Any) -> None:
    try:
        runner = build(spec)
        runner.capture()
        results.put(("ok", runner.validate(**options)))
    except GraphHazardError as exc:
        results.put(("hazard", (str(exc), exc.size, exc.buffer, exc.offset, exc.runner, exc.owner, exc.overrun,
                                exc.op)))
    except BaseException as exc:  # report anything, then let the process end
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def validate_in_child(build: Callable[[Any], Any], spec: Any, **options: Any) -> ValidationReport:
    """Builds `build(spec)` in a spawned child, captures it and returns its `validate(**options)`.

    Args:
        build: makes the runner from the spec (GraphRunner.from_spec); it must be picklable.
        spec: the runner's RunnerSpec, without its pool (a pool id means nothing in another process).
        options: validate()'s keyword arguments.
    """
    for name, value in [*((f.name, getattr(spec, f.name)) for f in dataclasses.fields(spec)),
                        ("make_inputs", options.get("make_inputs"))]:
        try:
            pickle.dumps(value)
        except Exception as exc:
            raise TypeError(f"validate(isolate=True) rebuilds the runner in a child process, so {name} must be "
                            f"picklable (a module-level function, a functools.partial of one, or an nn.Module): "
                            f"{exc}") from exc
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_child, args=(build, spec, options, results), daemon=True)
    child.start()
    try:
        kind, payload = results.get(timeout=CHILD_TIMEOUT_S)
    except Exception:
        child.kill()
        raise GraphHazardError(f"the validation child gave no answer in {CHILD_TIMEOUT_S} s "
                               f"(exit code {child.exitcode}); a graph may hang or have killed the process")
    finally:
        child.join(timeout=30)
    if kind == "ok":
        return payload
    if kind == "hazard":
        message, size, buffer, offset, runner, owner, overrun, op = payload
        raise GraphHazardError(message, size=size, buffer=buffer, offset=offset, runner=runner, owner=owner,
                               overrun=overrun, op=op)
    raise GraphHazardError(f"validation in the child process failed: {payload}")
