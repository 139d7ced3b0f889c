"""The output structures a step function may return: a Tensor, or a tuple, list or dict of Tensors."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch


def map_tensors(out: Any, fn: Callable[[str, torch.Tensor], torch.Tensor], where: str = "output") -> Any:
    """Applies fn(name, tensor) to every tensor of `out`, keeping its structure; rejects anything else."""
    if isinstance(out, torch.Tensor):
        return fn(where, out)
    if isinstance(out, (tuple, list)):
        return type(out)(map_tensors(v, fn, f"{where}[{i}]") for i, v in enumerate(out))
    if isinstance(out, dict):
        return {k: map_tensors(v, fn, f"{where}[{k!r}]") for k, v in out.items()}
    raise TypeError(
        f"the step function returned {type(out).__name__} at {where}; it must return a Tensor, or a tuple, "
        "list or dict of Tensors, each with the batch in dim 0"
    )


def clone_tensors(out: Any) -> Any:
    """A copy of every tensor of `out`, in the same structure."""
    return map_tensors(out, lambda _, t: t.clone())


def named_tensors(out: Any) -> Dict[str, torch.Tensor]:
    """Every tensor of `out` by its place in the structure ("output", "output[0]", "output['logits']")."""
    found: Dict[str, torch.Tensor] = {}
    map_tensors(out, lambda name, t: found.setdefault(name, t))
    return found
