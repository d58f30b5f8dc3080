// Argument checks that name the argument and say what was expected and what was received.
// Torch-side (they raise c10 errors that reach Python as ValueError / TypeError).
#pragma once

#include <c10/util/Exception.h>

// ValueError: "<op>: <arg> expected <what>, got <value>".
#define OQFL_CHECK_ARG(cond, op, arg, expected, ...)                                          \
  TORCH_CHECK_VALUE((cond), op, ": ", arg, " expected ", expected, ", got ", __VA_ARGS__)

// TypeError, same message shape, for dtypes.
#define OQFL_CHECK_DTYPE(cond, op, arg, expected, got)                                        \
  TORCH_CHECK_TYPE((cond), op, ": ", arg, " expected ", expected, ", got ", got)
