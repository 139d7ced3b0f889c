// The host-time floor of a step: a bare cudaGraphLaunch loop in C++, with no Python and no checks.
// The benchmark compares every contender's host time with it.
#pragma once

#include "graph.h"

namespace graphrunner {

// Median host microseconds of one cudaGraphLaunch of `graph`, synchronised after each launch as a
// serving loop is.
double launch_floor_us(const Graph& graph, int steps);

}  // namespace graphrunner
