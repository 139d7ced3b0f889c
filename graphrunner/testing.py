"""Helpers for comparing graph outputs with eager: random inputs (uniform and ragged steps), relative_error,
default_rtol, poison, SCRUB_WORD.

Validation (`GraphRunner.validate`) uses them; so can tests and workloads that check graphs of their own.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from graphrunner.inputs import StaticInput

__all__ = ["SCRUB_WORD", "default_rtol", "poison", "random_inputs", "random_ragged_inputs", "random_split",
           "relative_error"]

SCRUB_WORD = 0x7FFFFFFF  # NaN as float32/float64 words and bf16/fp16 halves; INT_MAX as int32


def random_inputs(inputs: Mapping[str, StaticInput], batch: int, gen: torch.Generator,
                  tokens_per_request: int = 1) -> Dict[str, torch.Tensor]:
    """Fresh inputs for one step of a uniform runner on gen's device, each drawn from its StaticInput's range.

    Args:
        inputs: the runner's input specs.
        batch: requests to draw.
        gen: the generator (its device is where the tensors go).
        tokens_per_request: rows per request of per-token inputs.
    """
    return {name: _draw(spec, spec.rows(batch, tokens_per_request), gen) for name, spec in inputs.items()}


def random_split(tokens: int, requests: int, gen: torch.Generator) -> torch.Tensor:
    """Each request's token count for a ragged step (a CPU int64 tensor): `requests` counts >= 1 summing to
    `tokens`, cut at random points, so a step mixes long prefill chunks with one-token decode rows.

    Args:
        tokens: the step's tokens.
        requests: the step's requests, 1..tokens.
        gen: the generator (any device; the cut points are drawn there).
    """
    cuts = torch.randperm(tokens - 1, generator=gen, device=gen.device)[: requests - 1].cpu() + 1
    edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([tokens])])
    return edges.diff()


def random_ragged_inputs(inputs: Mapping[str, StaticInput], split: str, tokens: int, requests: int,
                         gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Fresh inputs for one step of a ragged runner: per-token inputs with `tokens` rows, the others with
    `requests`, the split (on the host) from random_split.

    Args:
        inputs: the runner's input specs.
        split: the name of its split input.
        tokens: the step's tokens.
        requests: the step's requests, 1..tokens.
        gen: the generator (its device is where the tensors other than the split go).
    """
    out = {name: _draw(spec, tokens if spec.per_token else requests, gen)
           for name, spec in inputs.items() if name != split}
    out[split] = random_split(tokens, requests, gen).to(inputs[split].dtype)
    return out


def _draw(spec: StaticInput, rows: int, gen: torch.Generator) -> torch.Tensor:
    shape = (rows, *spec.shape)
    if spec.dtype.is_floating_point:
        if spec.high is None:
            t = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
        else:
            t = torch.rand(shape, generator=gen, device=gen.device) * (spec.high - spec.low) + spec.low
        return t.to(spec.dtype)
    high = spec.high if spec.high is not None else spec.low + 2
    return torch.randint(int(spec.low), int(high), shape, generator=gen, device=gen.device,
                         dtype=torch.int64).to(spec.dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; 0 or inf for exact dtypes; inf where the non-finite places differ."""
    if not want.dtype.is_floating_point:
        return 0.0 if torch.equal(got, want) else float("inf")
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all() and not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def default_rtol(dtype: torch.dtype) -> float:
    """The relative error `validate()` accepts for an output of `dtype`."""
    if not dtype.is_floating_point:
        return 0.0
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def poison(t: torch.Tensor) -> None:
    """Fills a tensor's whole storage with the scrub pattern, so an output the graph fails to write is seen."""
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    (raw.view(torch.int32).fill_(SCRUB_WORD) if raw.numel() % 4 == 0 else raw.fill_(0x7F))
