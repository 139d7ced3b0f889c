#!/usr/bin/env bash
# Everything a GPU machine checks, in one go and offline: build, GPU test suite, C++ lifecycle test,
# compute-sanitizer, hazard reproductions, benchmark. Summaries go to benchmarks/results/ (named after
# the GPU) and, where $OUT is set (the device tool), are copied there too.
#   bash benchmarks/gpu_check.sh [stage ...]   stages: build tests tests-fa4 cpp sanitizer hazards cotenants bench
#                                              bench-spec bench-ragged bench-piecewise bench-memory bench-fa4
#                                              bench-tp probe
#   (default: all; the flash-attn 4 parts run where flash_attn.cute imports)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$PATH:$CUDA_HOME/bin
# Everything runs from the checkout, built in place: graphrunner from here, graphrunner_workloads from workloads/.
export PYTHONPATH=$PWD/workloads${PYTHONPATH:+:$PYTHONPATH}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|b200' | head -1 | tr 'A-Z' 'a-z')
gpu=${gpu:-gpu}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
results=benchmarks/results
mkdir -p "$results"
stages=${*:-build tests tests-fa4 cpp sanitizer hazards cotenants bench bench-spec bench-ragged bench-piecewise bench-memory bench-fa4 bench-tp probe}
has_fa4=$(python3 -c "import flash_attn.cute" 2>/dev/null && echo yes)
status=0
has() { [[ " $stages " == *" $1 "* ]]; }
step() { echo; echo "=== $* ($(date +%T))"; }
header() { echo "# pytest on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F)";
           python3 -c "import torch; print('# torch', torch.__version__)"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

if has build; then
  step "build"
  # From scratch: a machine another call used first keeps its build/ and in-place modules, and ninja may see
  # nothing to rebuild in a tree copied with older times.
  rm -rf build workloads/build graphrunner/_C*.so workloads/graphrunner_workloads/_*.so
  MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace 2>&1 | tail -20
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  (cd workloads && MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace 2>&1 | tail -20
   exit "${PIPESTATUS[0]}") || status=1
  mkdir -p build && gcc -shared -fPIC -O1 -o build/segv_trace.so benchmarks/segv_trace.c || status=1
fi

if has tests; then
  step "GPU test suite"
  # segv_trace: a process that dies of a signal prints its native stack too (no gdb on the GPU machines).
  trace=$([ -f build/segv_trace.so ] && echo "$PWD/build/segv_trace.so")
  LD_PRELOAD=$trace python3 -m pytest tests -ra -q -p no:cacheprovider 2>&1 | tee /tmp/pytest.log
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  { header; grep -E "^(FAILED|ERROR|SKIPPED|XFAIL)|passed|failed" /tmp/pytest.log | tail -40; } > "$results/gpu-tests-$gpu.txt"
  if [ "$rc" -gt 128 ]; then  # the process died (a signal): say where, then run each file alone for a full count
    { echo "## the whole suite in one process died of signal $((rc - 128)); its last Python stack:";
      grep -A12 "^Current thread" /tmp/pytest.log | head -14;
      echo "## its native stack (segv_trace), graphrunner's own frames resolved:";
      grep -A40 "== segv_trace" /tmp/pytest.log | grep -v "^$" | head -40;
      grep -A40 "== segv_trace" /tmp/pytest.log | grep -oE "_C\.[^(]*\.so\(\+0x[0-9a-f]+\)" | grep -oE "0x[0-9a-f]+" |
        xargs -r addr2line -f -C -e graphrunner/_C*.so 2>/dev/null | paste - - | head -20;
      echo "## each file in a process of its own:"; } >> "$results/gpu-tests-$gpu.txt"
    for f in tests/test_*.py; do
      python3 -m pytest "$f" -ra -q -p no:cacheprovider > /tmp/pytest-file.log 2>&1
      echo "$f (exit $?): $(grep -E "passed|failed|error" /tmp/pytest-file.log | tail -1)"
      grep -E "^(FAILED|ERROR)" /tmp/pytest-file.log
    done | tee -a "$results/gpu-tests-$gpu.txt"
  fi
fi

if has tests-fa4 && [ -n "$has_fa4" ]; then
  step "GPU tests with flash-attn 4"
  # the files where flash-attn 4 cases run (backends, hazard reproductions, speculative decoding, ragged steps), whole
  python3 -m pytest tests/test_attention_backends.py tests/test_hazards.py tests/test_spec_decode.py \
    tests/test_ragged_workload.py -rA -q \
    -p no:cacheprovider 2>&1 | tee /tmp/pytest-fa4.log
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  { header; python3 -c "import importlib.metadata as m; print('# flash-attn-4', m.version('flash-attn-4'))";
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" /tmp/pytest-fa4.log; tail -1 /tmp/pytest-fa4.log; } \
    > "$results/gpu-tests-$gpu-fa4.txt"
fi

if has cpp; then
  step "C++ lifecycle test"
  cmake -S . -B build/cmake -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" >/tmp/cmake.log 2>&1 && \
    cmake --build build/cmake -j 16 >>/tmp/cmake.log 2>&1 || { tail -30 /tmp/cmake.log; status=1; }
  build/cmake/graph_lifecycle_test 2>&1 | tee /tmp/cpp.log || status=1
fi

if has sanitizer; then
  step "compute-sanitizer memcheck"
  { echo "# compute-sanitizer --tool memcheck, $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)";
    echo "## C++ Graph lifecycle test (build/cmake/graph_lifecycle_test)";
    compute-sanitizer --tool memcheck build/cmake/graph_lifecycle_test 2>&1 | tail -4;
    echo "## Python: capture and replay of the built-in model (python -m graphrunner_workloads.sanitize)";
    compute-sanitizer --tool memcheck python3 -m graphrunner_workloads.sanitize 2>&1 | tail -4; } \
    > "$results/sanitizer-$gpu.txt"
  cat "$results/sanitizer-$gpu.txt"
fi

if has hazards; then
  step "hazard reproductions"
  python3 -m graphrunner_workloads.hazards --out "$results/hazards-$gpu.txt" || status=1
fi

if has cotenants; then
  step "co-tenant triggers"
  python3 -m graphrunner_workloads.cotenants --out "$results/cotenants-$gpu.txt" || status=1
fi

if has bench; then
  step "benchmark"
  python3 -m graphrunner_workloads.bench --out "$results" ${BENCH_ARGS:-} || status=1
fi

if has bench-spec; then
  step "benchmark, speculative decoding"
  python3 -m graphrunner_workloads.spec_bench --out "$results" ${SPEC_ARGS:-} || status=1
fi

if has bench-ragged; then
  step "benchmark, ragged steps and the engine loop"
  python3 -m graphrunner_workloads.ragged_bench --out "$results" ${RAGGED_ARGS:-} || status=1
fi

if has bench-piecewise; then
  step "benchmark, piecewise steps"
  python3 -m graphrunner_workloads.piecewise_bench --out "$results" ${PIECEWISE_ARGS:-} || status=1
fi

if has bench-memory; then  # after bench: it adds its keys to bench-<gpu>.json
  step "benchmark, capture memory"
  python3 -m graphrunner_workloads.memory_bench --out "$results" ${MEMORY_ARGS:-} || status=1
fi

if has bench-fa4 && [ -n "$has_fa4" ]; then
  step "benchmark, flash-attn 4"
  python3 -m graphrunner_workloads.bench --attn flash-attn-4 --out "$results" || status=1
  python3 -m graphrunner_workloads.ragged_bench --attention flash-attn-4 --out "$results" ${RAGGED_ARGS:-} || status=1
fi

if has bench-tp; then
  gpus=$(nvidia-smi --list-gpus | wc -l)
  if [ "$gpus" -ge 2 ]; then
    step "benchmark, tensor parallel over $gpus GPUs"
    make -s bench TP="$gpus" ARGS="--out $results" || status=1
  else  # one GPU: the same path as a world of one, all-reduces captured, briefly
    step "tensor-parallel path, world of one"
    NCCL_NVLS_ENABLE=0 python3 -m torch.distributed.run --nproc-per-node 1 -m graphrunner_workloads.bench --tp 1 \
      --layers 2 --steps 50 --trace-steps 200 --name "${gpu}x1-smoke" --out "$results" || status=1
  fi
fi

if has probe; then
  step "staging probe"
  mkdir -p build && nvcc -O3 -std=c++17 -arch=native benchmarks/staging_probe.cu -lcuda -o build/staging_probe && \
    { echo "# benchmarks/staging_probe.cu, $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)";
      build/staging_probe; } > "$results/staging-probe-$gpu.txt" || status=1
  cat "$results/staging-probe-$gpu.txt"
  { echo "# benchmarks/staging_cost.py, $(date -u +%F), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)";
    PYTHONPATH=.:$PYTHONPATH python3 benchmarks/staging_cost.py; } > "$results/staging-cost-$gpu.txt" || status=1
  cat "$results/staging-cost-$gpu.txt"
fi

if [ -n "${OUT:-}" ]; then  # one archive: the device tool brings back at most 8 files
  tar czf "$OUT/results-$gpu.tgz" "$results"
fi
step "done, status $status"
exit $status
