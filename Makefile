# make test   makes .venv (it sees the system's packages), or uses the active virtual environment; installs what is
#             missing there, builds and installs graphrunner and graphrunner_workloads (workloads/) into it, and runs
#             the suite against the installed packages (GPU tests skip without a GPU)
# make bench  the built-in benchmarks on one GPU, into benchmarks/results/: the decoder step, speculative
#             decoding, ragged steps with the engine loop, piecewise steps, and capture memory (ATTN=sdpa or
#             ATTN=flash-attn-4 picks the decoder's attention, default decode; TP=2 runs the decoder tensor-parallel
#             on 2 GPUs through torchrun; ARGS="..." passes other flags to the decoder's)
PYTHON ?= python3
# Run from an active virtual environment (one that already holds torch, as on the GPU machines), make installs
# into it; otherwise into .venv, which it makes.
ACTIVE_VENV := $(shell $(PYTHON) -c "import sys; print(sys.prefix if sys.prefix != sys.base_prefix else '')")
VENV ?= $(or $(ACTIVE_VENV),.venv)
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda

.PHONY: deps install test bench cpp-test gpu-check clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

deps: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_PIN)"; $(PY) -m pip install -q "$(TORCH_PIN)"; }
	@$(PY) -c "import pybind11, ninja, tqdm, pytest, matplotlib, wheel, setuptools; \
		assert int(setuptools.__version__.split('.')[0]) >= 70" 2>/dev/null || \
		$(PY) -m pip install -q --upgrade "setuptools>=70" wheel pybind11 ninja tqdm pytest matplotlib

# pip builds in build/ (ninja rebuilds only what changed) and installs into the venv; nothing is built in place.
install: deps
	@echo "building and installing graphrunner and graphrunner_workloads (the first build of the native core takes \
	minutes; MAX_JOBS=$${MAX_JOBS:-all cores})"
	$(PY) -m pip install -q --no-build-isolation --no-deps . ./workloads

# -P: the source checkout is not on sys.path, so the tests import the installed package.
test: install
	$(PY) -P -m pytest tests -ra -q

ATTN ?= decode
TP ?= 1

bench: install
ifeq ($(TP),1)
	$(PY) -P -m graphrunner_workloads.bench --attn $(ATTN) --out benchmarks/results $(ARGS)
	$(PY) -P -m graphrunner_workloads.spec_bench --out benchmarks/results
	$(PY) -P -m graphrunner_workloads.ragged_bench --out benchmarks/results
	$(PY) -P -m graphrunner_workloads.piecewise_bench --out benchmarks/results
	$(PY) -P -m graphrunner_workloads.memory_bench --out benchmarks/results
else
	NCCL_NVLS_ENABLE=0 $(PY) -P -m torch.distributed.run --nproc-per-node $(TP) -m graphrunner_workloads.bench \
		--tp $(TP) --attn $(ATTN) --out benchmarks/results $(ARGS)
endif

# The C++ lifecycle test against libtorch (needs a GPU to run).
cpp-test: deps
	cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc -DPython3_EXECUTABLE=$(PY) >/dev/null
	cmake --build build/cmake -j
	build/cmake/graph_lifecycle_test

# Everything a GPU machine checks in one go; summaries land in benchmarks/results/.
gpu-check:
	bash benchmarks/gpu_check.sh

# Removes .venv, the one make made, never an active virtual environment it installed into.
clean:
	rm -rf build workloads/build graphrunner/*.so workloads/graphrunner_workloads/*.so .venv
