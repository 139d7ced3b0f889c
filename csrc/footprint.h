// Which memory each capture allocated: its graph's footprint in the shared pool.
//
// A graph may legitimately overwrite anything inside its own footprint on replay, including another
// size's outputs that the allocator later placed over its intermediates (that is how largest-first
// sharing saves memory). A write anywhere else in the pool is out of bounds; the hazard checks need
// the footprint to tell the two apart.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace graphrunner {

using AddressRange = std::pair<uint64_t, uint64_t>;  // address, bytes

// Starts recording the allocations made from `stream` (a stream about to be captured).
void begin_footprint(cudaStream_t stream);
// Stops recording for `stream` and returns what it allocated, in allocation order.
std::vector<AddressRange> end_footprint(cudaStream_t stream);

}  // namespace graphrunner
