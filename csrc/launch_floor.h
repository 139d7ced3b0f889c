// Host-time reference loops in C++, with no Python in between: the floor of a step (a bare
// cudaGraphLaunch) and graphrunner's own native step. The benchmark compares every contender with them.
#pragma once

#include "graph.h"
#include "inputs.h"
#include "step.h"

namespace graphrunner {

// Median host microseconds of one cudaGraphLaunch of `graph`, synchronised after each launch as a
// serving loop is.
double launch_floor_us(const Graph& graph, int steps);

// Median host microseconds of graphrunner's whole native step (checks, staging descriptor, launch) on
// `inputs`, synchronised after each step.
double step_loop_us(StepRunner& runner, StepTensors inputs, int steps);

}  // namespace graphrunner
