// Per-step input checks: names, dtype, per-row shape, equal counts, count ranges, device, layout, and a ragged
// step's split. Needs no GPU, so every message is tested on CPU-only machines too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sizes.h"

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
  // Rows per request of a uniform runner: 1 for a per-request input, tokens_per_request for a per-token one. A
  // request's rows are contiguous, so staging treats them as one unit. Always 1 in a ragged runner.
  int64_t rows_per_request = 1;
  // Whether each step writes the pad value into padding rows; if not, they keep what they last held.
  bool pad_each_step = true;
  // Ragged runners: the input has one row per token (else one per request).
  bool per_token = false;
  // Ragged runners: this is the split, each request's token count, passed on the host (a CPU tensor).
  bool split = false;
  // Bytes of one staging unit: one request's rows, or, for a ragged runner's per-token input, one token's row.
  int64_t unit_bytes() const;
};

class InputChecker {
 public:
  // `sizes`: the runner's size table; a ragged one makes this a ragged checker, whose specs say which inputs
  // count tokens and which one is the split. `tokens_per_request`: a uniform runner's (1 for a ragged one).
  InputChecker(std::vector<InputSpec> specs, const SizeTable& sizes, bool fallback_eager, c10::DeviceIndex device,
               int64_t tokens_per_request = 1);

  // Checks one step's inputs and returns its counts. A step larger than every size is returned when the
  // fallback is eager (the step then runs eagerly) and raises otherwise.
  StepShape check(BorrowedInputs inputs) const;
  // Raises the error for a call whose input names are not exactly the spec's.
  [[noreturn]] void throw_name_error(const std::vector<std::string>& given) const;

  const std::vector<InputSpec>& specs() const { return specs_; }
  c10::DeviceIndex device() const { return device_; }
  bool ragged() const { return ragged_; }
  // The split's index in specs(), or -1 (a uniform runner).
  int split() const { return split_; }

 private:
  int64_t check_one(size_t i, const at::Tensor& t) const;
  StepShape check_uniform(BorrowedInputs inputs) const;
  StepShape check_ragged(BorrowedInputs inputs) const;
  void check_devices(BorrowedInputs inputs) const;

  std::vector<InputSpec> specs_;
  int64_t max_size_;      // the largest size: requests (uniform) or tokens (ragged)
  int64_t max_requests_;  // the most requests a step may have
  bool ragged_;
  int split_ = -1;
  bool fallback_eager_;
  c10::DeviceIndex device_;
  int64_t tokens_per_request_;  // a uniform step's tokens are its requests times this
};

}  // namespace graphrunner
