#include "sizes.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace graphrunner {

SizeTable::SizeTable(std::vector<int64_t> capture_sizes, int64_t max_batch_size) : sizes_(std::move(capture_sizes)) {
  std::sort(sizes_.begin(), sizes_.end());
  sizes_.erase(std::unique(sizes_.begin(), sizes_.end()), sizes_.end());
  if (sizes_.empty() || sizes_.front() < 1 || sizes_.back() > max_batch_size) {
    throw InputValueError("capture sizes must be ints in 1..max_batch_size (" + std::to_string(max_batch_size) + ")");
  }
  size_for_batch_.assign(max_batch_size + 1, 0);
  for (int64_t b = 1; b <= max_batch_size; ++b) {
    auto fit = std::lower_bound(sizes_.begin(), sizes_.end(), b);
    size_for_batch_[b] = fit == sizes_.end() ? 0 : *fit;
  }
}

SizeTable::SizeTable(std::vector<int64_t> capture_sizes, int64_t max_tokens, std::vector<int64_t> requests_per_size)
    : SizeTable(capture_sizes, max_tokens) {
  if (sizes_ != capture_sizes || requests_per_size.size() != sizes_.size()) {
    throw InputValueError("a ragged size table takes unique token sizes in ascending order, with one request count "
                          "per size");
  }
  index_of_.assign(max_tokens + 1, -1);
  int64_t slot = 1;
  for (size_t i = 0; i < sizes_.size(); ++i) {
    if (requests_per_size[i] < 1 || requests_per_size[i] > sizes_[i]) {
      throw InputValueError("size " + std::to_string(sizes_[i]) + " tokens would hold " +
                            std::to_string(requests_per_size[i]) + " requests; each size holds 1..its tokens requests");
    }
    index_of_[sizes_[i]] = static_cast<int64_t>(i);
    first_slot_.push_back(slot);
    slot += requests_per_size[i];
    max_requests_ = std::max(max_requests_, requests_per_size[i]);
  }
  requests_ = std::move(requests_per_size);
}

int64_t SizeTable::requests_of(int64_t size) const {
  if (!ragged()) {
    return size;
  }
  if (size < 1 || size > max_size() || index_of_[size] < 0) {
    throw InputValueError(std::to_string(size) + " tokens is not a captured size");
  }
  return requests_[index_of_[size]];
}

int64_t SizeTable::checked_output_slot(int64_t size, int64_t requests) const {
  if (requests < 1 || requests > requests_of(size) || (!ragged() && size_for(size) != size)) {
    throw InputValueError("no output slot for " + std::to_string(requests) + " requests at size " +
                          std::to_string(size) + ": the size must be captured and hold that many requests");
  }
  return output_slot(size, requests);
}

int64_t SizeTable::output_slots() const {
  return ragged() ? first_slot_.back() + requests_.back() : max_size() + 1;
}

int64_t SizeTable::ragged_size_for(StepShape shape) const {
  const int64_t smallest = size_for(shape.tokens);  // the smallest size with room for the tokens
  if (smallest == 0) {
    return 0;
  }
  for (size_t i = index_of_[smallest]; i < sizes_.size(); ++i) {
    if (requests_[i] >= shape.requests) {
      return sizes_[i];
    }
  }
  return 0;
}

}  // namespace graphrunner
