// Weight gradient of the adjoined convolution, base and student in one launch.
//
// GEMM view, per dW tile (o, c) at one kernel tap (tap_h, tap_w):
//   dW[o, c] = sum_m grad_y_base[m, o] * x_base[m @ tap, c]
//            + [o < c_out, c < c_in] sum_m grad_y_student[m, o] * x_student[m @ tap, c]
// with m = (batch, out_row, out_col). Both sums go into ONE fp32 accumulator per
// tile (DESIGN.md section 4): no second tensor, no add kernel, no atomics.
#include "conv_tile.cuh"

namespace anfast {
namespace detail {
namespace {

struct WgradParams {
  int batch, out_rows, out_cols, in_rows, in_cols;
  int kernel_w, stride_h, stride_w, pad_h, pad_w;
  int in_channels[2];    // [base, student]
  int out_channels[2];   // [base, student]
  int channel_tiles;     // ceil(C_in / kBlockN): blockIdx.y = tap * channel_tiles + tile
  Tensor4d grad_y[2];    // [base, student], (N, C, H, W) order
  Tensor4d x[2];         // [base, student], (N, C, H, W) order
  Tensor4d grad_weight;  // (C_out, C_in, kh, kw) order
};

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradParams p) {
  ANFAST_SHARED_TILES(T, tiles);
  // Decoded (batch, out_row, out_col) of the kBlockK reduction positions of one step.
  __shared__ int step_batch[kBlockK], step_y[kBlockK], step_x[kBlockK];

  const int o0 = blockIdx.x * kBlockM;
  const int tap = blockIdx.y / p.channel_tiles;
  const int c0 = (blockIdx.y % p.channel_tiles) * kBlockN;
  const int tap_h = tap / p.kernel_w, tap_w = tap % p.kernel_w;
  // Block-uniform: whether this tile overlaps the student's leading block of W.
  const bool student_tile = o0 < p.out_channels[1] && c0 < p.in_channels[1];
  const int networks = student_tile ? 2 : 1;
  const int64_t m_total = static_cast<int64_t>(p.batch) * p.out_rows * p.out_cols;
  const T zero = from_float<T>(0.0f);

  TileMma<T> acc;
  acc.zero();

  for (int64_t m0 = 0; m0 < m_total; m0 += kBlockK) {
    if (threadIdx.x < kBlockK) {
      const int64_t m = m0 + threadIdx.x;
      int batch, y, x;
      decode_row(m, m_total, p.out_rows, p.out_cols, batch, y, x);
      step_batch[threadIdx.x] = batch;
      step_y[threadIdx.x] = y;
      step_x[threadIdx.x] = x;
    }
    __syncthreads();
    for (int net = 0; net < networks; ++net) {
      // Left operand a[o][m] = grad_y[m, o]: consecutive threads read consecutive o.
      const T* grad_y = static_cast<const T*>(p.grad_y[net].data);
      for (int e = threadIdx.x; e < kBlockM * kBlockK; e += kThreads) {
        const int k = e / kBlockM, r = e % kBlockM, o = o0 + r;
        const int batch = step_batch[k];
        T value = zero;
        if (batch >= 0 && o < p.out_channels[net])
          value = grad_y[offset4d(p.grad_y[net], batch, o, step_y[k], step_x[k])];
        tiles.operands.a[net][r][k] = value;
      }
      // Right operand b[m][c] = x[m @ tap, c] (im2col), consecutive threads read consecutive c.
      const T* x = static_cast<const T*>(p.x[net].data);
      for (int e = threadIdx.x; e < kBlockK * kBlockN; e += kThreads) {
        const int k = e / kBlockN, n = e % kBlockN, c = c0 + n;
        const int batch = step_batch[k];
        T value = zero;
        if (batch >= 0 && c < p.in_channels[net]) {
          const int iy = tap_source(step_y[k], tap_h, p.stride_h, p.pad_h, p.in_rows, false);
          const int ix = tap_source(step_x[k], tap_w, p.stride_w, p.pad_w, p.in_cols, false);
          if (iy >= 0 && ix >= 0) value = x[offset4d(p.x[net], batch, c, iy, ix)];
        }
        tiles.operands.b[net][k][n] = value;
      }
    }
    __syncthreads();
    acc.mma(tiles.operands.a[0], tiles.operands.b[0]);
    if (student_tile) acc.mma(tiles.operands.a[1], tiles.operands.b[1]);
    __syncthreads();
  }

  acc.store(tiles.c);
  __syncthreads();
  T* grad_weight = static_cast<T*>(p.grad_weight.data);
  for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
    const int r = e / kBlockN, n = e % kBlockN, o = o0 + r, c = c0 + n;
    if (o < p.out_channels[0] && c < p.in_channels[0])
      grad_weight[offset4d(p.grad_weight, o, c, tap_h, tap_w)] = from_float<T>(tiles.c[r][n]);
  }
}

}  // namespace
}  // namespace detail

template <typename T>
cudaError_t adjoined_conv2d_wgrad(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                  Tensor4d grad_y_student, Tensor4d x_base, Tensor4d x_student,
                                  Tensor4d grad_weight, cudaStream_t stream) {
  using detail::ceil_div;
  if (adjoined_conv2d_shape_error(shape) != nullptr) return cudaErrorInvalidValue;
  detail::WgradParams p{};
  p.batch = shape.batch;
  p.out_rows = shape.out_height();
  p.out_cols = shape.out_width();
  p.in_rows = shape.height;
  p.in_cols = shape.width;
  p.kernel_w = shape.kernel_w;
  p.stride_h = shape.stride_h;
  p.stride_w = shape.stride_w;
  p.pad_h = shape.pad_h;
  p.pad_w = shape.pad_w;
  p.in_channels[0] = shape.in_channels;
  p.in_channels[1] = shape.in_channels_student;
  p.out_channels[0] = shape.out_channels;
  p.out_channels[1] = shape.out_channels_student;
  p.channel_tiles = ceil_div(shape.in_channels, detail::kBlockN);
  p.grad_y[0] = grad_y_base;
  p.grad_y[1] = grad_y_student;
  p.x[0] = x_base;
  p.x[1] = x_student;
  p.grad_weight = grad_weight;
  // The whole reduction over batch x output positions runs inside one block: with
  // batch 0 the kernel still runs and writes zeros, as the gradient must be.
  const dim3 grid(ceil_div(shape.out_channels, detail::kBlockM),
                  shape.kernel_h * shape.kernel_w * p.channel_tiles);
  detail::wgrad_kernel<T><<<grid, detail::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define ANFAST_INSTANTIATE(T)                                                                 \
  template cudaError_t adjoined_conv2d_wgrad<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,  \
                                                Tensor4d, Tensor4d, Tensor4d, cudaStream_t);
ANFAST_INSTANTIATE(float)
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
