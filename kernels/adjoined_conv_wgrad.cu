// Weight gradient of the adjoined convolution, base and student in one launch.
//
// GEMM view per dW tile: m = output channel, n = (tap_h, tap_w, input channel),
// k = (batch, out_row, out_col):
//   dW[o, n] = sum_k grad_y_base[k, o] * x_base[k @ tap, c]
//            + [o < c_out, c < c_in] sum_k grad_y_student[k, o] * x_student[k @ tap, c]
// A block whose tile overlaps the student's leading block runs CUTLASS's wgrad
// mainloop over the base rows, then over the student rows, into ONE accumulator
// (DESIGN.md section 4). When the dW tiles alone underfill the GPU, the k reduction is
// split into slices (blockIdx.y), each writing fp32 partial sums; a second kernel adds
// the slices in a fixed order (deterministic) and converts to T.
#include "cutlass_conv.cuh"

namespace anfast {
namespace detail {
namespace {

template <typename Kernel>
struct WgradParams {
  typename Kernel::Params problem[2];  // [base, student]
  cutlass::FastDivmod tiles_m;         // dW tile -> (m, n), m fastest
  cutlass::FastDivmod base_columns;    // base column n -> (tap, input channel)
  int student_rows;                    // out_channels_student
  int student_channels;                // x_student's channels (see wgrad_student_channels)
  float* workspace;                    // [splits][C_out][kh][kw][C_in] fp32 partial sums
  int64_t slice_elements;              // C_out * kh * kw * C_in
};

// acc += the wgrad mainloop of one problem over reduction slice `split`, for the dW
// tile at (row, column) of that problem's GEMM.
template <typename Kernel>
__device__ __forceinline__ void wgrad_mainloop(const typename Kernel::Params& params, int row, int column,
                                               int split, typename Kernel::Mma::FragmentC& accumulators,
                                               typename Kernel::SharedStorage& smem) {
  using Mma = typename Kernel::Mma;
  const int thread_idx = threadIdx.x;
  typename Mma::IteratorA iterator_A(params.iterator_A, params.problem_size, params.ptr_A, thread_idx,
                                     cutlass::MatrixCoord(row, split * Mma::Shape::kK));
  typename Mma::IteratorB iterator_B(params.iterator_B, params.problem_size, params.ptr_B, thread_idx,
                                     cutlass::MatrixCoord(split * Mma::Shape::kK, column));
  Mma mma(smem.main_loop, thread_idx, cutlass::canonical_warp_idx_sync(), threadIdx.x % 32);
  mma(params.gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators,
      params.gemm_k_iterations_per_channel);
}

template <typename Kernel>
__global__ void __launch_bounds__(Kernel::kThreadCount)
    wgrad_kernel(const __grid_constant__ WgradParams<Kernel> p) {
  using Mma = typename Kernel::Mma;
  using Epilogue = typename Kernel::Epilogue;
  auto& smem = shared_storage<Kernel>();
  int tile_n, tile_m;
  p.tiles_m(tile_n, tile_m, blockIdx.x);
  const int row = tile_m * Mma::Shape::kM, column = tile_n * Mma::Shape::kN;
  const int split = blockIdx.y;

  typename Mma::FragmentC accumulators;
  accumulators.clear();
  wgrad_mainloop<Kernel>(p.problem[0], row, column, split, accumulators, smem);
  // The same (tap, channel) column in the student's GEMM, whose rows are
  // tap-major over its own channel count. Block-uniform branch.
  int tap, channel;
  p.base_columns(tap, channel, column);
  if (row < p.student_rows && channel < p.student_channels) {
    __syncthreads();  // every warp is done with the base pipeline's shared memory
    wgrad_mainloop<Kernel>(p.problem[1], row, tap * p.student_channels + channel, split, accumulators, smem);
  }

  const typename Kernel::Params& base = p.problem[0];
  typename Epilogue::OutputTileIterator iterator_D(
      base.iterator_D, p.workspace + split * p.slice_elements,
      Kernel::ConvOutputIteratorParameter::extent(base.problem_size), threadIdx.x,
      cutlass::MatrixCoord(row, column));
  Epilogue epilogue(smem.epilogue, threadIdx.x, cutlass::canonical_warp_idx_sync(), threadIdx.x % 32);
  epilogue(typename Kernel::EpilogueOutputOp(base.output_op), iterator_D, accumulators);
}

// dW[o, c, r, s] = sum over slices, in slice order, of workspace[slice][o][r][s][c].
template <typename T>
__global__ void wgrad_sum_slices_kernel(const float* workspace, int splits, int64_t slice_elements,
                                        Tensor4d grad_weight, int elements, cutlass::FastDivmod channels,
                                        cutlass::FastDivmod kernel_w, cutlass::FastDivmod kernel_h) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < elements; i += gridDim.x * blockDim.x) {
    int rest, c, r, s, o;
    channels(rest, c, i);
    kernel_w(rest, s, rest);
    kernel_h(o, r, rest);
    float sum = 0.0f;
    for (int k = 0; k < splits; ++k) sum += workspace[k * slice_elements + i];
    T* out = static_cast<T*>(grad_weight.data);
    out[o * grad_weight.stride[0] + c * grad_weight.stride[1] + r * grad_weight.stride[2] +
        s * grad_weight.stride[3]] = static_cast<T>(sum);
  }
}

// Reduction slices: enough blocks for two waves of dW tiles of tile_m rows, each slice
// at least 16 k-steps of 32; one slice when the variant does not split.
int wgrad_splits(const AdjoinedConvShape& s, int tile_m, bool split) {
  if (!split) return 1;
  int device = 0, sms = 1;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    sms = 1;
  const int64_t columns = static_cast<int64_t>(s.kernel_h) * s.kernel_w * s.in_channels;
  const int64_t tiles = ceil_div(s.out_channels, tile_m) * static_cast<int64_t>(ceil_div(columns, kWgradTileN));
  const int64_t rows = static_cast<int64_t>(s.batch) * s.out_height() * s.out_width();
  const int64_t by_occupancy = ceil_div(2 * sms, tiles);
  const int64_t by_depth = rows / (16 * 32);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(by_occupancy, by_depth)));
}

// The reduction slices of `variant` (0 for a tile index T does not have).
template <typename T>
int wgrad_splits(const AdjoinedConvShape& s, KernelVariant variant) {
  int splits = 0;
  with_tiles<T>(variant.tiles, [&](auto config) {
    splits = wgrad_splits(s, decltype(config)::WgradThreadblock::kM, variant.split_wgrad);
  });
  return splits;
}

template <typename T, typename Config>
cudaError_t launch_wgrad(const AdjoinedConvShape& shape, const Tensor4d* grad_y, const Tensor4d* x,
                         Tensor4d grad_weight, float* slices, int splits, cudaStream_t stream) {
  using Kernel = typename ConvKernels<T, Config>::Wgrad;
  using Element = typename CutlassElement<T>::type;
  const int64_t slice = static_cast<int64_t>(shape.out_channels) * shape.kernel_h * shape.kernel_w *
                        shape.in_channels;
  WgradParams<Kernel> p;
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  for (int net = 0; net < 2; ++net) {
    // The student's epilogue is never run: its D is the base's layout, for Params only.
    const cutlass::TensorRef<float, cutlass::layout::TensorNHWC> out(
        slices, cutlass::layout::TensorNHWC::packed({out_c[net], shape.kernel_h, shape.kernel_w, in_c[net]}));
    typename Kernel::Arguments args(problem_size(shape, in_c[net], out_c[net], splits),
                                    nhwc_ref<Element>(grad_y[net]), nhwc_ref<Element>(x[net]), out, out,
                                    {1.0f, 0.0f}, cutlass::conv::SplitKMode::kParallel);
    p.problem[net] = typename Kernel::Params(args);
  }
  const auto& tiled = p.problem[0].grid_tiled_shape;
  p.tiles_m = cutlass::FastDivmod(tiled.m());
  p.base_columns = cutlass::FastDivmod(shape.in_channels);
  p.student_rows = shape.out_channels_student;
  p.student_channels = shape.in_channels_student;
  p.workspace = slices;
  p.slice_elements = slice;
  cudaError_t status = launch<Kernel>(wgrad_kernel<Kernel>, dim3(tiled.m() * tiled.n(), splits), p, stream);
  if (status != cudaSuccess) return status;
  constexpr int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(slice, threads), 4096));
  wgrad_sum_slices_kernel<T><<<blocks, threads, 0, stream>>>(
      slices, splits, slice, grad_weight, static_cast<int>(slice), cutlass::FastDivmod(shape.in_channels),
      cutlass::FastDivmod(shape.kernel_w), cutlass::FastDivmod(shape.kernel_h));
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

int adjoined_conv2d_wgrad_student_channels(const AdjoinedConvShape& s) {
  constexpr int n = detail::kWgradTileN;
  if (s.in_channels_student == s.in_channels) return s.in_channels;
  // Whole base tiles per tap: the student's tiles are whole tiles of the same channels.
  if (s.in_channels % n == 0) return (s.in_channels_student + n - 1) / n * n;
  // Otherwise a base tile may span two taps: the student needs the base's columns.
  return s.in_channels;
}

template <typename T>
size_t adjoined_conv2d_wgrad_workspace_bytes(const AdjoinedConvShape& s, KernelVariant variant) {
  return static_cast<size_t>(detail::wgrad_splits<T>(s, variant)) * s.out_channels * s.kernel_h * s.kernel_w *
         s.in_channels * sizeof(float);
}

template <typename T>
cudaError_t adjoined_conv2d_wgrad(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                  Tensor4d grad_y_student, Tensor4d x_base, Tensor4d x_student,
                                  Tensor4d grad_weight, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream, KernelVariant variant) {
  const Tensor4d grad_y[2] = {grad_y_base, grad_y_student}, x[2] = {x_base, x_student};
  if (adjoined_conv2d_shape_error<T>(shape) != nullptr ||
      adjoined_conv2d_wgrad_student_channels(shape) != shape.in_channels_student ||
      !detail::layouts_ok(shape, nullptr, x, grad_y, true))
    return cudaErrorInvalidValue;
  const int splits = detail::wgrad_splits<T>(shape, variant);
  if (splits == 0 || workspace == nullptr ||
      workspace_bytes < adjoined_conv2d_wgrad_workspace_bytes<T>(shape, variant))
    return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  detail::with_tiles<T>(variant.tiles, [&](auto config) {
    status = detail::launch_wgrad<T, decltype(config)>(shape, grad_y, x, grad_weight, static_cast<float*>(workspace),
                                                       splits, stream);
  });
  return status;
}

#define ANFAST_INSTANTIATE(T)                                                                 \
  template size_t adjoined_conv2d_wgrad_workspace_bytes<T>(const AdjoinedConvShape&, KernelVariant); \
  template cudaError_t adjoined_conv2d_wgrad<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,  \
                                                Tensor4d, Tensor4d, Tensor4d, void*, size_t,   \
                                                cudaStream_t, KernelVariant);
ANFAST_INSTANTIATE(float)
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
