// CUDA_OK(call): host programs (the ctest test and the benchmark) stop with the
// failing call, file and line when a CUDA runtime call fails.
#pragma once

#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#define CUDA_OK(call)                                                              \
  do {                                                                             \
    cudaError_t status_ = (call);                                                  \
    if (status_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call,            \
                   cudaGetErrorString(status_));                                   \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)
