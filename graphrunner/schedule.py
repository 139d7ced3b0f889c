"""Which batch sizes to capture, and in which order."""
from __future__ import annotations

from typing import Iterable, List, Optional


def default_capture_sizes(max_batch_size: int) -> List[int]:
    """Sizes as serving engines choose them: 1, 2, 4, 8, 12, 16, 24, 32, then every 8 up to 256, every 16
    up to 512, every 32 beyond; always ending at `max_batch_size`."""
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    sizes = [1, 2, 4, 8, 12, 16, 24, 32] + list(range(40, 257, 8)) + list(range(272, 513, 16))
    sizes += list(range(544, max_batch_size + 1, 32))
    return [s for s in sizes if s < max_batch_size] + [max_batch_size]


def checked_capture_sizes(capture_sizes: Optional[Iterable[int]], max_batch_size: int) -> List[int]:
    """The sizes to capture, ascending and unique; the default list when None."""
    if capture_sizes is None:
        return default_capture_sizes(max_batch_size)
    sizes = sorted(set(capture_sizes))
    if not sizes:
        raise ValueError("capture_sizes is empty; pass at least one size, or None for the default list")
    bad = [s for s in sizes if not isinstance(s, int) or not 1 <= s <= max_batch_size]
    if bad:
        raise ValueError(f"capture_sizes must be ints in 1..max_batch_size ({max_batch_size}); got {bad}")
    return sizes


def capture_order(capture_sizes: Iterable[int]) -> List[int]:
    """Largest first: every later (smaller) graph reuses the memory the largest graph's pool already holds."""
    return sorted(capture_sizes, reverse=True)


def size_for(batch: int, capture_sizes: List[int]) -> Optional[int]:
    """The smallest captured size that holds `batch` rows, or None above the largest."""
    return next((s for s in sorted(capture_sizes) if s >= batch), None)
