// Forward and dgrad of the adjoined convolution: one implicit-GEMM kernel serves
// both, since dgrad is a convolution of grad_y with the same weight taps, read
// through the transposed (stride-inverting) index map and with W's two channel
// axes swapped.
//
// GEMM view, per output tile (m, n):
//   m = (batch, row, col) over the output positions of this GEMM,
//   n = output channel (forward: C_out; dgrad: C_in),
//   k = (tap_h, tap_w, c) with c over the reduced channels (forward: C_in; dgrad: C_out).
// Tiles with n < student width load each W tile once and issue both products; the
// student's left operand is zero for c >= its reduced width (DESIGN.md section 4).
#include "conv_tile.cuh"

namespace anfast {
namespace detail {
namespace {

struct ConvGemmParams {
  int batch, rows, cols;           // output positions of this GEMM
  int source_rows, source_cols;    // spatial size of the left operand (x or grad_y)
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  bool transposed;                 // dgrad: gather grad_y at (row + pad - tap) / stride
  int reduce_channels[2];          // [base, student] channels summed over
  int out_channels[2];             // [base, student] channels written
  Tensor4d source[2];              // [base, student] left operands, (N, C, H, W) order
  Tensor4d out[2];                 // [base, student] outputs, (N, C, H, W) order
  const void* weight;
  int64_t weight_stride_reduce, weight_stride_out, weight_stride_h, weight_stride_w;
  const void* bias;                // forward only; nullptr for none
};

template <typename T>
__global__ void __launch_bounds__(kThreads) conv_gemm_kernel(const ConvGemmParams p) {
  ANFAST_SHARED_TILES(T, tiles);
  // Decoded (batch, row, col) of each tile row; batch -1 marks rows past the end.
  __shared__ int row_batch[kBlockM], row_y[kBlockM], row_x[kBlockM];

  const int64_t m_total = static_cast<int64_t>(p.batch) * p.rows * p.cols;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int n0 = blockIdx.y * kBlockN;
  if (threadIdx.x < kBlockM) {
    const int64_t m = m0 + threadIdx.x;
    int batch, y, x;
    decode_row(m, m_total, p.rows, p.cols, batch, y, x);
    row_batch[threadIdx.x] = batch;
    row_y[threadIdx.x] = y;
    row_x[threadIdx.x] = x;
  }
  // Block-uniform, so the __syncthreads() inside student branches are safe.
  const bool student_tile = n0 < p.out_channels[1];
  const T* weight = static_cast<const T*>(p.weight);
  const T zero = from_float<T>(0.0f);

  TileMma<T> acc_base, acc_student;
  acc_base.zero();
  acc_student.zero();
  __syncthreads();

  for (int tap_h = 0; tap_h < p.kernel_h; ++tap_h) {
    for (int tap_w = 0; tap_w < p.kernel_w; ++tap_w) {
      for (int c0 = 0; c0 < p.reduce_channels[0]; c0 += kBlockK) {
        const bool student_step = student_tile && c0 < p.reduce_channels[1];
        const int networks = student_step ? 2 : 1;
        // Left operands: consecutive threads read consecutive channels (NHWC-coalesced).
        for (int net = 0; net < networks; ++net) {
          const T* source = static_cast<const T*>(p.source[net].data);
          for (int e = threadIdx.x; e < kBlockM * kBlockK; e += kThreads) {
            const int r = e / kBlockK, k = e % kBlockK, c = c0 + k;
            T value = zero;
            const int batch = row_batch[r];
            if (batch >= 0 && c < p.reduce_channels[net]) {
              const int sy = tap_source(row_y[r], tap_h, p.stride_h, p.pad_h, p.source_rows, p.transposed);
              const int sx = tap_source(row_x[r], tap_w, p.stride_w, p.pad_w, p.source_cols, p.transposed);
              if (sy >= 0 && sx >= 0) value = source[offset4d(p.source[net], batch, c, sy, sx)];
            }
            tiles.operands.a[net][r][k] = value;
          }
        }
        // Right operand: W[.., .., tap_h, tap_w] with k over reduced, n over output channels.
        for (int e = threadIdx.x; e < kBlockK * kBlockN; e += kThreads) {
          const int k = e / kBlockN, n = e % kBlockN, c = c0 + k, o = n0 + n;
          T value = zero;
          if (c < p.reduce_channels[0] && o < p.out_channels[0]) {
            value = weight[c * p.weight_stride_reduce + o * p.weight_stride_out +
                           tap_h * p.weight_stride_h + tap_w * p.weight_stride_w];
          }
          tiles.operands.b[0][k][n] = value;
        }
        __syncthreads();
        acc_base.mma(tiles.operands.a[0], tiles.operands.b[0]);
        if (student_step) acc_student.mma(tiles.operands.a[1], tiles.operands.b[0]);
        __syncthreads();
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  const int networks = student_tile ? 2 : 1;
  for (int net = 0; net < networks; ++net) {
    // Branches, not a ternary on references: that would push both accumulators to local memory.
    if (net == 0) acc_base.store(tiles.c);
    else acc_student.store(tiles.c);
    __syncthreads();
    T* out = static_cast<T*>(p.out[net].data);
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
      const int r = e / kBlockN, n = e % kBlockN, o = n0 + n;
      const int batch = row_batch[r];
      if (batch < 0 || o >= p.out_channels[net]) continue;
      float value = tiles.c[r][n];
      if (bias != nullptr) value += to_float(bias[o]);
      out[offset4d(p.out[net], batch, o, row_y[r], row_x[r])] = from_float<T>(value);
    }
    __syncthreads();
  }
}

template <typename T>
cudaError_t launch_conv_gemm(const ConvGemmParams& p, cudaStream_t stream) {
  const int64_t m_total = static_cast<int64_t>(p.batch) * p.rows * p.cols;
  if (m_total == 0) return cudaSuccess;
  const dim3 grid(ceil_div(m_total, kBlockM), ceil_div(p.out_channels[0], kBlockN));
  conv_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

ConvGemmParams common_params(const AdjoinedConvShape& s) {
  ConvGemmParams p{};
  p.batch = s.batch;
  p.kernel_h = s.kernel_h;
  p.kernel_w = s.kernel_w;
  p.stride_h = s.stride_h;
  p.stride_w = s.stride_w;
  p.pad_h = s.pad_h;
  p.pad_w = s.pad_w;
  return p;
}

}  // namespace
}  // namespace detail

const char* adjoined_conv2d_shape_error(const AdjoinedConvShape& s) {
  auto supported_kernel = [](int k) { return k == 1 || k == 3 || k == 5 || k == 7; };
  if (s.batch < 0 || s.height < 1 || s.width < 1) return "batch must be >= 0 and height, width >= 1";
  if (s.in_channels < 1 || s.out_channels < 1) return "in_channels and out_channels must be >= 1";
  if (s.in_channels_student < 0 || s.in_channels_student > s.in_channels)
    return "in_channels_student must be in [0, in_channels]";
  if (s.out_channels_student < 1 || s.out_channels_student > s.out_channels)
    return "out_channels_student must be in [1, out_channels]";
  if (!supported_kernel(s.kernel_h) || !supported_kernel(s.kernel_w))
    return "kernel_h and kernel_w must be 1, 3, 5 or 7";
  if (s.stride_h < 1 || s.stride_w < 1) return "stride must be >= 1";
  if (s.pad_h < 0 || s.pad_w < 0) return "padding must be >= 0";
  if (s.out_height() < 1 || s.out_width() < 1)
    return "the output is empty: the padded input is smaller than the kernel";
  return nullptr;
}

template <typename T>
cudaError_t adjoined_conv2d_forward(const AdjoinedConvShape& shape, Tensor4d x_base,
                                    Tensor4d x_student, Tensor4d weight, const T* bias,
                                    Tensor4d y_base, Tensor4d y_student, cudaStream_t stream) {
  if (adjoined_conv2d_shape_error(shape) != nullptr) return cudaErrorInvalidValue;
  detail::ConvGemmParams p = detail::common_params(shape);
  p.rows = shape.out_height();
  p.cols = shape.out_width();
  p.source_rows = shape.height;
  p.source_cols = shape.width;
  p.transposed = false;
  p.reduce_channels[0] = shape.in_channels;
  p.reduce_channels[1] = shape.in_channels_student;
  p.out_channels[0] = shape.out_channels;
  p.out_channels[1] = shape.out_channels_student;
  p.source[0] = x_base;
  p.source[1] = x_student;
  p.out[0] = y_base;
  p.out[1] = y_student;
  p.weight = weight.data;
  p.weight_stride_out = weight.stride[0];
  p.weight_stride_reduce = weight.stride[1];
  p.weight_stride_h = weight.stride[2];
  p.weight_stride_w = weight.stride[3];
  p.bias = bias;
  return detail::launch_conv_gemm<T>(p, stream);
}

template <typename T>
cudaError_t adjoined_conv2d_dgrad(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                  Tensor4d grad_y_student, Tensor4d weight,
                                  Tensor4d grad_x_base, Tensor4d grad_x_student,
                                  cudaStream_t stream) {
  if (adjoined_conv2d_shape_error(shape) != nullptr) return cudaErrorInvalidValue;
  detail::ConvGemmParams p = detail::common_params(shape);
  p.rows = shape.height;
  p.cols = shape.width;
  p.source_rows = shape.out_height();
  p.source_cols = shape.out_width();
  p.transposed = true;
  p.reduce_channels[0] = shape.out_channels;
  p.reduce_channels[1] = shape.out_channels_student;
  p.out_channels[0] = shape.in_channels;
  p.out_channels[1] = shape.in_channels_student;
  p.source[0] = grad_y_base;
  p.source[1] = grad_y_student;
  p.out[0] = grad_x_base;
  p.out[1] = grad_x_student;
  p.weight = weight.data;
  p.weight_stride_reduce = weight.stride[0];
  p.weight_stride_out = weight.stride[1];
  p.weight_stride_h = weight.stride[2];
  p.weight_stride_w = weight.stride[3];
  p.bias = nullptr;
  return detail::launch_conv_gemm<T>(p, stream);
}

#define ANFAST_INSTANTIATE(T)                                                                  \
  template cudaError_t adjoined_conv2d_forward<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d, \
                                                  Tensor4d, const T*, Tensor4d, Tensor4d,       \
                                                  cudaStream_t);                                \
  template cudaError_t adjoined_conv2d_dgrad<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,   \
                                                Tensor4d, Tensor4d, Tensor4d, cudaStream_t);
ANFAST_INSTANTIATE(float)
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
