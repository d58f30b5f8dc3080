// OQFL_HD: marks the torch-free inline functions of csrc/common usable from host and device
// code alike (nvcc sees __host__ __device__, a C++ compiler a plain inline).
#pragma once

#if defined(__CUDACC__)
#define OQFL_HD __host__ __device__ __forceinline__
#else
#define OQFL_HD inline
#endif
