"""`Graph`: one CUDA graph driven by graphrunner's own C++ (capture, instantiate, upload, replay, reset)."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from graphrunner._native import _C

PoolId = Tuple[int, int]
PoolLike = Union[None, PoolId, "torch.cuda.MemPool", "Graph"]

_capture_streams: Dict[int, torch.cuda.ExternalStream] = {}


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


def capture_stream(device: Union[int, torch.device]) -> torch.cuda.ExternalStream:
    """The stream graphs capture on by default: one per device that only graphrunner uses (public: workloads that
    capture their own torch or graphrunner graphs to compare with a runner's capture on it too).

    torch hands its pooled streams out round-robin, so a `torch.cuda.Stream()` may be the very stream a torch
    graph or other code uses, and torch caches cuBLAS workspaces per stream: a private stream keeps the
    workspaces our captures use apart from everyone else's (see csrc/workspaces.h).
    """
    index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.ExternalStream(_C.private_stream(index), device=index)
    return _capture_streams[index]


class Graph(_C.Graph):
    """One CUDA graph, captured into a PyTorch allocator pool that other graphs (ours or torch's) may share.

    >>> g = Graph()
    >>> with g.capture(pool=torch.cuda.graph_pool_handle()):
    ...     y = x * 2
    >>> g.replay()          # on the current stream; y holds the result

    """

    def __init__(self, keep_graph: bool = False) -> None:
        """Args:
            keep_graph: keep the cudaGraph_t after instantiation, for `debug_dump()`, `scan()`, `structure()`, and
                for other graphs to `share()` its executable.
        """
        super().__init__(keep_graph)

    @contextlib.contextmanager
    def capture(
        self,
        pool: PoolLike = None,
        stream: Optional[torch.cuda.Stream] = None,
        capture_error_mode: str = "global",
        instantiate: bool = True,
    ) -> Iterator["Graph"]:
        """Captures the work issued inside the block on `stream`.

        Args:
            pool: the allocator pool the captured work allocates from: a pool id, a `torch.cuda.MemPool` or
                another `Graph` (to share its pool); None makes a new pool.
            stream: the stream to capture on; None takes graphrunner's own stream for the current device.
            capture_error_mode: CUDA's stream capture mode: "global", "thread_local" or "relaxed".
            instantiate: instantiate and upload the graph when the block ends; False keeps only the cudaGraph_t,
                and `share(owner)` (serve it through another graph's executable) or `instantiate()` gives it
                an executable.

        If the block raises, the capture is aborted, the pool hold is given back and the stream is usable again.
        """
        require_cuda()
        stream = stream if stream is not None else capture_stream(torch.cuda.current_device())
        # The capture stream must see everything issued before the capture on the caller's stream.
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            self.capture_begin(pool_id(pool), capture_error_mode)
            try:
                yield self
            except BaseException:
                self.abort_capture()
                raise
            self.capture_end(instantiate)
        torch.cuda.current_stream(stream.device).wait_stream(stream)
