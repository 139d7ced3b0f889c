"""Builds graphrunner and its native core, graphrunner._C, with torch's C++ extension tools and ninja.

    pip install --no-build-isolation .

CUDA is found through CUDA_HOME, else CUDA_PATH, else /usr/local/cuda, else where torch guesses. GPU architectures come from
TORCH_CUDA_ARCH_LIST when set, else from the visible GPU, else DEFAULT_ARCHS.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
DEFAULT_ARCHS = "8.0;9.0"


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


def native_sources() -> list:
    """The core's sources, one list shared with CMakeLists.txt, plus the Python-facing ones."""
    listed = (ROOT / "csrc" / "sources.txt").read_text().split()
    return listed + ["csrc/py_step.cpp", "csrc/bindings.cpp"]


def extensions() -> list:
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = choose_archs()
    return [
        cpp_extension.CUDAExtension(
            name="graphrunner._C",
            sources=native_sources(),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    ]


setup(
    name="graphrunner",
    version="0.1.0",
    description="Run LLM serving steps through CUDA graphs sharing one PyTorch pool, with the least host time",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["graphrunner", "graphrunner.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "tqdm"],
    extras_require={
        "plot": ["matplotlib"],
        "test": ["pytest", "matplotlib"],
        "flash-attn-4": ["flash-attn-4"],
        "flash-attn": ["flash-attn"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
