"""`python -P benchmarks/exec_memory_probe.py [L8|L32|ragged|...]` (GPU): where memory_bench's graph_exec_error
comes from. Runs memory_bench's preset in this process with graphrunner's capture phases wrapped, and prints, for
each capture_all (the preset's dry run, its real capture, ...), the driver's free memory that left outside torch's
allocator (fall of free less growth of torch's reserved memory) in each phase: the warm-up of each runner (its
static buffers, launcher and eager warm-up), each size's capture (the whole of capture._capture_size: input fill,
stream capture, instantiation and upload, wider than the window Graph.exec_bytes reads), and the whole capture_all;
beside each size's capture, the executables' bytes its record counts. A phase's outside bytes above its executables'
are what graph_exec_error counts against the report. The budgeted capture (plan.capture_within, which calls the
schedule by the name it imported) prints its phases without a capture_all header.
"""
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Tuple

import torch

import graphrunner.capture as capture
from graphrunner_workloads import memory_bench

MiB = 1024 * 1024


def reading() -> Tuple[int, int]:
    """The driver's free bytes and torch's reserved bytes, the device idle."""
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()


def outside(before: Tuple[int, int], after: Tuple[int, int]) -> float:
    """MiB that left the driver's free memory outside torch's allocator between two readings.

    Args:
        before: reading() at the start.
        after: reading() at the end.
    """
    return ((before[0] - after[0]) - (after[1] - before[1])) / MiB


def main() -> None:
    """Runs memory_bench's preset (the first argument, L8 by default) with the capture phases wrapped."""
    name = sys.argv[1] if len(sys.argv) > 1 else "L8"
    rows: List[str] = []
    warm_up, capture_size, capture_all = capture._warm_up, capture._capture_size, capture.capture

    def wrapped(fn: Callable[..., Any], label: Callable[..., str], header: Callable[..., str] = None
                ) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if header is not None:
                rows.append(header(*args))
            before = reading()
            out = fn(*args, **kwargs)
            after = reading()
            rows.append(f"  {label(*args, out=out):<40} outside {outside(before, after):7.2f} MiB, reserved "
                        f"{(after[1] - before[1]) / MiB:7.2f} MiB")
            return out
        return inner

    def size_label(spec: Any, record: Any, size: int, *rest: Any, out: Any) -> str:
        return f"size {size} of {spec.name!r} (exec {record.entries[size].exec_bytes / MiB:.2f} MiB)"


    capture._warm_up = wrapped(warm_up, lambda c, *rest, out: f"warm-up of {c.spec.name!r}")
    capture._capture_size = wrapped(capture_size, size_label)
    capture.capture = wrapped(capture_all, lambda *args, out: "the whole capture_all",
                              lambda captures, *rest: f"capture_all of {[c.spec.name for c in captures]}:")
    with tempfile.TemporaryDirectory() as tmp:
        args = memory_bench.parse_args(["--preset", name, "--preset-out", str(Path(tmp) / "out.json")])
        res, lines = memory_bench.preset(args, name)
    print("\n".join(rows))
    print("\n".join(lines))
    print({k: v for k, v in sorted(res.items()) if "exec" in k or "dry_run" in k})


if __name__ == "__main__":
    main()
