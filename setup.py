"""Builds graphrunner and its native core, graphrunner._C, with torch's C++ extension tools and ninja.

    pip install setuptools wheel ninja pybind11     # once, in the environment that has torch
    pip install --no-build-isolation .

CUDA is found through CUDA_HOME, else CUDA_PATH, else /usr/local/cuda, else where torch guesses. GPU architectures
come from TORCH_CUDA_ARCH_LIST when set, else from the visible GPU, else DEFAULT_ARCHS (with PTX for newer GPUs).
MAX_JOBS caps parallel compile jobs. Package metadata is in pyproject.toml. The workloads built on graphrunner
(decoder, benchmarks, demos) are a package of their own, built by workloads/setup.py.
"""
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0+PTX"
# Release builds: no debug info (it made the module 20 MB), and none of pybind11's visibility notes.
CXX_FLAGS = ["-O3", "-g0", "-Wno-attributes"]
NVCC_FLAGS = ["-O3", "-Xcompiler", "-g0"]


def fail(message: str) -> None:
    sys.exit(f"graphrunner setup: {message}")


try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    fail("torch is not installed. Install a CUDA build of torch first (pip install torch), then build "
         "graphrunner with `pip install --no-build-isolation .` so the build sees that torch.")

if torch.version.cuda is None:
    fail(f"the installed torch {torch.__version__} has no CUDA support; install a CUDA build of torch.")


def find_cuda_home() -> str:
    """A toolkit has both nvcc and the runtime headers (a lone nvcc on PATH, say in /usr/local/bin, is not one)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                      cpp_extension.CUDA_HOME):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists() and \
                (Path(candidate) / "include" / "cuda_runtime_api.h").exists():
            return candidate
    fail("no CUDA toolkit found: set CUDA_HOME to the folder that holds bin/nvcc and include/ "
         "(for example /usr/local/cuda).")


def choose_archs() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    print(f"graphrunner setup: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building for {DEFAULT_ARCHS}",
          file=sys.stderr)
    return DEFAULT_ARCHS


def library_headers(cuda_home: str) -> list:
    """Headers of the CUDA libraries torch's own headers include (cuBLAS, cuSPARSE): a slim toolkit lacks
    them, and then the copies pip's nvidia packages carry for torch serve."""
    if (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = sorted({str(p.parent) for root in nvidia.__path__ for p in Path(root).glob("*/include/cusparse.h")})
    return found


def torch_requirement() -> str:
    """The extension loads only with the torch release it was compiled against."""
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return f"torch=={major}.{minor}.*"


def extensions() -> list:
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = choose_archs()
    flags = {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}
    headers = library_headers(cuda_home)
    core = (ROOT / "csrc" / "sources.txt").read_text().split()  # one list, shared with CMakeLists.txt
    return [
        cpp_extension.CUDAExtension(name="graphrunner._C", sources=core + ["csrc/py_step.cpp", "csrc/bindings.cpp"],
                                    include_dirs=headers, extra_compile_args=flags, extra_link_args=["-s"]),
    ]


setup(
    install_requires=[torch_requirement(), "tqdm"],
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
