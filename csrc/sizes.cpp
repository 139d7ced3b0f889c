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

}  // namespace graphrunner
