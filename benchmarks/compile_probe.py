"""What makes one pipelined round of torch.compile(mode="reduce-overhead") in each bench run about half as fast as
the others (compile_ro 3,155 against 7,077 steps/s in run AD2): the draft preset's trace, the compiled contenders
set up as the bench sets them up, then their pipelined traces in turns, ROUNDS times. Per round and contender:
steps/s, the slowest step call on the host, how many calls took over 1 ms, and the torch._dynamo counters that
moved during the round (recompiles, graph breaks, cudagraph recordings show there). On the GPU machine, after
the build:
    PYTHONPATH=. python3 benchmarks/compile_probe.py
"""
from typing import Dict

import torch
from torch._dynamo.utils import counters

from graphrunner_workloads.traces import draft_contenders, steps_per_s

STEPS = 2000
ROUNDS = 4
SLOW_CALL_S = 1e-3


def moved(before: Dict[str, Dict[str, int]]) -> str:
    """The counters that changed since `before`, as 'group.key +n'."""
    out = []
    for group, values in counters.items():
        for key, value in values.items():
            delta = value - before.get(group, {}).get(key, 0)
            if delta:
                out.append(f"{group}.{key} +{delta}")
    return ", ".join(out) or "none"


def main() -> None:
    with torch.no_grad():
        contenders = draft_contenders(STEPS, True)
        if contenders.compile_error:
            raise SystemExit(f"torch.compile contenders failed: {contenders.compile_error}")
        steps = contenders.step_functions(contenders.steps)
        print(f"draft preset, {STEPS}-step walk, pipelined, contenders in turns; a slow call: over "
              f"{SLOW_CALL_S * 1e3:.0f} ms on the host")
        print(f"  {'round':>5} {'contender':>13} {'steps/s':>9} {'slowest ms':>11} {'slow calls':>11}  counters moved")
        for r in range(ROUNDS):
            for name in ("compile_ro", "run_compiled"):
                before = {group: dict(values) for group, values in counters.items()}
                rate, calls = steps_per_s(steps[name], STEPS, False)
                slow = sum(c > SLOW_CALL_S for c in calls)
                print(f"  {r:>5} {name:>13} {rate:9.1f} {max(calls) * 1e3:11.2f} {slow:11d}  {moved(before)}")
        contenders.close()


if __name__ == "__main__":
    main()
