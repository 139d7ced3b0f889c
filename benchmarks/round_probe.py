"""Why one pipelined round of each uncompiled contender in a bench run is about 9% faster than the other two (run AE4:
graphrunner 4,806-5,300 steps/s, bare replays 4,876-5,352): the draft preset's trace in the bench's order (per
round: graphrunner, common runner, bare replays, each pipelined then synchronised), with the SM clock sampled by
nvidia-smi every 20 ms beside it; then the same order with each trace warmed up for WARM_S first. Per trace:
steps/s and the SM clock's mean and minimum while it ran. With --compiled the torch.compile contenders are set
up too, as the bench sets them up (not run): whether a process that compiled runs the uncompiled contenders slower.
On the GPU machine, after the build:
    PYTHONPATH=. python3 benchmarks/round_probe.py [--compiled]
"""
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from typing import List, Tuple

import torch

from graphrunner_workloads.traces import UNCOMPILED, Step, draft_contenders, steps_per_s

STEPS = 2000
ROUNDS = 3
WARM_S = 0.5


def warm(step: Step, seconds: float) -> None:
    """Runs `step` pipelined for `seconds`, then waits for the GPU."""
    t0, i = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        step(i)
        i += 1
    torch.cuda.synchronize()


def clocks(samples: List[Tuple[float, float]], start: float, end: float) -> Tuple[float, float]:
    """(mean, min) SM MHz of the samples taken between two time.time() stamps."""
    inside = [mhz for t, mhz in samples if start <= t <= end] or [float("nan")]
    return statistics.mean(inside), min(inside)


def read_samples(path: str) -> List[Tuple[float, float]]:
    """(time.time() stamp, SM MHz) of each line nvidia-smi wrote to `path`."""
    out = []
    with open(path) as lines:
        for line in lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[1].isdigit():
                out.append((datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(parts[1])))
    return out


def main() -> None:
    log = tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False)
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm", "--format=csv,noheader,nounits",
                                "-lms", "20"], stdout=log)
    windows = []
    try:
        with torch.no_grad():
            contenders = draft_contenders(STEPS, "--compiled" in sys.argv[1:])
            steps = contenders.step_functions(contenders.steps)
            for warm_s in (0.0, WARM_S):
                for r in range(ROUNDS):
                    for name in UNCOMPILED:
                        for regime, synced in (("pipelined", False), ("synced", True)):
                            warm(steps[name], warm_s)
                            start = time.time()
                            rate, _ = steps_per_s(steps[name], STEPS, synced)
                            windows.append((warm_s, r, name, regime, rate, start, time.time()))
            contenders.close()
    finally:
        sampler.terminate()
        sampler.wait()
        log.close()
    samples = read_samples(log.name)
    print(f"draft preset, {STEPS}-step walk, bench order; SM MHz sampled every 20 ms ({len(samples)} samples)"
          + ("; the compiled contenders set up too" if "--compiled" in sys.argv[1:] else ""))
    print(f"  {'warm s':>6} {'round':>5} {'contender':>9} {'regime':>9} {'steps/s':>9} {'MHz mean':>9} {'MHz min':>8}")
    for warm_s, r, name, regime, rate, start, end in windows:
        mean, low = clocks(samples, start, end)
        print(f"  {warm_s:6.1f} {r:>5} {name:>9} {regime:>9} {rate:9.1f} {mean:9.0f} {low:8.0f}")


if __name__ == "__main__":
    main()
