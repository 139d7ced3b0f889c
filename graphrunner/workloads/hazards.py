"""The shared-pool hazard reproductions (graphrunner.workloads.reproductions), side by side: what a plain
shared-pool runner gets, what compute-sanitizer memcheck says about it, and what graphrunner's
validate(scrub=True, guard=True) finds.

    python -m graphrunner.workloads.hazards --out hazards-h100.txt

Each part runs in its own process, since a plain runner may fault.
"""
import argparse
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path


def plain(name: str, fixed: bool = False) -> None:
    """A plain shared-pool runner (benchmarks/common_runner.py): interleaved steps against eager."""
    import torch

    from graphrunner.checks import random_inputs, relative_error
    from graphrunner.workloads.common_runner import CommonRunner
    from graphrunner.workloads.reproductions import REPRODUCTIONS, SIZES, make

    fn, inputs = make(name, fixed), REPRODUCTIONS[name].inputs
    gen = torch.Generator(device="cuda").manual_seed(0)
    runner = CommonRunner(fn, random_inputs(inputs, max(SIZES), gen), SIZES)
    order = random.Random(0).choices(SIZES, k=40)
    wrong, worst = 0, 0.0
    for size in order:
        step = random_inputs(inputs, size, gen)
        got = runner(**step).clone()
        with torch.no_grad():
            err = relative_error(got, fn(**step))
        worst = max(worst, err) if err == err else float("nan")
        wrong += not err <= 1e-5
    big = runner(**random_inputs(inputs, 64, gen)).clone()
    runner(**random_inputs(inputs, 32, gen))
    torch.cuda.synchronize()
    clobbered = not torch.equal(runner.outputs[64], big)
    print(f"RESULT {wrong}/{len(order)} interleaved steps wrong (worst relative error {worst:.3g}); size 64's "
          f"live output {'overwritten' if clobbered else 'intact'} after a size-32 replay")


def checked(name: str) -> None:
    import torch

    import graphrunner as gr
    from graphrunner.workloads.reproductions import REPRODUCTIONS, SIZES, make

    runner = gr.GraphRunner(make(name), REPRODUCTIONS[name].inputs, max_batch_size=max(SIZES),
                            capture_sizes=SIZES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gr.CaptureGuardWarning)
        runner.capture()
    for w in caught:
        if issubclass(w.category, gr.CaptureGuardWarning):
            print("RESULT capture guard:", str(w.message).splitlines()[0])
    try:
        report = runner.validate(scrub=True, guard=True, steps_per_size=3)
        print(f"RESULT validate passed: {report}")
    except gr.GraphHazardError as exc:
        print(f"RESULT GraphHazardError: {exc}")


def child(args, sanitizer=False):
    cmd = [sys.executable, "-m", "graphrunner.workloads.hazards", *args]
    if sanitizer:
        cmd = ["compute-sanitizer", "--tool", "memcheck", *cmd]
    limit = 300 if sanitizer else 600
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"no answer within {limit} s" if sanitizer else [f"no answer within {limit} s"]
    text = proc.stdout + proc.stderr
    if sanitizer:
        summary = re.findall(r"ERROR SUMMARY: \d+ errors?", text)
        return summary[-1] if summary else f"no summary (exit {proc.returncode})"
    results = [line[len("RESULT "):] for line in text.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 and not results:
        errors = [line for line in text.splitlines() if "Error" in line]
        return [f"process failed (exit {proc.returncode}): {errors[-1] if errors else text[-300:]}"]
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--plain")
    p.add_argument("--checked")
    p.add_argument("--fixed", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.plain:
        plain(args.plain, args.fixed)
        return 0
    if args.checked:
        checked(args.checked)
        return 0
    from graphrunner.workloads.reproductions import REPRODUCTIONS, SIZES

    import torch

    lines = [f"# Shared-pool hazard reproductions on {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"# sizes {SIZES} captured largest first into one pool; ops in tests/ops/ (correct in eager mode)", ""]
    for name, repro in REPRODUCTIONS.items():
        lines.append(f"## {name}")
        if repro.missing():
            lines += [f"skipped: {repro.missing()}", ""]
            continue
        lines.append(f"plain shared-pool runner: {'; '.join(child(['--plain', name]))}")
        lines.append(f"compute-sanitizer memcheck on it: {child(['--plain', name], sanitizer=True)}; on its fixed "
                     f"twin: {child(['--plain', name, '--fixed'], sanitizer=True)}")
        lines.append(f"graphrunner: {'; '.join(child(['--checked', name]))}")
        lines.append("")
        print("\n".join(lines[-5:]), flush=True)
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
