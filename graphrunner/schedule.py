"""Which batch sizes to capture, and in which order. (Which size a batch runs at: `_C.SizeTable`.)"""
from __future__ import annotations

from typing import Iterable, List, Optional

# Serving engines capture up to a few hundred rows; past this, steps are compute-bound and gain nothing from
# graphs, while every captured size costs capture time and host memory.
MAX_BATCH_SIZE = 8192


def checked_max_batch_size(value: object, name: str = "max_batch_size") -> int:
    """`value` when it is an int in 1..MAX_BATCH_SIZE; raises naming `name` and the fix otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    if value > MAX_BATCH_SIZE:
        raise ValueError(f"{name} must be at most {MAX_BATCH_SIZE}, got {value}: larger batches are compute-bound "
                         "and gain nothing from CUDA graphs; capture up to a few hundred rows and let larger "
                         "batches run eagerly (fallback='eager')")
    return value


def default_capture_sizes(max_batch_size: int) -> List[int]:
    """Sizes as serving engines choose them: 1, 2, 4, 8, 12, 16, 24, 32, then every 8 up to 256, every 16
    up to 512, every 32 beyond; always ending at `max_batch_size`.

    Args:
        max_batch_size: the largest batch a step may have, in 1..MAX_BATCH_SIZE.
    """
    checked_max_batch_size(max_batch_size)
    sizes = [1, 2, 4, 8, 12, 16, 24, 32] + list(range(40, 257, 8)) + list(range(272, 513, 16))
    sizes += list(range(544, max_batch_size + 1, 32))
    return [s for s in sizes if s < max_batch_size] + [max_batch_size]


def checked_capture_sizes(capture_sizes: Optional[Iterable[int]], max_batch_size: Optional[int]) -> List[int]:
    """The sizes to capture, ascending and unique, checked against `max_batch_size`.

    Args:
        capture_sizes: the sizes, or None for `default_capture_sizes(max_batch_size)`.
        max_batch_size: the largest batch; None means the largest of `capture_sizes`.
    """
    if capture_sizes is None:
        if max_batch_size is None:
            raise TypeError("pass max_batch_size (the largest batch a step may have), capture_sizes, or both")
        return default_capture_sizes(max_batch_size)
    if isinstance(capture_sizes, (str, bytes)) or not hasattr(capture_sizes, "__iter__"):
        raise TypeError(f"capture_sizes must be a list of ints, got {type(capture_sizes).__name__} "
                        f"{capture_sizes!r}; pass e.g. [{capture_sizes!r}] or None for the default list")
    given = list(capture_sizes)
    bad = [s for s in given if not isinstance(s, int) or isinstance(s, bool)]
    if bad:
        raise TypeError(f"capture_sizes must hold ints only, got {bad}")
    sizes = sorted(set(given))
    if not sizes:
        raise ValueError("capture_sizes is empty; pass at least one size, or None for the default list")
    limit = MAX_BATCH_SIZE if max_batch_size is None else max_batch_size
    out_of_range = [s for s in sizes if not 1 <= s <= limit]
    if out_of_range:
        raise ValueError(f"capture_sizes must be ints in 1..max_batch_size ({limit}); got {out_of_range}")
    if max_batch_size is not None and sizes[-1] != max_batch_size:
        raise ValueError(f"max_batch_size ({max_batch_size}) is above the largest of capture_sizes ({sizes[-1]}): "
                         f"batches {sizes[-1] + 1}..{max_batch_size} would have no graph. Leave max_batch_size out "
                         f"(it defaults to the largest size) or add {max_batch_size} to capture_sizes")
    return sizes


def capture_order(capture_sizes: Iterable[int]) -> List[int]:
    """Largest first: every later (smaller) graph reuses the memory the largest graph's pool already holds."""
    return sorted(capture_sizes, reverse=True)
