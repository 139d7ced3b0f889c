// Per-step input checks: names, dtype, per-row shape, equal batch, batch range, device, layout.
// Needs no GPU, so every message is tested on CPU-only machines too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace graphrunner {

constexpr size_t kMaxInputs = 16;
// The most bytes one input's static buffer may hold (max_batch_size rows): the staging kernel addresses them
// with 32-bit offsets (launcher.cu). Step inputs are per-request metadata, KB to MB.
constexpr int64_t kMaxInputBytes = int64_t{1} << 30;

// One step's inputs in spec order, borrowed from the caller for the length of the call: no copies and
// no reference counting on the per-step path.
using BorrowedInputs = c10::ArrayRef<const at::Tensor*>;

struct InputSpec {
  std::string name;
  std::vector<int64_t> row_shape;  // the shape of one row (one token, for a per-token input)
  c10::ScalarType dtype;
  // The pad value's bytes repeated over 16 bytes: the staging kernel fills padding rows with it.
  std::array<uint8_t, 16> pad_pattern;
  // Rows per request: 1 for a per-request input, tokens_per_request for a per-token one. A request's rows are
  // contiguous, so staging treats them as one row of `tokens` times the bytes.
  int64_t tokens = 1;
  // Whether each step writes the pad value into padding rows; if not, they keep what they last held.
  bool pad_each_step = true;
  // Bytes of one request's rows.
  int64_t row_bytes() const;
};

class InputChecker {
 public:
  InputChecker(std::vector<InputSpec> specs, int64_t max_batch_size, bool fallback_eager,
               c10::DeviceIndex device);

  // Checks one step's inputs and returns the batch size in requests. A batch above max_batch_size is returned
  // when the fallback is eager (the step then runs eagerly) and raises otherwise.
  int64_t check(BorrowedInputs inputs) const;
  // Raises the error for a call whose input names are not exactly the spec's.
  [[noreturn]] void throw_name_error(const std::vector<std::string>& given) const;

  const std::vector<InputSpec>& specs() const { return specs_; }
  int64_t max_batch_size() const { return max_batch_size_; }
  c10::DeviceIndex device() const { return device_; }

 private:
  int64_t check_one(size_t i, const at::Tensor& t) const;

  std::vector<InputSpec> specs_;
  int64_t max_batch_size_;
  bool fallback_eager_;
  c10::DeviceIndex device_;
};

}  // namespace graphrunner
