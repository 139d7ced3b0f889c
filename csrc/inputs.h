// Per-step input checks: names, dtype, per-row shape, equal batch, batch range, device, layout.
// Needs no GPU, so every message is tested on CPU-only machines too.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace graphrunner {

struct InputSpec {
  std::string name;
  std::vector<int64_t> row_shape;
  c10::ScalarType dtype;
  // The pad value's bytes repeated over 16 bytes: the staging kernel fills padding rows with it.
  std::array<uint8_t, 16> pad_pattern;
  int64_t row_bytes() const;
};

class InputChecker {
 public:
  InputChecker(std::vector<InputSpec> specs, int64_t max_batch_size, bool fallback_eager,
               c10::DeviceIndex device);

  // Checks one step's inputs, given in spec order, and returns the batch size, or -1 when the batch
  // is above max_batch_size and the fallback is eager. Non-contiguous inputs are replaced by
  // contiguous copies, which the caller keeps alive until the step is launched.
  int64_t check(std::vector<at::Tensor>& inputs) const;
  // Raises the error for a call whose input names are not exactly the spec's.
  [[noreturn]] void throw_name_error(const std::vector<std::string>& given) const;

  const std::vector<InputSpec>& specs() const { return specs_; }
  int64_t max_batch_size() const { return max_batch_size_; }
  c10::DeviceIndex device() const { return device_; }

 private:
  int64_t check_one(size_t i, at::Tensor& t) const;

  std::vector<InputSpec> specs_;
  int64_t max_batch_size_;
  bool fallback_eager_;
  c10::DeviceIndex device_;
};

}  // namespace graphrunner
