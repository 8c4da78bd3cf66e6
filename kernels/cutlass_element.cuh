// CUTLASS's element type for each CUDA element type the kernels take: __half is
// cutlass::half_t, __nv_bfloat16 cutlass::bfloat16_t, float itself. Shared by the 2.x
// kernels (cutlass_conv.cuh) and the sm_90a ones (adjoined_conv_sm90a.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cutlass/numeric_types.h>

namespace anfast {
namespace detail {

template <typename T>
struct CutlassElement {
  using type = T;
};
template <>
struct CutlassElement<__half> {
  using type = cutlass::half_t;
};
template <>
struct CutlassElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

}  // namespace detail
}  // namespace anfast
