"""Builds graphrunner_workloads and its two extensions: the benchmark's C++ launch loop (_launch_floor) and the
decoder's decode attention kernels (_decode_attention, the torch ops graphrunner_workloads::*).

    pip install --no-build-isolation ./workloads     # after graphrunner, against the same torch

CUDA_HOME (default /usr/local/cuda) and TORCH_CUDA_ARCH_LIST (default: the visible GPU's, else 8.0;9.0+PTX) as
for graphrunner's own build. Package metadata is in pyproject.toml.
"""
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = ("%d.%d" % torch.cuda.get_device_capability()
                                          if torch.cuda.is_available() else "8.0;9.0+PTX")
FLAGS = {"cxx": ["-O3", "-g0", "-Wno-attributes"], "nvcc": ["-O3", "-Xcompiler", "-g0"]}
SRC = "graphrunner_workloads/"

setup(
    ext_modules=[
        cpp_extension.CUDAExtension(name="graphrunner_workloads._launch_floor", sources=[SRC + "launch_floor.cpp"],
                                    extra_compile_args=FLAGS, extra_link_args=["-s"]),
        cpp_extension.CUDAExtension(name="graphrunner_workloads._decode_attention",
                                    sources=[SRC + "decode_attention.cpp", SRC + "decode_attention_kernels.cu"],
                                    extra_compile_args=FLAGS, extra_link_args=["-s"]),
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
