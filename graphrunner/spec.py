"""`RunnerSpec`: everything a GraphRunner is built from, checked once, frozen.

The isolated validation child rebuilds its runner from the same spec, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from graphrunner.graph import PoolLike, pool_id
from graphrunner.inputs import StaticInput
from graphrunner.schedule import capture_order, checked_capture_sizes, checked_max_batch_size

CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")
FALLBACKS = ("eager", "error")
# Steps of one runner the host may queue behind the one the GPU runs (csrc/launcher.h, Launcher::must_wait):
# enough that the GPU never waits for the next step, few enough that the launch queue never fills.
DEFAULT_MAX_LEAD = 4
Long = Union[torch.Tensor, torch.nn.Module]


@dataclass(frozen=True)
class StepInfo:
    """What the `on_capture` and `before_replay` hooks get: the step's counts and the buffers they may fill.

    Args:
        requests: requests in the step (at capture: the size captured).
        padded_requests: the captured size the step runs at; 0 for a step that runs eagerly.
        tokens: requests * tokens_per_request: the rows of per-token inputs and outputs.
        padded_tokens: padded_requests * tokens_per_request.
        static: input name -> the runner's static buffer at padded_requests rows (padded_tokens for a per-token
            input). The graph stages the step's inputs into them in its first node, after the hook: a hook
            reads what the previous step left there, and may write the padding rows of inputs with
            padding="keep" (for the same step) or any buffer at capture. Empty for an eager step.
        inputs: the step's inputs as passed to the runner; None at capture.
    """

    requests: int
    padded_requests: int
    tokens: int
    padded_tokens: int
    static: Mapping[str, torch.Tensor]
    inputs: Optional[Mapping[str, torch.Tensor]] = None


@dataclass(frozen=True)
class RunnerSpec:
    """A GraphRunner's arguments, checked (see GraphRunner for what each one means)."""

    fn: Callable[..., Any]
    inputs: Mapping[str, StaticInput]
    max_batch_size: int
    capture_sizes: Tuple[int, ...]
    pool: PoolLike = None
    warmup: int = 1
    fallback: str = "eager"
    on_capture: Optional[Callable[[StepInfo], None]] = None
    before_replay: Optional[Callable[[StepInfo], None]] = None
    clone_outputs: bool = False
    no_grad: bool = True
    device: int = 0
    capture_error_mode: str = "global"
    strict: bool = False
    debug: bool = False
    collective_timeout_s: float = 300.0
    keep: Tuple[Long, ...] = ()
    name: str = ""
    verbose: bool = False
    tokens_per_request: int = 1
    out: Any = None
    capture_inputs: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None
    max_lead: Optional[int] = DEFAULT_MAX_LEAD

    @property
    def capture_order(self) -> List[int]:
        return capture_order(self.capture_sizes)

    @property
    def rows_per_request(self) -> Dict[str, int]:
        """Rows per request of each input: tokens_per_request for per-token inputs, else 1."""
        return {n: s.rows(1, self.tokens_per_request) for n, s in self.inputs.items()}

    def checker_specs(self) -> List[Tuple[str, List[int], torch.dtype, bytes, int, bool]]:
        """The input specs as the native input checker takes them."""
        rows = self.rows_per_request
        return [(n, list(s.shape), s.dtype, s.pad_bytes(), rows[n], s.padding == "each_step")
                for n, s in self.inputs.items()]

    def out_buffers(self) -> Dict[str, torch.Tensor]:
        """The caller's output buffers by output name ("output", "output['logits']")."""
        if self.out is None:
            return {}
        if isinstance(self.out, torch.Tensor):
            return {"output": self.out}
        return {f"output[{key!r}]": t for key, t in self.out.items()}

    def _owners(self) -> List[Tuple[str, Long]]:
        """What the caller keeps alive for the graphs, named: keep's entries, then fn's module (fn itself, or
        the module whose method fn is), if any."""
        owners: List[Tuple[str, Long]] = [(f"keep[{i}]", owner) for i, owner in enumerate(self.keep)]
        module = self.fn if isinstance(self.fn, torch.nn.Module) else getattr(self.fn, "__self__", None)
        if isinstance(module, torch.nn.Module):
            owners.append(("fn", module))
        return owners

    def declared(self) -> List[torch.Tensor]:
        """Tensors this runner's graphs may use that the caller keeps alive: fn's parameters and buffers when fn
        is a module (or a module's method), and everything in keep."""
        out: List[torch.Tensor] = list(self.out_buffers().values())
        for _, owner in self._owners():
            if isinstance(owner, torch.nn.Module):
                out += [*owner.parameters(), *owner.buffers()]
            else:
                out.append(owner)
        return out

    def state_buffers(self) -> Dict[str, torch.Tensor]:
        """The declared tensors a step may write, by how messages name them: the caller's output buffers,
        the buffers of fn's module and of keep's modules (a KV cache, engine metadata), and keep's tensors.
        Parameters are left out: a step only reads its weights, and guard would copy them every replay."""
        out = dict(self.out_buffers())
        for where, owner in self._owners():
            if isinstance(owner, torch.nn.Module):
                suffix = "" if where == "fn" else f" of {where}"
                out.update((f"buffer {name!r}{suffix}", t) for name, t in owner.named_buffers())
            else:
                out[where] = owner
        return out

    def without_pool(self) -> "RunnerSpec":
        """The same spec with a new pool: what a child process builds from (a pool id means nothing there)."""
        return dataclasses.replace(self, pool=None)


def _is_int(value: object) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _hook(name: str, value: object) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")
    return value


def checked_device(device: Optional[Union[int, str, torch.device]]) -> int:
    """The CUDA device index `device` names (None: the current device); raises naming the argument."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else 0
    if isinstance(device, bool) or not isinstance(device, (int, str, torch.device)):
        raise TypeError(f"device must be an int, a str like 'cuda:0' or a torch.device, got {type(device).__name__}")
    try:
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a device name; pass e.g. 'cuda:0' or 0") from exc
    if dev.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {dev}")
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if torch.cuda.is_available() and index >= torch.cuda.device_count():
        raise ValueError(f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return index


def checked_spec(fn: Callable[..., Any], inputs: Dict[str, StaticInput], max_batch_size: Optional[int],
                 capture_sizes: Optional[Sequence[int]], **options: Any) -> RunnerSpec:
    """A RunnerSpec from GraphRunner's arguments; every bad argument raises TypeError or ValueError naming it
    and the fix."""
    if not callable(fn):
        raise TypeError(f"fn must be callable (a function or an nn.Module), got {type(fn).__name__}")
    if not isinstance(inputs, dict) or not inputs:
        raise TypeError("inputs must be a non-empty dict of name -> gr.StaticInput")
    for name, spec in inputs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"input names must be Python identifiers (they are fn's keyword arguments), got {name!r}")
        if not isinstance(spec, StaticInput):
            raise TypeError(f"inputs[{name!r}] must be a gr.StaticInput, got {type(spec).__name__}")
    if max_batch_size is not None:
        checked_max_batch_size(max_batch_size)
    sizes = checked_capture_sizes(capture_sizes, max_batch_size)
    fallback = options.get("fallback", "eager")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be 'eager' or 'error', got {fallback!r}")
    warmup = options.get("warmup", 1)
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    mode = options.get("capture_error_mode", "global")
    if mode not in CAPTURE_ERROR_MODES:
        raise ValueError(f"capture_error_mode must be one of {CAPTURE_ERROR_MODES}, got {mode!r}")
    pool = options.get("pool")
    pool_id(pool)  # raises TypeError naming what a pool may be
    timeout = options.get("collective_timeout_s", 300.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"collective_timeout_s must be a positive number of seconds, got {timeout!r}")
    keep = options.get("keep", ())
    if isinstance(keep, (torch.Tensor, torch.nn.Module)) or not isinstance(keep, (list, tuple)):
        raise TypeError(f"keep must be a list of tensors and modules, got {type(keep).__name__}")
    for item in keep:
        if not isinstance(item, (torch.Tensor, torch.nn.Module)):
            raise TypeError(f"keep must hold tensors and modules only, got {type(item).__name__}")
    name = options.get("name") or ""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    for key in ("clone_outputs", "no_grad", "strict", "debug", "verbose"):
        if key in options:
            _flag(key, options[key])
    for key in ("on_capture", "before_replay", "capture_inputs"):
        _hook(key, options.get(key))
    tokens = options.get("tokens_per_request", 1)
    if not _is_int(tokens) or not 1 <= tokens <= 1024:
        raise ValueError(f"tokens_per_request must be an int in 1..1024, got {tokens!r}")
    lead = options.get("max_lead", DEFAULT_MAX_LEAD)
    if lead is not None and (not _is_int(lead) or not 1 <= lead <= 1024):
        raise ValueError(f"max_lead must be None (no bound) or an int in 1..1024, got {lead!r}")
    out = options.get("out")
    buffers = [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) else None
    if out is not None and (buffers is None or not all(isinstance(t, torch.Tensor) for t in buffers)):
        raise TypeError("out must be a tensor (when fn returns one) or a dict of output name -> tensor (when fn "
                        f"returns a dict), got {type(out).__name__}")
    known = {f.name for f in dataclasses.fields(RunnerSpec)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown GraphRunner argument(s) {sorted(unknown)}")
    given = {k: v for k, v in options.items() if k not in ("device", "keep", "name")}
    return RunnerSpec(fn=fn, inputs=dict(inputs), max_batch_size=sizes[-1], capture_sizes=tuple(sizes),
                      device=checked_device(options.get("device")), keep=tuple(keep), name=name, **given)
