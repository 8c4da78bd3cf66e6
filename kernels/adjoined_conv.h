// Public host API of the fused adjoined convolution kernels (DESIGN.md section 4).
//
// One shared weight W[C_out, C_in, kh, kw]; the base convolves x_base with all of W,
// the student convolves x_student (the base's leading in_channels_student channels)
// with the leading block W[:out_channels_student, :in_channels_student]. Every
// launcher below computes base and student in ONE kernel launch.
//
// Plain CUDA runtime C++: no torch headers, so the kernels can be used elsewhere
// (the CMake build links them into a standalone test and benchmark).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace anfast {

// A 4-D tensor in logical (N, C, H, W) order, strides in elements. The kernels read
// and write activations NHWC with packed rows (PyTorch's channels_last contiguous:
// stride = {H*W*C, 1, W*C, C}) and the weight KRSC (channels_last of (C_out, C_in, kh,
// kw)); the wgrad output alone may have any strides.
struct Tensor4d {
  void* data;
  int64_t stride[4];
};

// Channel counts must be multiples of this (16-byte cp.async of 16-bit types);
// callers zero-pad channels to it (anfast._C does).
template <typename T>
constexpr int adjoined_conv2d_channel_alignment() {
  return sizeof(T) == 2 ? 8 : 1;
}

struct AdjoinedConvShape {
  int batch;
  int in_channels;           // C_in of the base
  int in_channels_student;   // c_in <= C_in: the student reads channels [0, c_in)
  int height, width;         // input spatial size, shared by base and student
  int out_channels;          // C_out of the base
  int out_channels_student;  // 1 <= c_out <= C_out: the student's leading filters
  int kernel_h, kernel_w;    // 1, 3, 5 or 7
  int stride_h, stride_w;
  int pad_h, pad_w;

  int out_height() const { return (height + 2 * pad_h - kernel_h) / stride_h + 1; }
  int out_width() const { return (width + 2 * pad_w - kernel_w) / stride_w + 1; }
};

// Which kernels a launcher runs: one of the element type's tile shapes, and whether
// wgrad may split its reduction. The best choice depends on the problem (a 64-channel
// conv fills half of a 128-wide tile with zeros), so anfast's tuner times every
// variant per problem and passes the fastest; the default is the largest tile, split.
struct KernelVariant {
  int tiles = 0;            // index of a tile shape: 0 <= tiles < adjoined_conv2d_tile_count<T>()
  bool split_wgrad = true;  // split wgrad's reduction when its dW tiles underfill the GPU
};

// How many tile shapes element type T has (3 for 16-bit types, 1 for fp32).
template <typename T>
int adjoined_conv2d_tile_count();

// The forward / dgrad threadblock tile of shape `tiles` as "MxNxK" (wgrad's dW tile is
// N output channels x 64 columns); an empty string for an index T does not have.
template <typename T>
const char* adjoined_conv2d_tile_name(int tiles);

// What one kernel of a tile shape asks of an SM, for the static kernel report
// (benchmarks/kernel_report.py): its threadblock tile, threads per block and dynamic
// shared memory (the mainloop's stages or the epilogue's staging, whichever is larger).
enum class ConvKernel : int { kForward, kDgrad, kDgradStrided, kWgrad };
struct KernelResources {
  int tile_m, tile_n, tile_k;
  int threads;
  int shared_bytes;
};
template <typename T>
KernelResources adjoined_conv2d_kernel_resources(int tiles, ConvKernel kernel);

// Why a shape cannot run with element type T, or nullptr when it can. The launchers
// return cudaErrorInvalidValue for such shapes; hosts call this first to say why.
template <typename T>
const char* adjoined_conv2d_shape_error(const AdjoinedConvShape& shape);

// wgrad sums the student's rows into the base's dW tiles, so a student tile must
// cover the same (tap, channel) columns as its base tile: x_student must then have
// this many channels (>= in_channels_student, zero past it), and wgrad takes a
// shape whose in_channels_student is this number.
int adjoined_conv2d_wgrad_student_channels(const AdjoinedConvShape& shape);

// Bytes of fp32 scratch that wgrad needs on the current device (the split-reduction
// partial sums) with `variant`.
template <typename T>
size_t adjoined_conv2d_wgrad_workspace_bytes(const AdjoinedConvShape& shape, KernelVariant variant = {});

// y_base = conv(x_base, W) + bias; y_student = conv(x_student, W_s) + bias[:c_out].
// bias may be nullptr. T is float (SIMT FMA), __half or __nv_bfloat16 (tensor cores);
// accumulation is fp32 throughout.
template <typename T>
cudaError_t adjoined_conv2d_forward(const AdjoinedConvShape& shape, Tensor4d x_base,
                                    Tensor4d x_student, Tensor4d weight, const T* bias,
                                    Tensor4d y_base, Tensor4d y_student, cudaStream_t stream,
                                    KernelVariant variant = {});

// grad_x_base = dgrad(grad_y_base, W); grad_x_student = dgrad(grad_y_student, W_s).
template <typename T>
cudaError_t adjoined_conv2d_dgrad(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                  Tensor4d grad_y_student, Tensor4d weight,
                                  Tensor4d grad_x_base, Tensor4d grad_x_student,
                                  cudaStream_t stream, KernelVariant variant = {});

// grad_weight = wgrad(grad_y_base, x_base), plus the student's wgrad added into the
// leading block, summed in one fp32 accumulator per tile (no second tensor, no atomics).
// The reduction over batch x positions is split when the dW tiles underfill the GPU;
// the slices are summed in a fixed order (deterministic). workspace: at least
// adjoined_conv2d_wgrad_workspace_bytes<T>(shape, variant) bytes on the device.
template <typename T>
cudaError_t adjoined_conv2d_wgrad(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                  Tensor4d grad_y_student, Tensor4d x_base, Tensor4d x_student,
                                  Tensor4d grad_weight, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream, KernelVariant variant = {});

#define ANFAST_DECLARE_ADJOINED_CONV(T)                                                        \
  extern template cudaError_t adjoined_conv2d_forward<T>(                                      \
      const AdjoinedConvShape&, Tensor4d, Tensor4d, Tensor4d, const T*, Tensor4d, Tensor4d,    \
      cudaStream_t, KernelVariant);                                                            \
  extern template cudaError_t adjoined_conv2d_dgrad<T>(const AdjoinedConvShape&, Tensor4d,     \
                                                       Tensor4d, Tensor4d, Tensor4d,           \
                                                       Tensor4d, cudaStream_t, KernelVariant); \
  extern template cudaError_t adjoined_conv2d_wgrad<T>(                                        \
      const AdjoinedConvShape&, Tensor4d, Tensor4d, Tensor4d, Tensor4d, Tensor4d, void*,       \
      size_t, cudaStream_t, KernelVariant);                                                    \
  extern template size_t adjoined_conv2d_wgrad_workspace_bytes<T>(const AdjoinedConvShape&,    \
                                                                  KernelVariant);              \
  extern template int adjoined_conv2d_tile_count<T>();                                         \
  extern template const char* adjoined_conv2d_tile_name<T>(int);                               \
  extern template KernelResources adjoined_conv2d_kernel_resources<T>(int, ConvKernel);        \
  extern template const char* adjoined_conv2d_shape_error<T>(const AdjoinedConvShape&);
ANFAST_DECLARE_ADJOINED_CONV(float)
ANFAST_DECLARE_ADJOINED_CONV(__half)
ANFAST_DECLARE_ADJOINED_CONV(__nv_bfloat16)
#undef ANFAST_DECLARE_ADJOINED_CONV

}  // namespace anfast
