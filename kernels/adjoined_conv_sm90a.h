// Host API of the Hopper-native (sm_90a) adjoined convolution kernels: CUTLASS 3's
// TMA + wgmma warp-specialized implicit-GEMM conv (kernels/adjoined_conv_sm90a.cu) for
// the forward, the weight gradient and the stride-1 data gradient.
//
// Built only when the target archs include 90 (setup.py defines ANFAST_HAS_SM90A for
// the bindings then); they run on sm_90 devices alone, and the 2.x kernels of
// adjoined_conv.h stay the fallback for every phase these refuse.
#pragma once

#include "adjoined_conv.h"

namespace anfast {

// Why the sm_90a kernel of `phase` (kForward, kDgrad or kWgrad) cannot run a shape with
// element type T (__half or __nv_bfloat16), or nullptr when it can: everything
// adjoined_conv2d_shape_error refuses, padding over TMA im2col's 127, a bias (forward:
// the epilogue has no broadcast source here), a stride over 1 (dgrad). kDgradStrided
// has no sm_90a kernel. Hosts run the 2.x kernel of a refused phase.
template <typename T>
const char* adjoined_conv2d_sm90a_shape_error(const AdjoinedConvShape& shape, ConvKernel phase, bool has_bias);

// y_base = conv(x_base, W); y_student = conv(x_student, W[:c_out, :c_in]): two launches
// on `stream`, layouts as adjoined_conv2d_forward's. cudaErrorInvalidValue for a shape
// adjoined_conv2d_sm90a_shape_error refuses or one CUTLASS's can_implement rejects.
template <typename T>
cudaError_t adjoined_conv2d_forward_sm90a(const AdjoinedConvShape& shape, Tensor4d x_base, Tensor4d x_student,
                                          Tensor4d weight, Tensor4d y_base, Tensor4d y_student,
                                          cudaStream_t stream);

// grad_x_base = dgrad(grad_y_base, W); grad_x_student = dgrad(grad_y_student, W_s), stride
// 1 only: two launches, layouts as adjoined_conv2d_dgrad's.
template <typename T>
cudaError_t adjoined_conv2d_dgrad_sm90a(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                        Tensor4d grad_y_student, Tensor4d weight, Tensor4d grad_x_base,
                                        Tensor4d grad_x_student, cudaStream_t stream);

// grad_weight = wgrad(grad_y_base, x_base), then the student's wgrad added into its
// leading block by a second launch (the epilogue reads the base's result, beta = 1).
// grad_weight must be packed KRSC (CUTLASS 3's wgrad writes no other); x_student has
// in_channels_student channels (no widening, unlike adjoined_conv2d_wgrad); no workspace.
template <typename T>
cudaError_t adjoined_conv2d_wgrad_sm90a(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                        Tensor4d grad_y_student, Tensor4d x_base, Tensor4d x_student,
                                        Tensor4d grad_weight, cudaStream_t stream);

// A kernel's tile, threads per block and shared memory (kForward, kDgrad, kWgrad; zeros
// for kDgradStrided, which has no sm_90a kernel), for benchmarks/kernel_report.py.
template <typename T>
KernelResources adjoined_conv2d_sm90a_kernel_resources(ConvKernel kernel);

namespace detail {
// Packed NHWC activations and a KRSC weight (defined in adjoined_conv_fprop.cu).
bool layouts_ok(const AdjoinedConvShape& s, const Tensor4d* weight, const Tensor4d* inputs,
                const Tensor4d* outputs, bool input_is_x);
}  // namespace detail

#define ANFAST_DECLARE_SM90A(T)                                                                               \
  extern template const char* adjoined_conv2d_sm90a_shape_error<T>(const AdjoinedConvShape&, ConvKernel,      \
                                                                   bool);                                     \
  extern template cudaError_t adjoined_conv2d_forward_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,  \
                                                               Tensor4d, Tensor4d, Tensor4d, cudaStream_t);   \
  extern template cudaError_t adjoined_conv2d_dgrad_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,    \
                                                             Tensor4d, Tensor4d, Tensor4d, cudaStream_t);     \
  extern template cudaError_t adjoined_conv2d_wgrad_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,    \
                                                             Tensor4d, Tensor4d, Tensor4d, cudaStream_t);     \
  extern template KernelResources adjoined_conv2d_sm90a_kernel_resources<T>(ConvKernel);
ANFAST_DECLARE_SM90A(__half)
ANFAST_DECLARE_SM90A(__nv_bfloat16)
#undef ANFAST_DECLARE_SM90A

}  // namespace anfast
