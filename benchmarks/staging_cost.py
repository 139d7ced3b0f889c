"""Where the decoder's staging cost goes: the draft preset's steps at batch 1, at batch 64 and over the bench's
random-walk trace, queued back to back, for
- run: graphrunner, staging inside the graph;
- idle: the runner's own graphs replayed with nothing staged (the staging node runs and returns at once; the
  static buffers hold the last staged step, so over the trace each replay reads the inputs of the step before);
- bare: the traces' pre-staged graphs, captured on each step's padded inputs, with no staging node.
run - idle is the staging kernel's work; idle - bare is the node being there at all. Per contender it prints the
GPU us a step between two CUDA events (median and range over rounds) and, from torch.profiler, the kernels' own
time a step and the staging kernel's: a cost seen in the events but not in the kernels is time between kernels.
The staging_probe.cu numbers are a 12-kernel stand-in; these are the decoder's. On the GPU machine, after the build:
    PYTHONPATH=. python3 benchmarks/staging_cost.py
"""
import statistics
from typing import Dict, List

import torch

from graphrunner_workloads.traces import GPU_STEPS, Step, draft_contenders, kernel_us, paced, queued_us

ROUNDS = 5
PROFILED_STEPS = 200
TRACE_STEPS = 1000


def print_rows(label: str, steps: Dict[str, Step], n: int) -> None:
    """One row per contender of `steps`, each timed over steps 0..n-1, ROUNDS times in turns."""
    spread: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, fn in steps.items():
            spread[name].append(queued_us(fn, n))
    for name, fn in steps.items():
        kernels = kernel_us(fn, min(n, PROFILED_STEPS))
        total, staging = sum(kernels.values()), sum(us for name, us in kernels.items() if "stage_inputs" in name)
        times = spread[name]
        print(f"  {label:>5} {name:>9} {statistics.median(times):8.2f} {min(times):6.2f}-{max(times):6.2f}"
              f" {total:8.2f} {staging:8.2f}")


def main() -> None:
    """Prints the table for the draft preset at batch 1, batch 64 and over the trace."""
    with torch.no_grad():
        contenders = draft_contenders(TRACE_STEPS, False)
        runner, lead = contenders.runner, contenders.runner.spec.max_lead
        print(f"draft preset, GPU us a step: events over {ROUNDS} rounds (batch 1 and 64: {GPU_STEPS} steps; "
              f"trace: {TRACE_STEPS}), kernels from {PROFILED_STEPS} profiled steps")
        print(f"  {'batch':>5} {'contender':>9} {'events':>8} {'range':>13} {'kernels':>8} {'staging':>8}")
        for batch, step in contenders.fixed.items():
            graph = runner.record.entries[runner.size_for(batch)].graph
            made = contenders.step_functions([step])
            print_rows(str(batch), {"run": made["run"], "idle": paced(lambda i: graph.replay(), lead),
                                    "bare": made["bare"]}, GPU_STEPS)
        made = contenders.step_functions(contenders.steps)
        graphs = [runner.record.entries[runner.size_for(s["input_ids"].shape[0])].graph for s in contenders.steps]
        print_rows("trace", {"run": made["run"], "idle": paced(lambda i: graphs[i % len(graphs)].replay(), lead),
                             "bare": made["bare"]}, TRACE_STEPS)
        contenders.close()


if __name__ == "__main__":
    main()
