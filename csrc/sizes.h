// Which captured size a batch runs at: the one lookup, shared by the step path and Python.
#pragma once

#include <cstdint>
#include <vector>

namespace graphrunner {

class SizeTable {
 public:
  // `capture_sizes`: the sizes that will be captured, each in 1..max_batch_size, any order.
  SizeTable(std::vector<int64_t> capture_sizes, int64_t max_batch_size);

  // The smallest captured size that holds `batch` rows; 0 when none does (the step runs eagerly).
  int64_t size_for(int64_t batch) const {
    return (batch >= 1 && batch < static_cast<int64_t>(size_for_batch_.size())) ? size_for_batch_[batch] : 0;
  }
  int64_t max_batch_size() const { return static_cast<int64_t>(size_for_batch_.size()) - 1; }
  const std::vector<int64_t>& sizes() const { return sizes_; }

 private:
  std::vector<int64_t> sizes_;           // ascending
  std::vector<int64_t> size_for_batch_;  // item b: size_for(b), for b in 0..max_batch_size
};

}  // namespace graphrunner
