"""How far ahead of the GPU the host runs, against steps per second: the benchmark's random-walk trace of the draft
preset for graphrunner, the common runner and bare replays, the host allowed to lead by at most k steps (it waits
for the event of step i - k before it issues step i; k = 1 is a wait every step, as the synchronised trace; no
bound is the pipelined trace, where the launch queue fills). Overlap schedulers run one or two steps ahead.
Run Y1 (gpu-log-h100.txt, before GraphRunner(max_lead)) showed a full launch queue costing graphrunner's graphs
and bare replays up to 5% a step; now the runner and the bare replays keep their own bound (max_lead 4), so the
rows from 4 on show it at work. On the GPU machine, after the build:
    PYTHONPATH=. python3 benchmarks/lead_probe.py
"""
import statistics

import torch

from graphrunner_workloads.traces import draft_contenders, paced, steps_per_s

STEPS = 2000
ROUNDS = 3
LEADS = (1, 2, 4, 16, 64, None)  # None: no bound


def main() -> None:
    with torch.no_grad():
        contenders = draft_contenders(STEPS, False)
        steps = contenders.step_functions(contenders.steps)
        print(f"draft preset, {STEPS}-step walk, steps/s (median of {ROUNDS}) by the host's lead")
        print(f"  {'lead':>6}" + "".join(f"{name:>12}" for name in steps))
        for lead in LEADS:
            medians = []
            for name, step in steps.items():
                # a lead of k: step i waits for step i - k, as paced(k - 1) does
                bounded = paced(step, lead - 1 if lead else None)
                medians.append(statistics.median(steps_per_s(bounded, STEPS, False)[0] for _ in range(ROUNDS)))
            print(f"  {lead or 'none':>6}" + "".join(f"{m:12.1f}" for m in medians))
        contenders.close()


if __name__ == "__main__":
    main()
