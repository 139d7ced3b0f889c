"""Loads the native core, graphrunner._C, with an error that says how to build it."""
import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

try:
    from graphrunner import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "graphrunner's native core (graphrunner._C) is not built or does not match this torch: "
        f"{exc}. Build it with `pip install --no-build-isolation .` (or `make build`) in the source checkout."
    ) from exc

CudaError = _C.CudaError
GraphStateError = _C.GraphStateError
