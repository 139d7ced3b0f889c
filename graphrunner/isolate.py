"""`validate(isolate=True)`: run the hazard checks in a child process.

A graph that faults (an illegal address from a stale index, say) poisons the CUDA context of the process
that replays it. The child rebuilds the runner from the same recipe, captures and validates it, and
reports back; the caller's context survives whatever the child meets.
"""
from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any, Dict

import torch.multiprocessing as mp

from graphrunner.hazards import GraphHazardError, ValidationReport

if TYPE_CHECKING:
    from graphrunner.runner import GraphRunner

CHILD_TIMEOUT_S = 600


def _recipe(runner: "GraphRunner") -> Dict[str, Any]:
    return dict(fn=runner.fn, inputs=runner.inputs, max_batch_size=runner.max_batch_size,
                capture_sizes=runner.capture_sizes, warmup=runner.warmup, fallback=runner.fallback,
                no_grad=runner.no_grad, device=runner.device, capture_error_mode=runner.capture_error_mode)


def _child(recipe: Dict[str, Any], options: Dict[str, Any], results: Any) -> None:
    from graphrunner.runner import GraphRunner

    try:
        runner = GraphRunner(**recipe)
        runner.capture()
        results.put(("ok", runner.validate(**options)))
    except GraphHazardError as exc:
        results.put(("hazard", (str(exc), exc.size, exc.buffer, exc.offset)))
    except BaseException as exc:  # report anything, then let the process end
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def validate_in_child(runner: "GraphRunner", **options: Any) -> ValidationReport:
    recipe = _recipe(runner)
    for name, value in (("fn", recipe["fn"]), ("make_inputs", options.get("make_inputs"))):
        try:
            pickle.dumps(value)
        except Exception as exc:
            raise TypeError(f"validate(isolate=True) rebuilds the runner in a child process, so {name} must be "
                            f"picklable (a module-level function, a functools.partial of one, or an nn.Module): "
                            f"{exc}") from exc
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_child, args=(recipe, options, results), daemon=True)
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
        message, size, buffer, offset = payload
        raise GraphHazardError(message, size=size, buffer=buffer, offset=offset)
    raise GraphHazardError(f"validation in the child process failed: {payload}")
