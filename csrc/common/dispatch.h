// The project's dtype dispatch: the float types a fake-quantized tensor may have.
#pragma once

#include <ATen/Dispatch.h>

#define OQFL_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)          \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)       \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
