"""Whether setting up the torch.compile contenders is what made every uncompiled graph in a process about 8% slower (run
AE12): graphrunner's draft-preset graphs, captured before anything compiles, timed again after each part of the
bench's compile set-up, in one process:
  0. nothing compiled yet;
  1. torch.compile(mode="default") called at every capture size (inductor; its compile workers start);
  2. torch.compile(mode="reduce-overhead") warmed up at every size (cudagraph trees record);
  3. inductor's compile workers shut down;
  4. a second runner and the bare replays, captured now.
Per phase: the 2000-step walk pipelined (steps/s, median of REPS) and steps of batch 64 queued back to back (GPU
us a step), the process's native threads and child processes. The same graphs slower after a phase means a state
of the process or device; only new captures slower means what they captured (kernels, memory). Last, the old
graphs' kernels at batch 64 from torch.profiler, phase 0 against the end, slowest first. On the GPU machine,
after the build:
    PYTHONPATH=. python3 benchmarks/compile_state_probe.py
"""
import os
import statistics
from typing import List

import torch
from torch._inductor.async_compile import shutdown_compile_workers

from graphrunner_workloads.decoder import random_decode_inputs
from graphrunner_workloads.traces import Step, draft_contenders, kernel_us, queued_us, steps_per_s

STEPS = 2000
REPS = 3
PROFILED_STEPS = 100
TOP = 12


def children() -> int:
    """Child processes of this process (from /proc)."""
    me, count = str(os.getpid()), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                count += stat.read().rsplit(")", 1)[1].split()[1] == me
        except OSError:
            continue
    return count


def row(label: str, trace: Step, fixed: Step) -> None:
    """One phase's line: `trace` pipelined (median of REPS) and `fixed` queued."""
    rates = [steps_per_s(trace, STEPS, False)[0] for _ in range(REPS)]
    print(f"  {label:<44} {statistics.median(rates):9.1f} {min(rates):9.1f}-{max(rates):<9.1f} "
          f"{queued_us(fixed):8.2f} {len(os.listdir('/proc/self/task')):7d} {children():8d}", flush=True)


def main() -> None:
    """Prints one line per phase, then the first runner's kernels before and after."""
    with torch.no_grad():
        old = draft_contenders(STEPS, False)
        cfg = old.cfg
        trace, fixed = old.step_functions(old.steps)["run"], old.step_functions([old.fixed[64]])["run"]
        print(f"draft preset, graphrunner's graphs captured before any compile; walk pipelined steps/s (median, "
              f"range of {REPS}), batch 64 queued GPU us, threads, children")
        row("0. nothing compiled", trace, fixed)
        before = kernel_us(fixed, PROFILED_STEPS)
        example = random_decode_inputs(cfg, cfg.max_batch_size, torch.Generator(device="cuda").manual_seed(1))
        compiled = torch.compile(old.model, dynamic=True)
        for size in old.sizes:
            compiled(**{n: t[:size].clone() for n, t in example.items()})
        row("1. after compile(mode=default), every size", trace, fixed)
        reduce_overhead = torch.compile(old.model, mode="reduce-overhead", dynamic=True)
        for size in old.sizes:
            own = {n: t[:size].clone() for n, t in example.items()}
            for _ in range(3):
                torch.compiler.cudagraph_mark_step_begin()
                reduce_overhead(**own)
        row("2. after reduce-overhead warm-ups, every size", trace, fixed)
        shutdown_compile_workers()
        row("3. after shutdown_compile_workers()", trace, fixed)
        after = kernel_us(fixed, PROFILED_STEPS)
        new = draft_contenders(STEPS, False)
        made = new.step_functions(new.steps)
        made_fixed = new.step_functions([new.fixed[64]])
        row("4. a runner captured now", made["run"], made_fixed["run"])
        row("4. bare replays captured now", made["bare"], made_fixed["bare"])
        row("4. the first runner again", trace, fixed)
        print(f"the first runner's kernels at batch 64, device us a step over {PROFILED_STEPS} steps, phase 0 -> 3:")
        names: List[str] = sorted(set(before) | set(after), key=lambda k: -max(before.get(k, 0), after.get(k, 0)))
        for name in names[:TOP]:
            print(f"  {before.get(name, 0):8.2f} {after.get(name, 0):8.2f}  {name[:90]}")
        print(f"  {sum(before.values()):8.2f} {sum(after.values()):8.2f}  all kernels")
        new.close()
        old.close()
        del reduce_overhead, compiled
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
