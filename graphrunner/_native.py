"""Loads the native core, graphrunner._C, with errors that say how to build it and which torch it needs."""
import importlib.metadata
import re
from pathlib import Path
from typing import Optional

import torch


def _checkout_without_core() -> Optional[Path]:
    """The source checkout this package was imported from (its parent holds setup.py and csrc/), when no native
    core was built in it; None otherwise."""
    package = Path(__file__).resolve().parent
    root = package.parent
    if not ((root / "setup.py").is_file() and (root / "csrc").is_dir()):
        return None
    return None if any(package.glob("_C*.so")) or any(package.glob("_C*.pyd")) else root


def _installed_elsewhere() -> Optional[Path]:
    """Where pip installed graphrunner with its native core, if anywhere but this package's directory."""
    package = Path(__file__).resolve().parent
    try:
        for dist in importlib.metadata.distributions(name="graphrunner"):
            candidate = Path(dist.locate_file("graphrunner")).resolve()
            if candidate != package and any(candidate.glob("_C*.so")):
                return candidate
    except Exception:  # metadata is only a hint here
        return None
    return None


def _shadowed_message(root: Path) -> str:
    installed = _installed_elsewhere()
    where = (f"so it shadows the graphrunner installed at {installed}" if installed is not None else
             "and no graphrunner with a built core is installed in this environment either (`pip install "
             "--no-build-isolation .` or `make install` in the checkout installs one)")
    return (f"graphrunner was imported from its source checkout {root}, which holds no built native core "
            f"(graphrunner/_C*.so there): Python puts the current directory (or the running script's) first on "
            f"sys.path, {where}. Either run from another directory, or with `python -P` (which leaves the current "
            "directory off sys.path), so the installed package imports; or build the core in place: `python "
            f"setup.py build_ext --inplace` in {root} (with torch and the CUDA toolkit, as for an install).")


try:
    from graphrunner import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    checkout = _checkout_without_core()
    if checkout is not None:
        raise ImportError(_shadowed_message(checkout)) from exc
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
