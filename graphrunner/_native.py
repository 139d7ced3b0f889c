"""Loads the native core, graphrunner._C, with errors that say how to build it and which torch it needs."""
import re

import torch

try:
    from graphrunner import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        f"graphrunner's native core (graphrunner._C) did not load with torch {torch.__version__}: {exc}. It loads "
        "only with the torch release it was compiled against; rebuild it in this environment with "
        "`pip install --no-build-isolation .` (in the source checkout, `make install` does it)."
    ) from exc


def _release(version: str) -> str:
    return ".".join(re.match(r"(\d+)\.(\d+)", version).groups())


if _release(_C.TORCH_VERSION) != _release(torch.__version__):
    raise ImportError(
        f"graphrunner's native core was compiled against torch {_C.TORCH_VERSION}, but torch {torch.__version__} "
        "is installed; the C++ interface differs between releases. Rebuild graphrunner in this environment "
        "(`pip install --no-build-isolation --force-reinstall --no-deps .`), or install torch "
        f"{_release(_C.TORCH_VERSION)}.*")

CudaError = _C.CudaError
GraphStateError = _C.GraphStateError
