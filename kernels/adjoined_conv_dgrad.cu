// dgrad of the adjoined convolution, base and student in one launch.
//
// GEMM view per network: m = (batch, in_row, in_col), n = input channel,
// k = (tap_h, tap_w, output channel) over grad_y. Stride 1 is a plain implicit GEMM;
// stride > 1 is decomposed into stride_h x stride_w phases of grad_x (CUTLASS's
// strided dgrad), each a dense problem over the taps that reach it, so no masked zero
// is multiplied. Index decoding uses cutlass::FastDivmod (no integer division per
// element).
#include "cutlass_conv.cuh"

namespace anfast {
namespace detail {
namespace {

template <typename Kernel, bool kStrided, typename T>
cudaError_t launch_dgrad(const AdjoinedConvShape& shape, const Tensor4d* grad_y, const Tensor4d& weight,
                         const Tensor4d* grad_x, cudaStream_t stream) {
  using Element = typename CutlassElement<T>::type;
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  typename Kernel::Arguments args[2];
  for (int net = 0; net < 2; ++net) {
    const auto out = nhwc_ref<Element>(grad_x[net]);
    args[net] = typename Kernel::Arguments(problem_size(shape, in_c[net], out_c[net], 1),
                                           nhwc_ref<Element>(grad_y[net]), nhwc_ref<Element>(weight), out,
                                           out, {1.0f, 0.0f});
  }
  const auto params = fused_params<Kernel>(args[0], args[1]);
  return launch<Kernel>(fused_conv_kernel<Kernel, kStrided>, dim3(params.tiles[0] + params.tiles[1]),
                        params, stream);
}

}  // namespace
}  // namespace detail

template <typename T>
cudaError_t adjoined_conv2d_dgrad(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                  Tensor4d grad_y_student, Tensor4d weight,
                                  Tensor4d grad_x_base, Tensor4d grad_x_student,
                                  cudaStream_t stream, KernelVariant variant) {
  const Tensor4d grad_y[2] = {grad_y_base, grad_y_student}, grad_x[2] = {grad_x_base, grad_x_student};
  if (adjoined_conv2d_shape_error<T>(shape) != nullptr ||
      !detail::layouts_ok(shape, &weight, grad_y, grad_x, false))
    return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;  // stays so for a tile index T does not have
  detail::with_tiles<T>(variant.tiles, [&](auto config) {
    using Kernels = detail::ConvKernels<T, decltype(config)>;
    if (shape.batch == 0) {
      status = cudaSuccess;  // empty outputs (and no tile to count)
    } else if (shape.stride_h == 1 && shape.stride_w == 1) {
      status = detail::launch_dgrad<typename Kernels::DgradUnit, false, T>(shape, grad_y, weight, grad_x, stream);
    } else {
      status = detail::launch_dgrad<typename Kernels::DgradStrided, true, T>(shape, grad_y, weight, grad_x, stream);
    }
  });
  return status;
}

#define ANFAST_INSTANTIATE(T)                                                                \
  template cudaError_t adjoined_conv2d_dgrad<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d, \
                                                Tensor4d, Tensor4d, Tensor4d, cudaStream_t,  \
                                                KernelVariant);
ANFAST_INSTANTIATE(float)
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
