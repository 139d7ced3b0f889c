#include "rng.h"

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>

#include <mutex>
#include <type_traits>

#include "errors.h"

namespace graphrunner {
namespace {

// CUDAGeneratorImpl keeps its state private and hands it only to at::cuda::CUDAGraph. An explicit
// template instantiation may name a private member (C++ [temp.explicit]), which is the standard way to
// reach it without patching torch; the state's own fields are public.
using StateMember = c10::intrusive_ptr<at::CUDAGeneratorState> at::CUDAGeneratorImpl::*;
StateMember state_member();
template <StateMember M>
struct StateMemberAccess {
  friend StateMember state_member() { return M; }
};
template struct StateMemberAccess<&at::CUDAGeneratorImpl::state_>;

at::CUDAGeneratorState& state_of(at::Generator& gen) {
  return *(gen.get<at::CUDAGeneratorImpl>()->*state_member());
}

// torch >= 2.12 keeps one capture state per capture id (and registers it lazily, only for torch's own
// graphs); torch 2.11 keeps a single shared one. Both are handled at compile time.
template <typename S, typename = void>
struct PerCaptureStates : std::false_type {};
template <typename S>
struct PerCaptureStates<S, std::void_t<decltype(std::declval<S&>().capture_states_)>> : std::true_type {};

template <typename S>
void begin_on(S& state, c10::CaptureId_t id, const at::TensorBase& seed, const at::TensorBase& offset) {
  if constexpr (PerCaptureStates<S>::value) {
    using CaptureState = typename decltype(state.capture_states_)::mapped_type::element_type;
    auto capture_state = c10::make_intrusive<CaptureState>();
    capture_state->rng_state_seed_extragraph_ = seed;
    capture_state->rng_state_offset_extragraph_ = offset;
    std::lock_guard<std::mutex> lock(state.capture_states_mutex_);
    state.capture_states_[id] = std::move(capture_state);
  } else {
    state.capturing_ = true;
    state.offset_intragraph_ = 0;
  }
}

template <typename S>
uint64_t end_on(S& state, c10::CaptureId_t id) {
  if constexpr (PerCaptureStates<S>::value) {
    std::lock_guard<std::mutex> lock(state.capture_states_mutex_);
    auto it = state.capture_states_.find(id);
    if (it == state.capture_states_.end()) {
      return 0;
    }
    uint64_t increment = it->second->offset_intragraph_;
    state.capture_states_.erase(it);
    return increment;
  } else {
    state.capturing_ = false;
    return state.offset_intragraph_;
  }
}

// torch 2.11 reads seed and offset from tensors shared by every graph of the generator.
template <typename S>
void shared_tensors(S& state, c10::DeviceIndex device, at::TensorBase& seed, at::TensorBase& offset) {
  if constexpr (!PerCaptureStates<S>::value) {
    if (!state.seed_extragraph_.defined()) {
      auto options = at::TensorOptions().device(at::kCUDA, device).dtype(at::kLong);
      state.seed_extragraph_ = at::empty({1}, options);
      state.offset_extragraph_ = at::empty({1}, options);
    }
    seed = state.seed_extragraph_;
    offset = state.offset_extragraph_;
  }
}

// torch 2.11 frees the shared tensors when its last graph unregisters; do the same when ours is the last.
template <typename S>
void drop_shared_tensors(S& state, const at::TensorBase& seed) {
  if constexpr (!PerCaptureStates<S>::value) {
    if (seed.defined() && seed.is_same(state.seed_extragraph_) && seed.use_count() == 2 &&
        state.registered_graphs_.empty()) {
      state.seed_extragraph_ = at::TensorBase();
      state.offset_extragraph_ = at::TensorBase();
    }
  }
}

__global__ void write_philox_base(int64_t* seed_out, int64_t* offset_out, int64_t seed, int64_t offset) {
  *seed_out = seed;
  *offset_out = offset;
}

}  // namespace

void GraphRng::prepare(c10::DeviceIndex device) {
  generator_ = at::cuda::detail::getDefaultCUDAGenerator(device);
  std::lock_guard<std::mutex> lock(generator_.mutex());
  auto& state = state_of(generator_);
  shared_tensors(state, device, seed_, offset_);
  if (!seed_.defined()) {
    auto options = at::TensorOptions().device(at::kCUDA, device).dtype(at::kLong);
    seed_ = at::empty({1}, options);
    offset_ = at::empty({1}, options);
  }
}

void GraphRng::begin(c10::CaptureId_t capture_id) {
  std::lock_guard<std::mutex> lock(generator_.mutex());
  capture_id_ = capture_id;
  begin_on(state_of(generator_), capture_id, seed_, offset_);
  capturing_ = true;
}

void GraphRng::end() {
  if (!capturing_) {
    return;
  }
  std::lock_guard<std::mutex> lock(generator_.mutex());
  increment_ = end_on(state_of(generator_), capture_id_);
  capturing_ = false;
}

void GraphRng::before_replay(cudaStream_t stream) {
  int64_t seed, offset;
  {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    auto& state = state_of(generator_);
    seed = static_cast<int64_t>(state.seed_);
    offset = static_cast<int64_t>(state.philox_offset_per_thread_);
    // Whole-graph increments are multiples of 4, as torch's own offsets are.
    state.philox_offset_per_thread_ += increment_;
  }
  write_philox_base<<<1, 1, 0, stream>>>(seed_.mutable_data_ptr<int64_t>(), offset_.mutable_data_ptr<int64_t>(),
                                         seed, offset);
  GR_CUDA_CHECK(cudaGetLastError());
}

std::vector<AddressRange> GraphRng::owned_memory() const {
  if (!seed_.defined()) {
    return {};
  }
  return {{reinterpret_cast<uint64_t>(seed_.data_ptr()), seed_.nbytes()},
          {reinterpret_cast<uint64_t>(offset_.data_ptr()), offset_.nbytes()}};
}

void GraphRng::release() {
  end();
  if (generator_.defined()) {
    std::lock_guard<std::mutex> lock(generator_.mutex());
    drop_shared_tensors(state_of(generator_), seed_);
  }
  increment_ = 0;
  seed_ = at::TensorBase();
  offset_ = at::TensorBase();
  generator_ = at::Generator();
}

}  // namespace graphrunner
