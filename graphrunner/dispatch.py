"""`Dispatch`: one entry point for every step of a serving loop, which picks the graph that serves it.

A serving engine runs two shapes of step: decode-only (every request one token: a uniform runner's graph, whose
attention can take a decode kernel) and mixed (prefill chunks with decode tokens: a ragged runner's graph,
keyed by tokens). Which graph serves a step is decided here, apart from capture (vLLM's CudagraphDispatcher is
the model); each runner then stages and replays in its own native call, or runs the step eagerly where no
captured size holds it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from graphrunner._native import _C
from graphrunner.runner import GraphRunner, RunnerState


class Dispatch:
    """Runs each step through the uniform runner when every request has one token and a captured size holds
    it, else through the ragged runner (a graph, or eagerly by its fallback).

    Both runners take the step's inputs by the same names; the uniform runner takes a subset of the ragged
    runner's, without the split (a decode step needs none). Capture them together into one pool with
    `gr.capture_all(uniform, ragged)`: they never replay concurrently.

    Args:
        ragged: a ragged runner (built with `split=`): serves every step the uniform runner does not.
        uniform: a uniform runner with tokens_per_request=1 whose inputs are the ragged runner's without the
            split, or None (every step goes to the ragged runner).
    """

    def __init__(self, ragged: GraphRunner, uniform: Optional[GraphRunner] = None) -> None:
        if not isinstance(ragged, GraphRunner) or not ragged.spec.ragged:
            raise TypeError("Dispatch(ragged=...) takes a ragged GraphRunner (built with split=...), got "
                            f"{type(ragged).__name__}")
        self.ragged, self.uniform = ragged, uniform
        self._split = ragged.spec.split
        self._counted = next(n for n, s in ragged.spec.inputs.items() if s.per_token)  # its rows are the tokens
        self._uniform_names: tuple = ()
        if uniform is not None:
            if not isinstance(uniform, GraphRunner) or uniform.spec.ragged or uniform.spec.tokens_per_request != 1:
                raise TypeError("Dispatch(uniform=...) takes a uniform GraphRunner with tokens_per_request=1 (one "
                                "token per request: decode), or None")
            names = set(uniform.spec.inputs)
            extra = names - (set(ragged.spec.inputs) - {self._split})
            if extra:
                raise ValueError(f"the uniform runner's inputs must be the ragged runner's without the split "
                                 f"{self._split!r}; it also takes {sorted(extra)}")
            self._uniform_names = tuple(uniform.spec.inputs)

    def runner_for(self, requests: int, tokens: int) -> GraphRunner:
        """The runner a step of `requests` requests and `tokens` tokens goes to.

        Args:
            requests: the step's requests.
            tokens: the step's tokens (>= requests).
        """
        if self.uniform is not None and tokens == requests and self.uniform.size_for(requests):
            return self.uniform
        return self.ragged

    def __call__(self, **inputs: torch.Tensor) -> Any:
        """Runs one step; takes the ragged runner's inputs (the split on the host) and returns its outputs."""
        uniform = self.uniform
        # A step is decode-only when it has as many tokens as requests and its split says one token each (a
        # split that says otherwise goes to the ragged runner, whose checks name what is wrong with it).
        if uniform is not None and uniform.state is RunnerState.ARMED:
            split, counted = inputs.get(self._split), inputs.get(self._counted)
            if isinstance(split, torch.Tensor) and isinstance(counted, torch.Tensor) and split.dim() and \
                    counted.dim() and split.shape[0] == counted.shape[0] and uniform.size_for(split.shape[0]) and _C.all_ones(split):
                return uniform(**{name: inputs[name] for name in self._uniform_names})
        return self.ragged(**inputs)
