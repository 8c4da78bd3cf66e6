// Building blocks shared by the fused kernels: tile sizes, shared-memory tiles,
// dtype conversion and the 64x64 tile product (tensor cores or fp32 FMA).
#pragma once

#include <cstdint>

#include <mma.h>

#include "adjoined_conv.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "anfast kernels need sm_80 or newer (bf16 WMMA); build for CUDA architectures 80;90"
#endif

namespace anfast {
namespace detail {

// One block computes a kBlockM x kBlockN output tile, kBlockK reduction elements per
// step, with 4 warps. 64x64 keeps two fp32 accumulator sets (base + student) in
// registers; kBlockK = 32 gives two 16-deep WMMA steps per shared-memory round.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;
// Row padding keeps every WMMA pointer 32-byte aligned (WMMA requires it) and moves
// consecutive rows to different shared-memory banks.
constexpr int kPadAB = 8;
constexpr int kPadC = 4;
constexpr int kLdA = kBlockK + kPadAB;
constexpr int kLdB = kBlockN + kPadAB;
constexpr int kLdC = kBlockN + kPadC;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Row m of an implicit-GEMM tile over a batch x rows x cols grid, as (batch, y, x);
// batch is -1 for rows past m_total, so loads of those rows are masked.
__device__ __forceinline__ void decode_row(int64_t m, int64_t m_total, int rows, int cols,
                                           int& batch, int& y, int& x) {
  batch = -1;
  y = x = 0;
  if (m < m_total) {
    x = static_cast<int>(m % cols);
    y = static_cast<int>((m / cols) % rows);
    batch = static_cast<int>(m / (static_cast<int64_t>(cols) * rows));
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ int64_t offset4d(const Tensor4d& t, int64_t i0, int64_t i1, int64_t i2,
                                            int64_t i3) {
  return i0 * t.stride[0] + i1 * t.stride[1] + i2 * t.stride[2] + i3 * t.stride[3];
}

// Operand tiles live only during the main loop and the fp32 output tile only in the
// epilogue, so they share the same bytes (fp32 operands would not fit 48 KB otherwise).
template <typename T>
union SharedTiles {
  struct {
    T a[2][kBlockM][kLdA];  // [base, student] left operands
    T b[2][kBlockK][kLdB];  // [base, student] right operands (fprop / dgrad use b[0])
  } operands;
  float c[kBlockM][kLdC];
};

// Shared memory is raw bytes reinterpreted as SharedTiles: __half / bf16 members would
// otherwise need constructors, which __shared__ variables cannot run.
#define ANFAST_SHARED_TILES(T, name)                                          \
  __shared__ __align__(128) unsigned char name##_bytes[sizeof(SharedTiles<T>)]; \
  SharedTiles<T>& name = *reinterpret_cast<SharedTiles<T>*>(name##_bytes)

// acc += a (kBlockM x kBlockK) @ b (kBlockK x kBlockN), both in shared memory.
// 16-bit inputs: tensor cores through WMMA, each warp owns a 32x32 quarter as 2x2
// fragments of 16x16x16.
template <typename T>
struct TileMma {
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  FragC acc[2][2];

  __device__ __forceinline__ int warp_row() const { return (threadIdx.x / 32) / 2 * 32; }
  __device__ __forceinline__ int warp_col() const { return (threadIdx.x / 32) % 2 * 32; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }

  __device__ __forceinline__ void mma(const T (*a)[kLdA], const T (*b)[kLdB]) {
    const int row0 = warp_row(), col0 = warp_col();
#pragma unroll
    for (int k = 0; k < kBlockK; k += 16) {
      FragA frag_a[2];
      FragB frag_b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(frag_a[i], &a[row0 + 16 * i][k], kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(frag_b[j], &b[k][col0 + 16 * j], kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], frag_a[i], frag_b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float (*c)[kLdC]) const {
    const int row0 = warp_row(), col0 = warp_col();
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&c[row0 + 16 * i][col0 + 16 * j], acc[i][j], kLdC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// fp32 inputs: plain FMA (no TF32), so fp32 results stay within 1e-5 of float64.
// Thread t owns rows t/16 + 8i and columns t%16 + 16j: a warp reads two A rows
// (broadcast) and 16 consecutive B columns (no bank conflict).
template <>
struct TileMma<float> {
  float acc[8][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }

  __device__ __forceinline__ void mma(const float (*a)[kLdA], const float (*b)[kLdB]) {
    const int row = threadIdx.x / 16, col = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < kBlockK; ++k) {
      float a_k[8], b_k[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a_k[i] = a[row + 8 * i][k];
#pragma unroll
      for (int j = 0; j < 4; ++j) b_k[j] = b[k][col + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a_k[i], b_k[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float (*c)[kLdC]) const {
    const int row = threadIdx.x / 16, col = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[row + 8 * i][col + 16 * j] = acc[i][j];
  }
};

static_assert(kThreads == 128 && kBlockM == 64 && kBlockN == 64,
              "TileMma's warp and thread layouts assume 4 warps on a 64x64 tile");
static_assert(kBlockK % 16 == 0, "WMMA steps are 16 deep");

// Input row touched by output row `out` through kernel tap `tap`, or -1 when the tap
// falls into padding. Forward: in = out * stride - pad + tap. Transposed (dgrad,
// mapping an input row back to the output row that read it): out' = (out + pad - tap)
// / stride, only where that division is exact.
__device__ __forceinline__ int tap_source(int out, int tap, int stride, int pad, int extent,
                                          bool transposed) {
  int source;
  if (transposed) {
    const int shifted = out + pad - tap;
    if (shifted < 0 || shifted % stride != 0) return -1;
    source = shifted / stride;
  } else {
    source = out * stride - pad + tap;
  }
  return (source >= 0 && source < extent) ? source : -1;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace detail
}  // namespace anfast
