"""`StaticInput`: one input of a step function, checked where it is made."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

Number = Union[int, float, bool]
PADDINGS = ("each_step", "keep")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or isinstance(value, bool)


@dataclass(frozen=True)
class StaticInput:
    """One input of the step function: its per-row shape, dtype, and the value padding rows get.

    Args:
        shape: the shape of one row, without the batch dimension: `()` for one value per row (a token id),
            `(pages_per_seq,)` for a page-table row. A tuple (or list) of ints >= 0.
        dtype: a `torch.dtype`, e.g. `torch.long`.
        pad: the value staged into padding rows (rows past the real batch, up to the captured size). An int
            in the dtype's range for integer dtypes, a number for float dtypes, a bool for `torch.bool`.
        low: the lower bound of the random values `validate()` draws for this input.
        high: the upper bound (exclusive for integers); for floats, None draws a standard normal instead.
        per_token: the input has one row per token, `tokens_per_request` rows per request (positions in a
            verify step), rather than one row per request (sequence lengths, page-table rows).
        padding: "each_step" writes `pad` into the padding rows on every step; "keep" writes it once, when the
            runner is built (so index inputs are valid before the first capture), and steps then leave padding
            rows as they are: they keep the pad or a real row of an earlier, larger step, valid either way, at
            no cost per step. A sentinel your kernels treat as "no page" is just a pad value (pad=-1).
    """

    shape: Tuple[int, ...]
    dtype: torch.dtype
    pad: Number = 0
    low: float = 0
    high: Optional[float] = None
    per_token: bool = False
    padding: str = "each_step"

    def __post_init__(self) -> None:
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        if not isinstance(self.shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                        for d in self.shape):
            raise TypeError(f"StaticInput shape must be a tuple of ints, the shape of one row without the batch "
                            f"dimension, got {type(self.shape).__name__} {self.shape!r}; pass () for one value per "
                            "row or (4,) for four")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"StaticInput shape must have sizes >= 0, got {self.shape}; the batch dimension is "
                             "not part of it (the runner adds it)")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"StaticInput dtype must be a torch.dtype, got {type(self.dtype).__name__} "
                            f"{self.dtype!r}; pass e.g. torch.float32 or torch.long")
        self._check_pad()
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or isinstance(value, bool)):
                raise TypeError(f"StaticInput {name} must be a number, got {type(value).__name__} {value!r}")
        if self.high is not None and not self.high > self.low:
            raise ValueError(f"StaticInput high ({self.high}) must be above low ({self.low})")
        if not isinstance(self.per_token, bool):
            raise TypeError(f"StaticInput per_token must be True or False, got {self.per_token!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"StaticInput padding must be one of {PADDINGS}, got {self.padding!r}")

    def rows(self, requests: int, tokens_per_request: int) -> int:
        """Rows of this input for `requests` requests."""
        return requests * tokens_per_request if self.per_token else requests

    def _check_pad(self) -> None:
        pad, dtype = self.pad, self.dtype
        if not _is_number(pad):
            raise TypeError(f"StaticInput pad must be a number, got {type(pad).__name__} {pad!r}; pass e.g. pad=0")
        if dtype == torch.bool:
            if pad not in (0, 1):
                raise ValueError(f"StaticInput pad for torch.bool must be True or False, got {pad!r}")
        elif not dtype.is_floating_point and not dtype.is_complex:
            if isinstance(pad, float) and not (math.isfinite(pad) and pad.is_integer()):
                raise ValueError(f"StaticInput pad {pad!r} is not a whole number, but dtype {dtype} holds integers; "
                                 "pass an int")
            info = torch.iinfo(dtype)
            if not info.min <= pad <= info.max:
                raise ValueError(f"StaticInput pad {pad!r} does not fit {dtype} ({info.min}..{info.max})")

    def pad_bytes(self) -> bytes:
        """The pad value's bytes in this dtype, as the staging kernel repeats them over padding rows."""
        return bytes(torch.tensor([self.pad], dtype=self.dtype).view(torch.uint8).tolist())
