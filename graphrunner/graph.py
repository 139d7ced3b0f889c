"""`Graph`: one CUDA graph driven by graphrunner's own C++ (capture, instantiate, upload, replay, reset)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple, Union

import torch

from graphrunner._native import _C

PoolId = Tuple[int, int]
PoolLike = Union[None, PoolId, "torch.cuda.MemPool", "Graph"]

_side_streams: dict = {}


def require_cuda() -> None:
    """Raises a clear error where no CUDA device can be used."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "graphrunner needs a CUDA device, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run on a machine with an NVIDIA GPU."
        )


def pool_id(pool: PoolLike) -> PoolId:
    """The allocator pool id of a pool given as an id tuple, a torch.cuda.MemPool or a Graph; (0, 0) = new."""
    if pool is None:
        return (0, 0)
    if isinstance(pool, _C.Graph):
        return tuple(pool.pool)
    if hasattr(pool, "id"):
        return tuple(pool.id)
    if isinstance(pool, tuple) and len(pool) == 2 and all(isinstance(x, int) for x in pool):
        return pool
    raise TypeError(
        f"pool must be None, a pool id from torch.cuda.graph_pool_handle(), a torch.cuda.MemPool or a Graph; "
        f"got {type(pool).__name__}"
    )


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream graphs capture on by default: one side stream per device, never the legacy default stream."""
    index = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class Graph(_C.Graph):
    """One CUDA graph, captured into a PyTorch allocator pool that other graphs (ours or torch's) may share.

    >>> g = Graph()
    >>> with g.capture(pool=torch.cuda.graph_pool_handle()):
    ...     y = x * 2
    >>> g.replay()          # on the current stream; y holds the result

    `keep_graph=True` keeps the cudaGraph_t after instantiation, for `debug_dump(path)` (DOT).
    """

    def __init__(self, keep_graph: bool = False) -> None:
        super().__init__(keep_graph)

    @contextlib.contextmanager
    def capture(
        self,
        pool: PoolLike = None,
        stream: Optional[torch.cuda.Stream] = None,
        capture_error_mode: str = "global",
    ) -> Iterator["Graph"]:
        """Captures the work issued inside the block on `stream` (default: a side stream).

        Allocations made by the captured work go to `pool`; a new pool when None. If the block raises,
        the capture is aborted, the pool hold is given back and the stream is usable again.
        """
        require_cuda()
        stream = stream if stream is not None else side_stream(torch.device("cuda"))
        # The capture stream must see everything issued before the capture on the caller's stream.
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            self.capture_begin(pool_id(pool), capture_error_mode)
            try:
                yield self
            except BaseException:
                self.abort_capture()
                raise
            self.capture_end()
        torch.cuda.current_stream(stream.device).wait_stream(stream)
