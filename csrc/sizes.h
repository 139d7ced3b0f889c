// Which captured size a step runs at: the one lookup, shared by the step path and Python.
//
// A uniform runner's sizes count requests (each with the same rows). A ragged runner's sizes count tokens:
// size T has room for T tokens spread over up to requests_of(T) requests, and a step runs at the smallest T
// that holds both its tokens and its requests.
#pragma once

#include <cstdint>
#include <vector>

namespace graphrunner {

// One step's counts: requests, and tokens (the rows of a ragged runner's per-token inputs; for a uniform
// runner, requests times its rows per request).
struct StepShape {
  int64_t requests = 0;
  int64_t tokens = 0;
};

class SizeTable {
 public:
  // Uniform: `capture_sizes` count requests, each in 1..max_batch_size, any order.
  SizeTable(std::vector<int64_t> capture_sizes, int64_t max_batch_size);
  // Ragged: `capture_sizes` count tokens (1..max_tokens, ascending, unique); `requests_per_size[i]` is the
  // most requests size i holds (1..its tokens).
  SizeTable(std::vector<int64_t> capture_sizes, int64_t max_tokens, std::vector<int64_t> requests_per_size);

  // Uniform: the smallest captured size that holds `batch` requests; 0 when none does (the step runs eagerly).
  int64_t size_for(int64_t batch) const {
    return (batch >= 1 && batch < static_cast<int64_t>(size_for_batch_.size())) ? size_for_batch_[batch] : 0;
  }
  // Either kind: the size a step of `shape` runs at; 0 when none holds it.
  int64_t size_for(StepShape shape) const { return ragged() ? ragged_size_for(shape) : size_for(shape.requests); }
  bool ragged() const { return !requests_.empty(); }
  // The largest size: requests (uniform) or tokens (ragged).
  int64_t max_size() const { return static_cast<int64_t>(size_for_batch_.size()) - 1; }
  // The most requests any size holds.
  int64_t max_requests() const { return ragged() ? max_requests_ : max_size(); }
  // The requests a captured size holds: the size itself (uniform), R(T) (ragged).
  int64_t requests_of(int64_t size) const;
  // Where the outputs of a step of `requests` requests at captured `size` sit in the armed runner's list of
  // output views: the batch itself (uniform), or one slot per (size, requests) pair (ragged).
  int64_t output_slot(int64_t size, int64_t requests) const {
    return ragged() ? first_slot_[index_of_[size]] + requests - 1 : requests;
  }
  // output_slot() with its arguments checked (for callers outside the step path).
  int64_t checked_output_slot(int64_t size, int64_t requests) const;
  // How many slots that list has (slot 0 unused).
  int64_t output_slots() const;
  const std::vector<int64_t>& sizes() const { return sizes_; }

 private:
  int64_t ragged_size_for(StepShape shape) const;

  std::vector<int64_t> sizes_;           // ascending
  std::vector<int64_t> size_for_batch_;  // item n: the smallest size >= n (uniform: size_for(n)), for n in 0..max
  // Ragged only (empty for a uniform table):
  std::vector<int64_t> requests_;    // requests_[i]: the requests sizes_[i] holds
  std::vector<int64_t> index_of_;    // index_of_[T]: i where sizes_[i] == T, else -1
  std::vector<int64_t> first_slot_;  // first_slot_[i]: the output slot of (sizes_[i], 1 request)
  int64_t max_requests_ = 0;
};

}  // namespace graphrunner
