// The Graph lifecycle from C++: capture into a shared pool, replay on fresh inputs, errors, reset.
// Prints "N passed, M failed" and exits non-zero on any failure; run it under compute-sanitizer too.
#include <ATen/ATen.h>
#include <ATen/cuda/MemPool.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <functional>
#include <iostream>
#include <string>

#include "errors.h"
#include "graph.h"

using graphrunner::Graph;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  (ok ? passed : failed)++;
  std::cout << (ok ? "PASS " : "FAIL ") << what << std::endl;
}

template <typename E>
void expect_throw(const std::function<void()>& body, const std::string& needle, const std::string& what) {
  try {
    body();
    check(false, what + " (no exception)");
  } catch (const E& e) {
    check(std::string(e.what()).find(needle) != std::string::npos, what + ": " + e.what());
  }
}

}  // namespace

int main() {
  auto options = at::TensorOptions().device(at::kCUDA).dtype(at::kFloat);
  auto pool = at::cuda::MemPool::graph_pool_handle(false);
  auto side = c10::cuda::getStreamFromPool();
  at::Tensor x = at::randn({4096}, options);
  at::Tensor y, z;
  Graph a, b;
  {
    c10::cuda::CUDAStreamGuard on_side(side);
    a.capture_begin(pool);
    y = x * 2 + 1;
    a.capture_end();
    b.capture_begin(a.pool());
    z = (x - 3).relu();
    b.capture_end();
  }
  check(a.captured() && b.captured() && a.num_nodes() >= 1, "two graphs captured into one pool");
  check(a.pool() == pool && b.pool() == pool, "both graphs report the shared pool");

  for (int step = 0; step < 3; ++step) {
    x.copy_(at::randn({4096}, options));
    y.fill_(std::nanf(""));
    a.replay();
    b.replay();
    c10::cuda::device_synchronize();
    check(at::allclose(y, x * 2 + 1) && at::allclose(z, (x - 3).relu()), "replay matches eager, step " +
                                                                              std::to_string(step));
  }

  Graph fresh;
  expect_throw<graphrunner::StateError>([&] { fresh.replay(); }, "before capture", "replay before capture");
  {
    c10::cuda::CUDAStreamGuard on_side(side);
    Graph outer, inner;
    outer.capture_begin(pool);
    expect_throw<graphrunner::StateError>([&] { inner.capture_begin(pool); }, "capture inside a capture",
                                          "capture inside a capture");
    outer.abort_capture();
    check(!outer.capturing(), "aborted capture leaves the stream usable");
    at::Tensor w = x + 1;  // runs eagerly again on the side stream
    c10::cuda::device_synchronize();
    check(at::allclose(w, x + 1), "stream works after an aborted capture");
  }
  expect_throw<graphrunner::StateError>(
      [&] {
        at::Tensor on_default = x;
        a.capture_begin(pool);
      },
      "already captured", "capture of a captured graph");
  a.reset();
  b.reset();
  expect_throw<graphrunner::StateError>([&] { a.replay(); }, "after reset", "replay after reset");

  std::cout << passed << " passed, " << failed << " failed" << std::endl;
  return failed == 0 ? 0 : 1;
}
