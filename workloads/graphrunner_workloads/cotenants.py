"""Co-tenants: what the rest of a serving process does to memory captured graphs use, side by side for the
common runner (torch.cuda.CUDAGraph per size, common_runner.py) and graphrunner.

    python -m graphrunner_workloads.cotenants --out cotenants-h100.txt

Captured cuBLAS kernels bake in the address of a workspace torch caches per (handle, stream) outside the
graph's pool. Each trigger below frees or replaces that workspace the way other code in a process does. Every
case runs in its own process, since the common runner may fault.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

import graphrunner as gr
from graphrunner.testing import relative_error
from graphrunner_workloads.common_runner import CommonRunner

SIZES = [1, 4, 64]
BATCHES = [1, 3, 4, 50, 64]
HIDDEN = 1024


class MLP(torch.nn.Module):
    """bf16 Linear 1024->5632, GELU, 5632->1024, 1024->2816, GELU, 2816->1024. With bias, torch takes cuBLASLt's
    path (a separate, smaller workspace); without, cuBLAS's."""

    def __init__(self, bias: bool, device: str = "cuda") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        dims = [HIDDEN, 5632, HIDDEN, 2816, HIDDEN]
        self.layers = torch.nn.ModuleList()
        for a, b in zip(dims, dims[1:]):
            layer = torch.nn.Linear(a, b, bias=bias)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(b, a, generator=gen) / a ** 0.5)
                if bias:
                    layer.bias.copy_(torch.randn(b, generator=gen) * 0.1)
            self.layers.append(layer)
        self.to(device=device, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i % 2 == 0:
                x = torch.nn.functional.gelu(x)
        return x


INPUTS = {"x": gr.StaticInput((HIDDEN,), torch.bfloat16)}


def _reduce_overhead() -> None:
    """Runs a function compiled with torch.compile(mode="reduce-overhead"): cudagraph trees clear every cached
    cuBLAS workspace around their warm-ups and recordings."""
    w = torch.randn(256, 256, device="cuda")
    fn = torch.compile(lambda a: torch.relu(a @ w) + 1, mode="reduce-overhead")
    for _ in range(3):
        fn(torch.randn(64, 256, device="cuda"))
    torch.cuda.synchronize()


def _clear_and_reuse() -> None:
    """Clears the workspaces, then fills whatever memory the allocator hands out next with NaN: a freed block
    that stays mapped and is reused is silent corruption, not a crash."""
    torch._C._cuda_clearCublasWorkspaces()
    hold = [torch.full((n,), float("nan"), device="cuda") for n in [1 << 18] * 8 + [1 << 23] * 4]
    torch.cuda.synchronize()
    TRIGGER_HOLD.extend(hold)


def _workspace_size_change() -> None:
    """torch >= 2.13: a new cuBLAS workspace size replaces every cached workspace entry."""
    size = torch.backends.cuda.cublas_workspace_size()
    torch.backends.cuda.cublas_workspace_size(size * 2)
    torch.randn(64, 64, device="cuda") @ torch.randn(64, 64, device="cuda")
    torch.cuda.empty_cache()


def _torch_graph_reset(stream: torch.cuda.Stream) -> None:
    """torch >= 2.12: resetting a torch graph clears the workspaces of the stream it captured on."""
    x = torch.randn(64, 64, device="cuda")
    with torch.cuda.stream(stream):
        x @ x  # warm-up on that stream
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        x @ x
    g.reset()
    torch.cuda.empty_cache()


TRIGGER_HOLD: List[torch.Tensor] = []
TRIGGERS: Dict[str, Callable[[torch.cuda.Stream], None]] = {
    "nothing (control)": lambda stream: None,
    "torch.cuda.empty_cache()": lambda stream: torch.cuda.empty_cache(),
    "_cuda_clearCublasWorkspaces() + empty_cache()": lambda stream: (torch._C._cuda_clearCublasWorkspaces(),
                                                                    torch.cuda.empty_cache()),
    "a torch.compile(mode='reduce-overhead') function runs": lambda stream: _reduce_overhead(),
    "workspaces cleared, memory reused (NaN)": lambda stream: _clear_and_reuse(),
    "cuBLAS workspace size changed": lambda stream: _workspace_size_change(),
    "a torch graph on the runner's stream is reset": _torch_graph_reset,
}


def missing(trigger: str) -> str:
    """Why `trigger` cannot run with this torch, or ""."""
    if trigger == "cuBLAS workspace size changed" and not hasattr(torch.backends.cuda, "cublas_workspace_size"):
        return f"torch {torch.__version__} has no torch.backends.cuda.cublas_workspace_size"
    return ""


def survives(runner: Callable[..., torch.Tensor], model: torch.nn.Module, rounds: int = 3) -> float:
    """The worst relative error over `rounds` replays of every batch in BATCHES against eager."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    worst = 0.0
    for _ in range(rounds):
        for batch in BATCHES:
            x = torch.randn(batch, HIDDEN, generator=gen, device="cuda", dtype=torch.bfloat16)
            got = runner(x=x).clone()
            with torch.no_grad():
                err = relative_error(got, model(x))
            worst = err if err != err else max(worst, err)
    return worst


def case(trigger: str, kind: str, bias: bool) -> None:
    """One row: capture, trigger, replay every size against eager; prints one RESULT line."""
    print(f"RESULT {trigger}|{outcome(trigger, kind, bias)}")


def outcome(trigger: str, kind: str, bias: bool) -> str:
    model = MLP(bias)
    if kind == "common":
        example = {"x": torch.randn(max(SIZES), HIDDEN, device="cuda", dtype=torch.bfloat16)}
        runner = CommonRunner(model, example, SIZES)
        stream = runner.stream
    else:
        runner = gr.GraphRunner(model, INPUTS, capture_sizes=SIZES)
        runner.capture()
        stream = torch.cuda.Stream()  # graphrunner's own stream cannot be shared: a torch graph gets another
    before = survives(runner, model, rounds=1)
    TRIGGERS[trigger](stream)
    after = survives(runner, model)
    if kind != "common":
        runner.close()
    return (f"{'correct' if after <= 3e-2 else 'WRONG'} after the trigger (worst relative error {after:.3g}; "
            f"{before:.3g} before it)")


def common_audit(bias: bool) -> str:
    """What the audit says of the common runner's graphs (torch stream, one pool, nothing kept) before any
    trigger: graphs captured with gr.Graph the way the common runner captures, classified against the pool,
    the static inputs and the model's parameters."""
    model = MLP(bias)
    stream, pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
    static = torch.randn(max(SIZES), HIDDEN, device="cuda", dtype=torch.bfloat16)
    graphs = []
    with torch.no_grad():
        with torch.cuda.stream(stream):
            model(static)
        for size in sorted(SIZES, reverse=True):
            g = gr.Graph(keep_graph=True)
            with g.capture(pool=pool, stream=stream):
                model(static[:size])
            graphs.append((f"the common runner's graph of size {size}", g))
    device = torch.device("cuda", torch.cuda.current_device())
    owned = [(seg["address"], seg["total_size"], "the graphs' pool")
             for seg in torch.cuda.memory._snapshot()["segments"]  # no arguments: graphrunner/pool.py
             if tuple(seg["segment_pool_id"]) == tuple(pool) and seg["device"] == device.index]
    owned += [(static.data_ptr(), static.nbytes, "the static input")]
    owned += [(t.data_ptr(), t.untyped_storage().nbytes(), "the model's parameters") for t in model.parameters()]
    report = gr.audit_graphs(graphs, owned, device)
    kernels = sorted({r.kernel[:60] for r in report.borrowed})
    where = sorted({r.memory for r in report.borrowed})
    return (f"{len(report.borrowed)} borrowed reference(s) in {report.graphs} graphs, from kernels {kernels}, "
            f"into {where}")


def child(args: List[str]) -> List[str]:
    """The RESULT lines of a child process running `args`, or why it gave none."""
    proc = subprocess.run([sys.executable, "-m", "graphrunner_workloads.cotenants", *args], capture_output=True,
                          text=True, timeout=600)
    text = proc.stdout + proc.stderr
    results = [line[len("RESULT "):] for line in text.splitlines() if line.startswith("RESULT ")]
    if results:
        return results
    errors = [line.strip() for line in text.splitlines() if "Error" in line or "error" in line]
    return [f"process failed (exit {proc.returncode}): {errors[-1] if errors else text[-300:]}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs=3, metavar=("TRIGGER", "KIND", "BIAS"))
    p.add_argument("--graphrunner-cases", choices=["bias", "nobias"], help="every trigger, one after another, on "
                   "fresh graphrunner runners in this one process (they survive every trigger)")
    p.add_argument("--audit", choices=["bias", "nobias"])
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.case:
        trigger, kind, bias = args.case
        case(trigger, kind, bias == "bias")
        return 0
    if args.audit:
        print("RESULT " + common_audit(args.audit == "bias"))
        return 0
    if args.graphrunner_cases:
        for trigger in TRIGGERS:
            if not missing(trigger):
                case(trigger, "graphrunner", args.graphrunner_cases == "bias")
        return 0
    lines = [f"# Co-tenant triggers on {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"# bf16 MLP {HIDDEN}->5632->{HIDDEN}->2816->{HIDDEN}, sizes {SIZES} captured largest first into one "
             f"pool; after the trigger, 3 replays of batches {BATCHES} against eager;",
             "# each common runner case in its own process,",
             "# graphrunner's cases one after another in one process (fresh runners, triggers piling up)", ""]
    for bias in ("nobias", "bias"):
        path = "cuBLASLt (Linear with bias)" if bias == "bias" else "cuBLAS (Linear without bias)"
        lines += [f"## {path}", f"audit of the common runner's graphs before any trigger: "
                                f"{child(['--audit', bias])[0]}"]
        ours = dict(line.split("|", 1) for line in child(["--graphrunner-cases", bias]) if "|" in line)
        for trigger in TRIGGERS:
            if missing(trigger):
                lines.append(f"- {trigger}: skipped: {missing(trigger)}")
                continue
            common = child(["--case", trigger, "common", bias])[0].split("|", 1)[-1]
            lines += [f"- {trigger}", f"    {'common':<12} {common}",
                      f"    {'graphrunner':<12} {ours.get(trigger, 'no result (the process ended early)')}"]
            print("\n".join(lines[-3:]), flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
