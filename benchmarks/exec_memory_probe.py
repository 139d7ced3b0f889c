"""`python -P benchmarks/exec_memory_probe.py [L8|L32|ragged|...]` (GPU): where memory_bench's graph_exec_error
comes from. Runs memory_bench's preset in this process with graphrunner's capture phases wrapped, and prints, for
each capture_all (the preset's dry run, its real capture, ...), the driver's free memory that left outside torch's
allocator (fall of free less growth of torch's reserved memory) in each phase: the warm-up of each runner (its
static buffers, launcher and eager warm-up), each size's capture (the whole of capture._capture_size: input fill,
stream capture, instantiation and upload, wider than the window Graph.exec_bytes reads), and the whole capture_all;
beside each size's capture, the executables' bytes its record counts. A phase's outside bytes above its executables'
are what graph_exec_error counts against the report. The budgeted capture (plan.capture_within, which calls the
schedule by the name it imported) prints its phases without a capture_all header. After each capture_all, the
segments of torch's allocator it added outside its graph pool that are still there (the workspace hold's, and what
the reports count as other bytes, Note [other bytes] in graphrunner/capture.py): kind, stream, size, and each live
block with the innermost frames that allocated it (torch's memory history is on).
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


def new_segments(before: List[dict], after: List[dict], pool: Any) -> List[str]:
    """Lines for the segments in `after` but not `before` outside `pool`, with their live blocks' frames.

    Args:
        before: torch.cuda.memory._snapshot()["segments"] before.
        after: the same after.
        pool: the graph pool's id, whose segments are left out.
    """
    known = {seg["address"] for seg in before}
    lines = []
    for seg in after:
        if seg["address"] in known or tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pool):
            continue
        lines.append(f"    new segment: {seg.get('segment_type')} {seg['total_size'] / MiB:.2f} MiB, stream "
                     f"{seg.get('stream')}, pool {tuple(seg.get('segment_pool_id', (0, 0)))}")
        for block in seg.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = [f"{f.get('filename', '?').split('/')[-1]}:{f.get('line')} {f.get('name')}"
                      for f in block.get("frames", [])[:8]]
            lines.append(f"      live block {block['size']} B: {' <- '.join(frames) or 'no frames'}")
    return lines


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
            rows.append(f"  {label(*args, out=out):<40} outside {capture.outside_growth(before, after) / MiB:7.2f} MiB, reserved "
                        f"{(after[1] - before[1]) / MiB:7.2f} MiB")
            return out
        return inner

    def size_label(spec: Any, record: Any, size: int, *rest: Any, out: Any) -> str:
        return f"size {size} of {spec.name!r} (exec {record.entries[size].exec_bytes / MiB:.2f} MiB)"

    def capture_all_traced(captures: Any, pool: Any, *args: Any, **kwargs: Any) -> Any:
        before = torch.cuda.memory._snapshot()["segments"]
        out = capture_all(captures, pool, *args, **kwargs)
        rows.extend(new_segments(before, torch.cuda.memory._snapshot()["segments"], pool))
        return out

    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    capture._warm_up = wrapped(warm_up, lambda c, *rest, out: f"warm-up of {c.spec.name!r}")
    capture._capture_size = wrapped(capture_size, size_label)
    capture.capture = wrapped(capture_all_traced, lambda *args, out: "the whole capture_all",
                              lambda captures, *rest: f"capture_all of {[c.spec.name for c in captures]}:")
    with tempfile.TemporaryDirectory() as tmp:
        args = memory_bench.parse_args(["--preset", name, "--preset-out", str(Path(tmp) / "out.json")])
        res, lines = memory_bench.preset(args, name)
    print("\n".join(rows))
    print("\n".join(lines))
    print({k: v for k, v in sorted(res.items()) if "exec" in k or "dry_run" in k})


if __name__ == "__main__":
    main()
