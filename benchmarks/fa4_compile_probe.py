"""Why torch.compile(mode="reduce-overhead") did not replay graphs with flash-attn 4 attention (run AE8: 228
steps/s, 4.2 ms of host a step): torch._dynamo.explain of one decode attention call, flash_attn_varlen_func called
directly (as the decoder called it until the op) and through graphrunner_workloads::flash_attn_4: graphs, graph
breaks and the first reasons dynamo gives. On the GPU machine, with flash-attn 4 installed, after the build:
    PYTHONPATH=. python3 benchmarks/fa4_compile_probe.py
"""
import torch
from flash_attn.cute import flash_attn_varlen_func

from graphrunner_workloads.attention import flash_attn_4_op

REASONS = 3


def direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor,
           table: torch.Tensor) -> torch.Tensor:
    """The attention as the decoder called it before the op: flash_attn_varlen_func itself."""
    out, _ = flash_attn_varlen_func(q[:, None], k, v, seqused_k=seq_lens, page_table=table)
    return out[:, 0]


def main() -> None:
    """Prints, per way of calling, what dynamo made of one paged decode attention call."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, heads, dim, page_size, pages = 8, 8, 128, 128, 2
    q = torch.randn(rows, heads, dim, generator=gen, device="cuda").bfloat16()
    k, v = (torch.randn(rows * pages + 1, page_size, heads, dim, generator=gen, device="cuda").bfloat16()
            for _ in range(2))
    seq_lens = torch.randint(1, pages * page_size + 1, (rows,), generator=gen, device="cuda", dtype=torch.int32)
    table = (torch.randperm(rows * pages, generator=gen, device="cuda") + 1).view(rows, pages).int()
    for label, fn in (("flash_attn_varlen_func called directly", direct),
                      ("graphrunner_workloads::flash_attn_4", lambda *args: flash_attn_4_op()(*args))):
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(fn)(q, k, v, seq_lens, table)
        except Exception as exc:  # dynamo failing to trace is an answer too
            print(f"{label}: explain raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        print(f"{label}: {explained.graph_count} graphs, {explained.graph_break_count} graph breaks, "
              f"{explained.op_count} ops traced")
        for reason in explained.break_reasons[:REASONS]:
            frame = reason.user_stack[-1] if reason.user_stack else None
            where = f" ({frame.filename.rsplit('/', 3)[-1]}:{frame.lineno})" if frame else ""
            print(f"  break: {str(reason.reason).splitlines()[0][:160]}{where}")


if __name__ == "__main__":
    main()
