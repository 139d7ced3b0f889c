// Where a staged step's GPU and host time go: one small graph (a staging node, then a chain of tiny
// kernels standing in for a draft model), staged each of the ways listed in `variants`. On the GPU
// machine, `bash benchmarks/gpu_check.sh probe` builds and runs it into results/staging-probe-<gpu>.txt.
// Per variant: host us per step (median of 300 steps, the API calls of one step with the GPU idle) and
// GPU us per step (2,000 steps launched back to back between two events; median and range over 5 repeats).
// Compare each with the two "bare" rows (the graph with no staging node, and with an idle one).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#define CHECK(x) do { cudaError_t r_ = (x); if (r_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(r_)); exit(1); } } while (0)
#define CHECK_CU(x) do { CUresult r_ = (x); if (r_ != CUDA_SUCCESS) { printf("%s:%d CUresult %d\n", __FILE__, __LINE__, (int)r_); exit(1); } } while (0)

constexpr int kInputs = 3, kMax = 16, kRing = 64;
int kBody = 12;  // kernels after the staging node: argv[1]

struct BigParams {  // graphrunner's: every table field for 16 inputs
  long long batch, size;
  unsigned char* dst[kMax];
  const unsigned char* src[kMax];
  long long row_bytes[kMax];
  uint4 pad[kMax];
  bool each[kMax];
};
struct SmallParams {  // only what changes per step
  long long batch;
  const unsigned char* src[kInputs];
  unsigned char* dst[kInputs];
};
struct Desc { unsigned long long seq; long long batch; const void* src[kMax]; };
struct Ring { Desc slots[kRing]; unsigned long long consumed; };

__device__ void copy_rows(unsigned char* dst, const unsigned char* src, long long bytes) {
  for (long long o = threadIdx.x; o < bytes; o += blockDim.x) dst[o] = src[o];
}
__global__ void stage_big(const __grid_constant__ BigParams p) {
  if (p.batch < 0) return;
  copy_rows(p.dst[blockIdx.y], p.src[blockIdx.y], p.batch * p.row_bytes[blockIdx.y]);
}
__global__ void stage_small(const __grid_constant__ SmallParams p) {
  if (p.batch < 0) return;
  copy_rows(p.dst[blockIdx.y], p.src[blockIdx.y], p.batch * 8);
}
// The ring as graphrunner 0.2 had it: the counter from device memory, then the descriptor's fields over PCIe.
__global__ void stage_ring(Ring* ring, unsigned long long* control, unsigned char** dsts) {
  __shared__ unsigned long long step; __shared__ bool fresh; __shared__ long long batch; __shared__ const unsigned char* src;
  if (threadIdx.x == 0) {
    step = *(volatile unsigned long long*)control;
    const volatile Desc* d = &ring->slots[step % kRing];
    fresh = d->seq == step + 1;
    batch = fresh ? d->batch : 0;
    src = fresh ? (const unsigned char*)d->src[blockIdx.y] : nullptr;
  }
  __syncthreads();
  if (fresh) copy_rows(dsts[blockIdx.y], src, batch * 8);
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    unsigned* done = (unsigned*)(control + 1);
    if (atomicAdd(done, 1u) == gridDim.x * gridDim.y - 1) {
      *done = 0;
      if (fresh) { *(volatile unsigned long long*)control = step + 1; *(volatile unsigned long long*)&ring->consumed = step + 1; }
    }
  }
}
// The ring with one read over PCIe: warp 0 loads the slot's words in parallel, then checks them.
__global__ void stage_ring1(Ring* ring, unsigned long long* control, unsigned char** dsts) {
  __shared__ unsigned long long words[2 + kMax]; __shared__ unsigned long long step;
  if (threadIdx.x < 32) {
    unsigned long long s = *(volatile unsigned long long*)control;
    const volatile unsigned long long* w = (const volatile unsigned long long*)&ring->slots[s % kRing];
    if (threadIdx.x < 2 + kMax) words[threadIdx.x] = w[threadIdx.x];
    if (threadIdx.x == 0) step = s;
  }
  __syncthreads();
  const bool fresh = words[0] == step + 1;
  if (fresh) copy_rows(dsts[blockIdx.y], (const unsigned char*)words[2 + blockIdx.y], (long long)words[1] * 8);
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* done = (unsigned*)(control + 1);
    if (atomicAdd(done, 1u) == gridDim.x * gridDim.y - 1) {
      *done = 0;
      if (fresh) { *(volatile unsigned long long*)control = step + 1; *(volatile unsigned long long*)&ring->consumed = step + 1; }
    }
  }
}
// graphrunner's staging as it is: the copy, and thread 0 stamps the step's number into host-mapped memory
// (seq 0: a step that does not stamp).
struct StampParams {
  long long batch, seq;
  volatile long long* where;  // host-mapped (STAMP) or device memory (STAMP_BRANCH)
  const unsigned char* src[kInputs];
  unsigned char* dst[kInputs];
};
__global__ void stage_stamp(const __grid_constant__ StampParams p) {
  if (p.batch < 0) return;
  if (p.seq > 0 && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *p.where = p.seq;
  copy_rows(p.dst[blockIdx.y], p.src[blockIdx.y], p.batch * 8);
}
// The stamp off the model's path: a node beside the body, after staging, copies the step's number (which
// staging wrote to device memory) to the host-mapped word.
__global__ void stamp(const volatile long long* seq, volatile long long* host) { *host = *seq; }
__global__ void body(float* x) { x[threadIdx.x] = x[threadIdx.x] * 0.999f + 1.0f; }

int main(int argc, char** argv) {
  if (argc > 1) kBody = atoi(argv[1]);
  printf("graph body: %d kernels\n", kBody);
  CHECK(cudaSetDevice(0));
  cudaStream_t s; CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  unsigned char *src, *dst; float* work; unsigned long long* control; unsigned char** dsts;
  CHECK(cudaMalloc(&src, 1 << 16)); CHECK(cudaMalloc(&dst, 1 << 16)); CHECK(cudaMalloc(&work, 4096));
  CHECK(cudaMalloc(&control, 16)); CHECK(cudaMemset(control, 0, 16));
  CHECK(cudaMalloc(&dsts, kMax * sizeof(void*)));
  std::vector<unsigned char*> hd(kMax); for (int i = 0; i < kMax; ++i) hd[i] = dst + 512 * i;
  CHECK(cudaMemcpy(dsts, hd.data(), kMax * sizeof(void*), cudaMemcpyHostToDevice));
  Ring* ring; CHECK(cudaHostAlloc(&ring, sizeof(Ring), cudaHostAllocMapped)); memset(ring, 0, sizeof(Ring));
  Ring* ring_dev; CHECK(cudaHostGetDevicePointer((void**)&ring_dev, ring, 0));

  BigParams big{}; big.batch = -1; big.size = 1;
  for (int i = 0; i < kMax; ++i) { big.dst[i] = hd[i]; big.row_bytes[i] = 8; }
  SmallParams small{}; small.batch = -1; for (int i = 0; i < kInputs; ++i) small.dst[i] = hd[i];
  long long* stamp_host; long long* stamp_mapped; long long* seq_dev;
  CHECK(cudaHostAlloc(&stamp_host, sizeof(long long), cudaHostAllocMapped));
  CHECK(cudaHostGetDevicePointer((void**)&stamp_mapped, stamp_host, 0)); CHECK(cudaMalloc(&seq_dev, sizeof(long long)));
  StampParams stamped{}; stamped.batch = -1; for (int i = 0; i < kInputs; ++i) stamped.dst[i] = hd[i];
  StampParams branched = stamped; stamped.where = stamp_mapped; branched.where = seq_dev;
  StampParams local = branched;  // the same kernel and graph as STAMP, the word in device memory: no PCIe write
  cudaStream_t side; CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  cudaEvent_t forked, joined; CHECK(cudaEventCreateWithFlags(&forked, cudaEventDisableTiming));
  CHECK(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming));
  enum Stage { NONE, BIG, SMALL, RING, RING1, STAMP, STAMP_BRANCH };
  auto capture = [&](Stage st, cudaGraphExec_t* exec, cudaGraphNode_t* node, cudaGraph_t* graph) {
    CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    dim3 grid(1, kInputs);
    if (st == BIG) stage_big<<<grid, 128, 0, s>>>(big);
    if (st == SMALL) stage_small<<<grid, 128, 0, s>>>(small);
    if (st == RING) stage_ring<<<grid, 128, 0, s>>>(ring_dev, control, dsts);
    if (st == RING1) stage_ring1<<<grid, 128, 0, s>>>(ring_dev, control, dsts);
    if (st == STAMP) stage_stamp<<<grid, 128, 0, s>>>(stamped);
    if (st == STAMP_BRANCH) stage_stamp<<<grid, 128, 0, s>>>(branched);
    if (node) { cudaStreamCaptureStatus cs; const cudaGraphNode_t* deps; size_t n;
      CHECK(cudaStreamGetCaptureInfo(s, &cs, nullptr, nullptr, &deps, nullptr, &n)); *node = deps[0]; }
    if (st == STAMP_BRANCH) {  // fork after staging, join before the capture ends
      CHECK(cudaEventRecord(forked, s)); CHECK(cudaStreamWaitEvent(side, forked));
      stamp<<<1, 1, 0, side>>>(seq_dev, stamp_mapped); CHECK(cudaEventRecord(joined, side));
    }
    for (int k = 0; k < kBody; ++k) body<<<1, 256, 0, s>>>(work);
    if (st == STAMP_BRANCH) CHECK(cudaStreamWaitEvent(s, joined));
    CHECK(cudaStreamEndCapture(s, graph));
    CHECK(cudaGraphInstantiate(exec, *graph, 0)); CHECK(cudaGraphUpload(*exec, s)); CHECK(cudaStreamSynchronize(s));
  };
  cudaGraph_t g[7]; cudaGraphExec_t e[7]; cudaGraphNode_t nodes[7] = {};
  capture(NONE, &e[NONE], nullptr, &g[NONE]);
  for (int st = BIG; st <= STAMP_BRANCH; ++st) capture((Stage)st, &e[st], &nodes[st], &g[st]);
  // A graph of the staging node alone, for the two-launch variant.
  cudaGraph_t g_stage; cudaGraphExec_t e_stage; cudaGraphNode_t node_stage;
  { int body_kernels = kBody; kBody = 0; capture(SMALL, &e_stage, &node_stage, &g_stage); kBody = body_kernels; }
  CUDA_KERNEL_NODE_PARAMS kp_big{}, kp_small{}, kp_stamp{}, kp_branch{};
  CHECK_CU(cuGraphKernelNodeGetParams(nodes[BIG], &kp_big)); CHECK_CU(cuGraphKernelNodeGetParams(nodes[SMALL], &kp_small));
  CHECK_CU(cuGraphKernelNodeGetParams(nodes[STAMP], &kp_stamp));
  CHECK_CU(cuGraphKernelNodeGetParams(nodes[STAMP_BRANCH], &kp_branch));
  kp_stamp.extra = kp_branch.extra = nullptr;
  CUDA_KERNEL_NODE_PARAMS kp_big_kern = kp_big; if (kp_big_kern.kern) kp_big_kern.func = nullptr;
  kp_big.extra = kp_small.extra = kp_big_kern.extra = nullptr;
  cudaKernelNodeParams rt{}; rt.func = (void*)stage_big; rt.gridDim = dim3(1, kInputs); rt.blockDim = dim3(128);
  const unsigned char* sources[kInputs] = {src, src + 1024, src + 2048};
  long long seq = 0;
  auto stamped_step = [&](StampParams& p, CUDA_KERNEL_NODE_PARAMS& kp, Stage st, int every = 1) {
    p.batch = 1; p.seq = ++seq % every == 0 ? seq : 0; memcpy(p.src, sources, sizeof(p.src)); void* a[] = {&p}; kp.kernelParams = a;
    CHECK_CU(cuGraphExecKernelNodeSetParams(e[st], nodes[st], &kp)); CHECK_CU(cuGraphLaunch(e[st], s));
  };
  unsigned long long issued = 0;
  auto ring_step = [&](cudaGraphExec_t ex) {
    while (issued - *(volatile unsigned long long*)&ring->consumed >= kRing) {}
    Desc& d = ring->slots[issued % kRing]; d.batch = 1; memcpy(d.src, sources, sizeof(sources));
    std::atomic_thread_fence(std::memory_order_release); *(volatile unsigned long long*)&d.seq = issued + 1; ++issued;
    CHECK_CU(cuGraphLaunch(ex, s));
  };
  std::vector<std::pair<const char*, std::function<void()>>> variants = {
    {"bare (graph with no staging node)", [&] { CHECK_CU(cuGraphLaunch(e[NONE], s)); }},
    {"bare (idle param staging node)", [&] { CHECK_CU(cuGraphLaunch(e[BIG], s)); }},
    {"copies: 3 cudaMemcpyAsync + launch", [&] { for (int i = 0; i < kInputs; ++i) CHECK(cudaMemcpyAsync(hd[i], sources[i], 8, cudaMemcpyDeviceToDevice, s)); CHECK_CU(cuGraphLaunch(e[NONE], s)); }},
    {"param 680 B (driver, kern)", [&] { big.batch = 1; memcpy(big.src, sources, sizeof(sources)); void* a[] = {&big}; kp_big_kern.kernelParams = a; CHECK_CU(cuGraphExecKernelNodeSetParams(e[BIG], nodes[BIG], &kp_big_kern)); CHECK_CU(cuGraphLaunch(e[BIG], s)); }},
    {"param 680 B (driver, func)", [&] { big.batch = 1; memcpy(big.src, sources, sizeof(sources)); void* a[] = {&big}; kp_big.kernelParams = a; CHECK_CU(cuGraphExecKernelNodeSetParams(e[BIG], nodes[BIG], &kp_big)); CHECK_CU(cuGraphLaunch(e[BIG], s)); }},
    {"param 680 B (runtime)", [&] { big.batch = 1; memcpy(big.src, sources, sizeof(sources)); void* a[] = {&big}; rt.kernelParams = a; CHECK(cudaGraphExecKernelNodeSetParams(e[BIG], nodes[BIG], &rt)); CHECK_CU(cuGraphLaunch(e[BIG], s)); }},
    {"param 56 B (driver, func)", [&] { small.batch = 1; memcpy(small.src, sources, sizeof(sources)); void* a[] = {&small}; kp_small.kernelParams = a; CHECK_CU(cuGraphExecKernelNodeSetParams(e[SMALL], nodes[SMALL], &kp_small)); CHECK_CU(cuGraphLaunch(e[SMALL], s)); }},
    {"staging graph + graph (2 launches)", [&] { small.batch = 1; memcpy(small.src, sources, sizeof(sources)); void* a[] = {&small}; kp_small.kernelParams = a; CHECK_CU(cuGraphExecKernelNodeSetParams(e_stage, node_stage, &kp_small)); CHECK_CU(cuGraphLaunch(e_stage, s)); CHECK_CU(cuGraphLaunch(e[NONE], s)); }},
    {"stage kernel <<<>>> + graph", [&] { small.batch = 1; memcpy(small.src, sources, sizeof(sources)); stage_small<<<dim3(1, kInputs), 128, 0, s>>>(small); CHECK_CU(cuGraphLaunch(e[NONE], s)); }},
    {"param 80 B + stamp in kernel (now)", [&] { stamped_step(stamped, kp_stamp, STAMP); }},
    {"param 80 B + stamp node beside body", [&] { stamped_step(branched, kp_branch, STAMP_BRANCH); }},
    {"param 80 B + stamp to device memory", [&] { stamped_step(local, kp_stamp, STAMP); }},
    {"param 80 B + stamp every 2nd step", [&] { stamped_step(stamped, kp_stamp, STAMP, 2); }},
    {"param 80 B + stamp every 4th step", [&] { stamped_step(stamped, kp_stamp, STAMP, 4); }},
    {"ring, dependent reads (0.2)", [&] { ring_step(e[RING]); }},
    {"ring, one warp read", [&] { ring_step(e[RING1]); }},
  };
  cudaEvent_t t0, t1; CHECK(cudaEventCreate(&t0)); CHECK(cudaEventCreate(&t1));
  printf("%-38s %10s %10s %10s\n", "variant", "host us", "GPU us", "GPU-range");
  for (auto& [name, step] : variants) {
    std::vector<double> host, gpu;
    for (int rep = 0; rep < 5; ++rep) {
      for (int i = 0; i < 50; ++i) step();
      CHECK(cudaStreamSynchronize(s));
      std::vector<double> h;
      for (int i = 0; i < 300; ++i) {
        auto a = std::chrono::steady_clock::now(); step(); auto b = std::chrono::steady_clock::now();
        CHECK(cudaStreamSynchronize(s)); h.push_back(std::chrono::duration<double, std::micro>(b - a).count());
      }
      std::sort(h.begin(), h.end()); host.push_back(h[h.size() / 2]);
      // Back to back: each variant's host us is below its GPU us (the table shows both), so the GPU never waits.
      CHECK(cudaEventRecord(t0, s));
      for (int i = 0; i < 2000; ++i) step();
      CHECK(cudaEventRecord(t1, s)); CHECK(cudaEventSynchronize(t1));
      float ms; CHECK(cudaEventElapsedTime(&ms, t0, t1)); gpu.push_back(ms * 1000 / 2000);
    }
    std::sort(host.begin(), host.end()); std::sort(gpu.begin(), gpu.end());
    printf("%-38s %10.2f %10.2f %5.2f-%5.2f\n", name, host[2], gpu[2], gpu[0], gpu[4]);
  }
  CHECK(cudaDeviceSynchronize());
  return 0;
}
