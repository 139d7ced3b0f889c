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
from graphrunner.reach import held_by
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
    """A GraphRunner's arguments, checked where made: every bad one raises TypeError or ValueError naming it
    and the fix (see GraphRunner for what each one means). The defaults here are the only ones: GraphRunner's
    signature reads them from this class.

    Two keys: a uniform runner's sizes count requests, each with `tokens_per_request` rows in per-token inputs;
    a ragged runner (`split` set) has sizes that count tokens, size T holding up to `max_requests[T]` requests.
    """

    fn: Callable[..., Any]
    inputs: Mapping[str, StaticInput]
    max_batch_size: Optional[int] = None
    capture_sizes: Optional[Sequence[int]] = None
    pool: PoolLike = None
    warmup: int = 1
    fallback: str = "eager"
    on_capture: Optional[Callable[[StepInfo], None]] = None
    before_replay: Optional[Callable[[StepInfo], None]] = None
    clone_outputs: bool = False
    no_grad: bool = True
    device: Optional[Union[int, str, torch.device]] = None
    capture_error_mode: str = "global"
    strict: bool = False
    debug: bool = False
    collective_timeout_s: float = 300.0
    keep: Sequence[Long] = ()
    name: Optional[str] = ""
    verbose: bool = False
    tokens_per_request: int = 1
    out: Any = None
    capture_inputs: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None
    max_lead: Optional[int] = DEFAULT_MAX_LEAD
    split: Optional[str] = None
    max_requests: Union[None, int, Mapping[int, int]] = None
    share_segments: bool = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"fn must be callable (a function or an nn.Module), got {type(self.fn).__name__}")
        _check_inputs(self.inputs)
        if self.max_batch_size is not None:
            checked_max_batch_size(self.max_batch_size)
        sizes = checked_capture_sizes(self.capture_sizes, self.max_batch_size)
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be 'eager' or 'error', got {self.fallback!r}")
        if not _is_int(self.warmup) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if self.capture_error_mode not in CAPTURE_ERROR_MODES:
            raise ValueError(f"capture_error_mode must be one of {CAPTURE_ERROR_MODES}, got {self.capture_error_mode!r}")
        pool_id(self.pool)  # raises TypeError naming what a pool may be
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"collective_timeout_s must be a positive number of seconds, got {timeout!r}")
        keep = self.keep
        if isinstance(keep, (torch.Tensor, torch.nn.Module)) or not isinstance(keep, (list, tuple)):
            raise TypeError(f"keep must be a list of tensors and modules, got {type(keep).__name__}")
        for item in keep:
            if not isinstance(item, (torch.Tensor, torch.nn.Module)):
                raise TypeError(f"keep must hold tensors and modules only, got {type(item).__name__}")
        name = self.name or ""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        for key in ("clone_outputs", "no_grad", "strict", "debug", "verbose", "share_segments"):
            _flag(key, getattr(self, key))
        for key in ("on_capture", "before_replay", "capture_inputs"):
            _hook(key, getattr(self, key))
        tokens = self.tokens_per_request
        if not _is_int(tokens) or not 1 <= tokens <= 1024:
            raise ValueError(f"tokens_per_request must be an int in 1..1024, got {tokens!r}")
        lead = self.max_lead
        if lead is not None and (not _is_int(lead) or not 1 <= lead <= 1024):
            raise ValueError(f"max_lead must be None (no bound) or an int in 1..1024, got {lead!r}")
        out = self.out
        buffers = [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) else None
        if out is not None and (buffers is None or not all(isinstance(t, torch.Tensor) for t in buffers)):
            raise TypeError("out must be a tensor (when fn returns one) or a dict of output name -> tensor (when fn "
                            f"returns a dict), got {type(out).__name__}")
        requests = _checked_split(self, sizes)
        for key, value in (("inputs", dict(self.inputs)), ("max_batch_size", sizes[-1]),
                           ("capture_sizes", tuple(sizes)), ("device", checked_device(self.device)),
                           ("keep", tuple(keep)), ("name", name), ("max_requests", requests)):
            object.__setattr__(self, key, value)

    @property
    def ragged(self) -> bool:
        """Whether sizes count tokens (a split input is named) rather than requests."""
        return self.split is not None

    @property
    def capture_order(self) -> List[int]:
        """The captured sizes in the order they are captured: largest first."""
        return capture_order(self.capture_sizes)

    def requests_of(self, size: int) -> int:
        """The requests a captured size holds: the size itself (uniform), max_requests[size] (ragged).

        Args:
            size: a captured size.
        """
        return self.max_requests[size] if self.ragged else size

    def tokens_of(self, size: int) -> int:
        """The rows a per-token input has at a captured size: size * tokens_per_request (uniform), the size
        itself (ragged).

        Args:
            size: a captured size.
        """
        return size if self.ragged else size * self.tokens_per_request

    def rows(self, name: str, size: int) -> int:
        """Rows of input `name`'s static buffer that a graph of `size` reads.

        Args:
            name: an input's name.
            size: a captured size.
        """
        return self.tokens_of(size) if self.inputs[name].per_token else self.requests_of(size)

    def checker_specs(self) -> List[Tuple[str, List[int], torch.dtype, bytes, int, bool, bool, bool]]:
        """The input specs as the native input checker takes them."""
        return [(n, list(s.shape), s.dtype, s.pad_bytes(), 1 if self.ragged else s.rows(1, self.tokens_per_request),
                 s.padding == "each_step", self.ragged and s.per_token, n == self.split)
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

    def held(self) -> List[Tuple[str, torch.Tensor]]:
        """The tensors fn keeps alive, each with the path it is reached by (graphrunner.reach.held_by): a module's
        parameters and buffers, and what a closure, default arguments, a bound method's object, a partial's
        arguments or the globals fn's code names hold (a model, a KV cache object)."""
        return held_by(self.fn)

    def declared(self) -> List[torch.Tensor]:
        """Tensors this runner's graphs may use that live as long as the runner: the out= buffers, everything in
        keep, and every tensor fn keeps alive (held(): fn's parameters and buffers when fn is a module or a
        module's method, and what its closure, defaults, bound object, partial arguments and globals hold)."""
        out: List[torch.Tensor] = list(self.out_buffers().values())
        for _, owner in self._owners():
            if isinstance(owner, torch.nn.Module):
                out += [*owner.parameters(), *owner.buffers()]
            else:
                out.append(owner)
        out += [t for _, t in self.held() if t.is_cuda and _has_storage(t)]
        return out

    def state_buffers(self) -> Dict[str, torch.Tensor]:
        """The declared tensors a step may write, by how messages name them: the caller's output buffers,
        the buffers of fn's module and of keep's modules (a KV cache, engine metadata), keep's tensors, and the
        other tensors fn keeps alive on this runner's device that are neither parameters nor tensors requiring
        grad (a KV cache object's keys, values and position counter found through fn's closure, a module's plain
        tensor attribute), named by their path from fn ("fn.__closure__[1] (cache).layers[0].keys").
        Parameters are left out: a step only reads its weights, and guard would copy them every replay.

        Guard watches a runner's state buffers while other runners of the pool replay (runners that both reach
        a tensor share it, and don't watch it for each other); validate(restore_state=True) puts them back after
        each eager reference step. They are read when capture begins, before the warm-up: a cache that makes
        its tensors on first use (Hugging Face's StaticCache) counts only once it is initialised before capture()
        (a prefill, or its early_initialization())."""
        out = dict(self.out_buffers())
        for where, owner in self._owners():
            if isinstance(owner, torch.nn.Module):
                suffix = "" if where == "fn" else f" of {where}"
                out.update((f"buffer {name!r}{suffix}", t) for name, t in owner.named_buffers())
            else:
                out[where] = owner
        known = {id(t) for t in out.values()}
        for path, t in self.held():
            if id(t) in known or isinstance(t, torch.nn.Parameter) or t.requires_grad or not t.is_cuda or \
                    t.device.index != self.device or not _has_storage(t):
                continue
            known.add(id(t))
            out[path] = t
        return out

    def without_pool(self) -> "RunnerSpec":
        """The same spec with a new pool: what a child process builds from (a pool id means nothing there)."""
        return dataclasses.replace(self, pool=None)


def _has_storage(t: torch.Tensor) -> bool:
    """Whether a tensor has memory of its own to point at (a wrapper subclass or a fake tensor has none)."""
    try:
        t.untyped_storage()
        return t.data_ptr() != 0 or t.numel() == 0
    except (RuntimeError, NotImplementedError, TypeError):
        return False


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


def _check_inputs(inputs: object) -> None:
    if not isinstance(inputs, dict) or not inputs:
        raise TypeError("inputs must be a non-empty dict of name -> gr.StaticInput")
    for name, spec in inputs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"input names must be Python identifiers (they are fn's keyword arguments), got {name!r}")
        if not isinstance(spec, StaticInput):
            raise TypeError(f"inputs[{name!r}] must be a gr.StaticInput, got {type(spec).__name__}")


def _checked_split(spec: RunnerSpec, sizes: List[int]) -> Optional[Dict[int, int]]:
    """A ragged runner's requests per size ({T: R}), with its split checked; None for a uniform runner."""
    if spec.split is None:
        if spec.max_requests is not None:
            raise ValueError("max_requests is for a ragged runner: name its split input too (split='query_lens')")
        return None
    inputs = spec.inputs
    if spec.split not in inputs:
        raise ValueError(f"split {spec.split!r} is not an input; inputs are {sorted(inputs)}")
    s = inputs[spec.split]
    if s.per_token or s.shape != () or s.dtype not in (torch.int32, torch.int64) or s.pad != 0:
        raise ValueError(f"split input {spec.split!r} must be one int32 or int64 value per request with pad=0 (each "
                         "request's token count; padding requests have none): declare it "
                         "gr.StaticInput((), torch.int32)")
    if not any(i.per_token for i in inputs.values()):
        raise ValueError("a ragged runner needs per-token inputs (gr.StaticInput(..., per_token=True)): their rows "
                         "are the step's tokens")
    if spec.tokens_per_request != 1:
        raise ValueError("tokens_per_request is for uniform runners; a ragged runner's split says each request's "
                         "tokens")
    if spec.max_lead is None:
        raise ValueError("a ragged runner needs max_lead (it stages the split through max_lead + 2 host slots)")
    given = spec.max_requests
    if given is None or _is_int(given):
        if given is not None and given < 1:
            raise ValueError(f"max_requests must be a positive int or a dict of size -> requests, got {given!r}")
        return {t: min(t, given) if given is not None else t for t in sizes}
    if not isinstance(given, Mapping) or set(given) != set(sizes):
        raise ValueError(f"max_requests must be an int or a dict with one entry per captured size {sizes}, got "
                         f"{given!r}")
    bad = {t: r for t, r in given.items() if not _is_int(r) or not 1 <= r <= t}
    if bad:
        raise ValueError(f"max_requests[T] must be an int in 1..T (a size of T tokens holds at most T requests), got "
                         f"{bad}")
    falls = [t for a, t in zip(sizes, sizes[1:]) if given[t] < given[a]]
    if falls:
        raise ValueError(f"max_requests must not fall as sizes grow (then every step within the largest size's "
                         f"tokens and requests has a size), got {given}")
    return {t: given[t] for t in sizes}
