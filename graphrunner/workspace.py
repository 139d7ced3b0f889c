"""`workspace()`: state an op keeps across steps, made once outside every graph pool.

Memory an op allocates inside a capture belongs to the shared pool: another size's graph reuses it
between replays. An op that needs memory to keep its contents (a counter reset on exit, a cached table)
asks for a named workspace instead. It is made at the first request, which must come before capture
(the runner's warm-up does this), and is never freed while the process runs.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from graphrunner.errors import WorkspaceError
from graphrunner.graph import require_cuda

_workspaces: Dict[Tuple[str, int], torch.Tensor] = {}


def workspace(name: str, nbytes: int, *, zero: bool = False,
              init: Optional[Callable[[torch.Tensor], None]] = None,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """A uint8 tensor of `nbytes` that keeps its contents across steps and graph replays.

    Args:
        name: the workspace's name; every request with the same name and device gets the same memory.
        nbytes: bytes wanted; the first request must ask for the most any later request will.
        zero: zero it on every call; inside a capture this records a memset, so each replay starts at zero.
        init: called once with the new tensor, eagerly, when the workspace is made (to fill a table, say).
        device: its GPU; None: the current device.
    """
    require_cuda()
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1:
        raise ValueError(f"workspace {name!r}: nbytes must be a positive int, got {nbytes!r}")
    index = torch.device(device).index if device is not None else torch.cuda.current_device()
    key = (name, index if index is not None else torch.cuda.current_device())
    buf = _workspaces.get(key)
    if buf is None:
        if torch.cuda.is_current_stream_capturing():
            raise WorkspaceError(
                f"workspace {name!r} ({nbytes} bytes) was first requested inside a CUDA graph capture, where it "
                "would land in the shared graph pool; request it before capture: GraphRunner's warm-up does, "
                "so run the op at the largest size during warm-up, or call gr.workspace() at model init")
        buf = torch.zeros(nbytes, dtype=torch.uint8, device=torch.device("cuda", key[1]))
        if init is not None:
            init(buf)
        _workspaces[key] = buf
    elif buf.numel() < nbytes:
        # Growing it would free memory that captured graphs still use.
        raise WorkspaceError(f"workspace {name!r} was made with {buf.numel()} bytes and is now asked for {nbytes}; "
                             "ask for the largest size at the first request")
    view = buf[:nbytes]
    if zero:
        view.zero_()
    return view



def workspace_tensors() -> List[torch.Tensor]:
    """Every workspace made so far (the audit counts them as declared long-lived)."""
    return list(_workspaces.values())
