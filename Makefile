# make test   installs what is missing, builds, runs the whole suite (GPU tests skip without a GPU)
# make bench  the built-in benchmark on one GPU (ATTN=flash-attn-4 picks the attention backend; TP=2
#             runs it tensor-parallel on 2 GPUs through torchrun; ARGS="..." passes other flags)
PYTHON ?= python3
export CUDA_HOME ?= /usr/local/cuda
TORCH_PIN ?= torch==2.14.1

.PHONY: deps build test bench cpp-test gpu-check clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	@$(PYTHON) -c "import pybind11, ninja, tqdm, pytest, matplotlib" 2>/dev/null || \
		$(PYTHON) -m pip install -q pybind11 ninja tqdm pytest matplotlib

build: deps
	$(PYTHON) setup.py -q build_ext --inplace

test: build
	$(PYTHON) -m pytest tests -ra -q

ATTN ?= sdpa
TP ?= 1

bench: build
ifeq ($(TP),1)
	$(PYTHON) -m graphrunner.bench --attn $(ATTN) $(ARGS)
else
	NCCL_NVLS_ENABLE=0 $(PYTHON) -m torch.distributed.run --nproc-per-node $(TP) -m graphrunner.bench \
		--tp $(TP) --attn $(ATTN) $(ARGS)
endif

# The C++ lifecycle test against libtorch (needs a GPU to run).
cpp-test: deps
	cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc >/dev/null
	cmake --build build/cmake -j
	build/cmake/graph_lifecycle_test

# Everything a GPU machine checks in one go; summaries land in benchmarks/results/.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build graphrunner/*.so
