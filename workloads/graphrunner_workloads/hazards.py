"""The shared-pool hazard reproductions (graphrunner_workloads.reproductions), side by side: what the common
runner gets, what compute-sanitizer memcheck says about it, and what graphrunner's validate(scrub=True, guard=True)
finds; then the speculative pair, the ragged runner and the piecewise break ops (reproductions/piecewise.py)
against the common runner's forms of them.

    python -m graphrunner_workloads.hazards --out hazards-h100.txt
    python -m graphrunner_workloads.hazards --piecewise    # only the piecewise break ops

Each part runs in its own process, since the common runner may fault.
"""
import argparse
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import List


def common(name: str, fixed: bool = False) -> None:
    """The common runner (common_runner.py): interleaved steps against eager."""
    import torch

    from graphrunner.testing import random_inputs, relative_error
    from graphrunner_workloads.common_runner import CommonRunner
    from graphrunner_workloads.reproductions import REPRODUCTIONS, SIZES, make

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
    import graphrunner as gr
    from graphrunner_workloads.reproductions import REPRODUCTIONS, SIZES, make

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


def common_spec(fixed: bool) -> None:
    """The speculative pair on common runners (one pool, copy_ staging): does the loop still give
    the target's greedy tokens with the seed bug, and does a draft replay change the verify step's memory?"""
    import torch

    from graphrunner_workloads import spec_decode as sd
    from graphrunner_workloads.common_runner import CommonRunner

    cfg, sizes = sd.SEED_BUG_CONFIG, sd.SEED_BUG_SIZES
    target, draft = sd.make_models(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool, b = torch.cuda.graph_pool_handle(), max(sizes)
    verify_step, draft_step = sd.make_steps(cfg, target, draft, "kernel" if fixed else "kernel-seed-bug")
    verify = CommonRunner(verify_step, sd.random_verify_step(cfg, b, gen), sizes, pool=pool, zero_padding=True)
    drafter = CommonRunner(draft_step, sd.random_draft_step(cfg, b, gen), sizes, pool=pool, zero_padding=True)
    prompts = torch.randint(0, cfg.target.vocab, (61, 16), generator=gen, device="cuda")
    tokens, capacity = 100, 100 + cfg.steps + 2
    got = sd.generate(cfg, sd.prefill(cfg, [target, draft], prompts, capacity), drafter, verify, tokens)
    want = sd.greedy(cfg, target, sd.prefill(cfg, [target], prompts, capacity), tokens)
    before = verify_step.slots.clone()
    drafter(**sd.random_draft_step(cfg, b, gen))
    torch.cuda.synchronize()
    wrong = int((got != want).any(1).sum())
    changed = int((verify_step.slots != before).sum())
    print(f"RESULT {wrong}/61 requests' tokens differ from greedy decoding of the target (batch 61, graph of size "
          f"64); one draft replay at batch 64 changed {changed} of the verify step's {before.numel()} slot entries")


def checked_spec(fixed: bool) -> None:
    import functools

    import graphrunner as gr
    from graphrunner_workloads import spec_decode as sd

    cfg = sd.SEED_BUG_CONFIG
    target, draft = sd.make_models(cfg)
    verify, drafter = sd.make_runners(cfg, target, draft, "kernel" if fixed else "kernel-seed-bug", sd.SEED_BUG_SIZES)
    gr.capture_all(verify, drafter)
    try:
        report = gr.validate_all(verify, drafter, scrub=True, guard=True, steps_per_size=3,
                                 make_inputs={"verify": functools.partial(sd.random_verify_step, cfg),
                                              "draft": functools.partial(sd.random_draft_step, cfg)})
        print(f"RESULT validate_all passed: {report}")
    except gr.GraphHazardError as exc:
        print(f"RESULT GraphHazardError: {exc}")


def child(args, sanitizer=False, module="graphrunner_workloads.hazards"):
    cmd = [sys.executable, "-m", module, *args]
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


def piecewise_rows() -> List[str]:
    """The piecewise section: each break op bug (reproductions/piecewise.py) and its fixed twin on the common
    runner's piecewise form and under graphrunner's validate(scrub=True, guard=True), printed as they come."""
    from graphrunner_workloads.reproductions import piecewise

    lines = ["## piecewise sizes: break ops that break the out= contract (issue #34)",
             f"a uniform runner, sizes {piecewise.SIZES}: segment 0, one break op, segment 1; validate checks around "
             "each segment and break op"]
    print("\n".join(lines), flush=True)
    module = "graphrunner_workloads.reproductions.piecewise"
    for case, title in piecewise.CASES.items():
        rows = [f"### {title}"]
        for fixed in (False, True):
            twin = "fixed twin" if fixed else "bug"
            args = ["--case", case, *(["--fixed"] if fixed else [])]
            rows.append(f"{twin}, common piecewise runner: {'; '.join(child(['--common', *args], module=module))}")
            rows.append(f"{twin}, graphrunner validate(scrub, guard): "
                        f"{'; '.join(child(['--checked', *args], module=module))}")
        print("\n".join(rows), flush=True)
        lines += rows
    return lines + [""]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--common")
    p.add_argument("--checked")
    p.add_argument("--fixed", action="store_true")
    p.add_argument("--spec", choices=["common", "checked"])
    p.add_argument("--piecewise", action="store_true", help="only the piecewise section")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.common:
        common(args.common, args.fixed)
        return 0
    if args.checked:
        checked(args.checked)
        return 0
    if args.spec:
        (common_spec if args.spec == "common" else checked_spec)(args.fixed)
        return 0
    if args.piecewise:
        lines = piecewise_rows()
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
        return 0
    from graphrunner_workloads.reproductions import REPRODUCTIONS, SIZES

    import torch

    lines = [f"# Shared-pool hazard reproductions on {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"# sizes {SIZES} captured largest first into one pool; ops in "
             "workloads/graphrunner_workloads/reproductions (correct in eager mode)", ""]
    for name, repro in REPRODUCTIONS.items():
        lines.append(f"## {name}")
        if repro.missing():
            lines += [f"skipped: {repro.missing()}", ""]
            continue
        lines.append(f"common runner: {'; '.join(child(['--common', name]))}")
        lines.append(f"compute-sanitizer memcheck on it: {child(['--common', name], sanitizer=True)}; on its fixed "
                     f"twin: {child(['--common', name, '--fixed'], sanitizer=True)}")
        lines.append(f"graphrunner: {'; '.join(child(['--checked', name]))}")
        lines.append("")
        print("\n".join(lines[-5:]), flush=True)
    lines += ["## speculative decoding: draft metadata sized for the batch, not batch x steps (sglang issue 26532)",
              "verify + draft runners in one pool, sizes 4..64, 4 draft tokens a round"]
    for fixed in (False, True):
        twin = "fixed twin" if fixed else "seed bug"
        flag = ["--fixed"] if fixed else []
        lines.append(f"{twin}, common runners: {'; '.join(child(['--spec', 'common', *flag]))}")
        found = "; ".join(child(["--spec", "checked", *flag]))
        lines.append(f"{twin}, graphrunner validate_all(scrub, guard): {found}")
    lines.append("")
    print("\n".join(lines[-6:]), flush=True)
    lines += ["## ragged steps: a token map sized for the requests, not the tokens (the seed's class, sglang 26532)",
              "a ragged runner, sizes 16..1024 tokens, 8 requests at most"]
    ragged = "graphrunner_workloads.reproductions.ragged"
    for fixed in (False, True):
        twin = "fixed twin" if fixed else "seed bug"
        flag = ["--fixed"] if fixed else []
        lines.append(f"{twin}, common ragged runner: {'; '.join(child(['--common', *flag], module=ragged))}")
        lines.append(f"{twin}, graphrunner validate(scrub, guard): "
                     f"{'; '.join(child(['--checked', *flag], module=ragged))}")
    lines.append("")
    print("\n".join(lines[-6:]), flush=True)
    lines += piecewise_rows()
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
