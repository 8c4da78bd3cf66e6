// The fused kernels' building blocks, all from CUTLASS 2.x (the nvidia-cutlass
// package's headers): implicit-GEMM convolution mainloops (multistage cp.async,
// ldmatrix, mma.sync on tensor cores; SIMT FMA for fp32) and epilogues, run by
// kernels of ours that map each block to one tile of ONE problem, base or student
// (DESIGN.md section 4; docs/cuda.md says why these blocks and not CuTe atoms).
//
// Every activation is NHWC with packed (n, h, w) rows; the weight is KRSC (PyTorch's
// channels_last), and the student reads its leading block in place through the base
// weight's strides.
#pragma once

#include <cstdint>

#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/conv/kernel/default_conv2d_dgrad.h>
#include <cutlass/conv/kernel/default_conv2d_fprop.h>
#include <cutlass/conv/kernel/default_conv2d_wgrad.h>
#include <cutlass/conv/threadblock/threadblock_swizzle.h>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/fast_math.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>

#include "adjoined_conv.h"
#include "cutlass_element.cuh"
#include "phase_output_iterator.cuh"

namespace anfast {
namespace detail {

// 16-bit inputs: tensor cores (mma.sync 16x8x16), 4 warps of (kM / 2) x (kN / 2) on a
// kM x kN tile, 32-deep k steps in a 4-stage cp.async pipeline (128x128: 64 KB of
// shared memory). wgrad's dW tile is kN (output channels, fprop's n) x 64 (tap x input
// channels): 64 columns divide every ResNet channel count, so a student tile lines up
// with a base tile.
template <int kM, int kN>
struct TensorOpTiles {
  using OperatorClass = cutlass::arch::OpClassTensorOp;
  using Threadblock = cutlass::gemm::GemmShape<kM, kN, 32>;
  using Warp = cutlass::gemm::GemmShape<kM / 2, kN / 2, 32>;
  using WgradThreadblock = cutlass::gemm::GemmShape<kN, 64, 32>;
  using WgradWarp = cutlass::gemm::GemmShape<kN / 2, 32, 32>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kStages = 4;
  static constexpr int kAlignment = 8;  // 16-byte cp.async of 8 channels
  template <typename Element>
  static constexpr int kEpilogueVector = 128 / cutlass::sizeof_bits<Element>::value;
};

// fp32 inputs: SIMT FMA (no TF32, so fp32 stays within 1e-5 of float64), 4-byte
// cp.async so any channel count works.
struct SimtConfig {
  using OperatorClass = cutlass::arch::OpClassSimt;
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 8>;
  using Warp = cutlass::gemm::GemmShape<32, 64, 8>;
  using WgradThreadblock = cutlass::gemm::GemmShape<128, 64, 8>;
  using WgradWarp = cutlass::gemm::GemmShape<32, 64, 8>;
  using Instruction = cutlass::gemm::GemmShape<1, 1, 1>;
  static constexpr int kStages = 4;
  static constexpr int kAlignment = 1;
  template <typename Element>
  static constexpr int kEpilogueVector = 1;
};

// The tile shapes of KernelVariant::tiles (docs/cuda.md says why these). 16-bit:
// 128x128 for wide problems; 128x64 for 64 output channels (all of ResNet-50's layer1
// under the paper policy), which a 128-wide tile fills half with zeros; 64x64 for
// small problems, twice the blocks of 128x64 at fewer registers per thread. fp32 is
// the exact path (SIMT, never faster than cuDNN): one shape.
constexpr int kTensorOpTileCount = 3;

// Calls fn(Config{}) for tile shape `tiles` of element type T; false when T has none.
template <typename T, typename Fn>
bool with_tiles(int tiles, Fn&& fn) {
  if constexpr (sizeof(T) == 2) {
    switch (tiles) {
      case 0: fn(TensorOpTiles<128, 128>{}); return true;
      case 1: fn(TensorOpTiles<128, 64>{}); return true;
      case 2: fn(TensorOpTiles<64, 64>{}); return true;
      default: return false;
    }
  } else {
    if (tiles != 0) return false;
    fn(SimtConfig{});
    return true;
  }
}

// Every wgrad tile is 64 columns wide, so the student column rule is variant-free.
constexpr int kWgradTileN = 64;

// A CUTLASS epilogue E storing through PhaseOutputIterator (FastDivmod row decode).
template <typename E>
using PhaseEpilogue = cutlass::epilogue::threadblock::Epilogue<
    typename E::Shape, typename E::WarpMmaOperator, E::kPartitionsK,
    PhaseOutputIterator<typename E::OutputTileIterator::ThreadMap, typename E::OutputTileIterator::Element>,
    typename E::AccumulatorFragmentIterator, typename E::WarpTileIterator, typename E::SharedLoadIterator,
    typename E::OutputOp, typename E::Padding, E::kFragmentsPerIteration>;

// The three CUTLASS kernels per dtype and tile shape (Config): their mainloops and
// epilogues are what the fused kernels below run. wgrad writes fp32 partial sums (one
// slice per split of the reduction); a second kernel adds the slices in order and
// converts.
template <typename T, typename Config>
struct ConvKernels {
  static_assert(Config::WgradThreadblock::kN == kWgradTileN,
                "adjoined_conv2d_wgrad_student_channels assumes one wgrad tile width");
  using Element = typename CutlassElement<T>::type;
  using Layout = cutlass::layout::TensorNHWC;
  using OutputOp = cutlass::epilogue::thread::LinearCombination<
      Element, Config::template kEpilogueVector<Element>, float, float>;
  using WgradOutputOp =
      cutlass::epilogue::thread::LinearCombination<float, Config::template kEpilogueVector<float>, float, float>;
  using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>;

  using Fprop = typename cutlass::conv::kernel::DefaultConv2dFprop<
      Element, Layout, Element, Layout, Element, Layout, float, typename Config::OperatorClass,
      cutlass::arch::Sm80, typename Config::Threadblock, typename Config::Warp,
      typename Config::Instruction, OutputOp, Swizzle, Config::kStages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized, cutlass::conv::StrideSupport::kStrided,
      Config::kAlignment, Config::kAlignment>::Kernel;

  // Stride 1: a plain implicit GEMM over grad_y.
  using DgradUnit = typename cutlass::conv::kernel::DefaultConv2dDgrad<
      Element, Layout, Element, Layout, Element, Layout, float, typename Config::OperatorClass,
      cutlass::arch::Sm80, typename Config::Threadblock, typename Config::Warp,
      typename Config::Instruction, OutputOp, Swizzle, Config::kStages, cutlass::arch::OpMultiplyAdd,
      cutlass::conv::IteratorAlgorithm::kOptimized, cutlass::conv::StrideSupport::kUnity,
      Config::kAlignment, Config::kAlignment>::Kernel;

  // Stride > 1: phase decomposition. Each tile belongs to one of stride_h x stride_w
  // phases of grad_x, a dense problem over the taps that reach it; a phase no tap
  // reaches writes zeros without a mainloop. CUTLASS's strided-dgrad mainloop, with
  // an epilogue whose row decode is multiply-shift.
  using DgradStridedDefault = cutlass::conv::kernel::DefaultConv2dDgrad<
      Element, Layout, Element, Layout, Element, Layout, float, typename Config::OperatorClass,
      cutlass::arch::Sm80, typename Config::Threadblock, typename Config::Warp,
      typename Config::Instruction, OutputOp,
      cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>, Config::kStages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided, Config::kAlignment, Config::kAlignment>;
  using DgradStrided = cutlass::conv::kernel::ImplicitGemmConvolutionStridedDgrad<
      typename DgradStridedDefault::Mma, PhaseEpilogue<typename DgradStridedDefault::Epilogue>,
      cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>, cutlass::conv::Operator::kDgrad>;

  using Wgrad = typename cutlass::conv::kernel::DefaultConv2dWgrad<
      Element, Layout, Element, Layout, float, Layout, float, typename Config::OperatorClass,
      cutlass::arch::Sm80, typename Config::WgradThreadblock, typename Config::WgradWarp,
      typename Config::Instruction, WgradOutputOp, Swizzle, Config::kStages,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided, Config::kAlignment, Config::kAlignment>::Kernel;
};

// Base and student of one fused launch: blocks [0, tiles[0]) are base tiles, the rest
// student tiles, so the small student tiles fill the tail of the base's last wave.
// Tiles run m-fastest, so consecutive blocks share a weight tile in L2.
template <typename Kernel>
struct FusedParams {
  typename Kernel::Params problem[2];  // [base, student]
  cutlass::FastDivmod tiles_m[2];  // tile -> (m, n), m fastest
  int tiles[2];
};

// Block -> (problem, tile), by multiply-shift (cutlass::FastDivmod), no division.
template <typename Kernel>
__device__ __forceinline__ int fused_tile(const FusedParams<Kernel>& p, cutlass::gemm::GemmCoord& tile) {
  int index = blockIdx.x;
  const int which = index < p.tiles[0] ? 0 : 1;
  if (which == 1) index -= p.tiles[0];
  int n, m;
  p.tiles_m[which](n, m, index);
  tile = cutlass::gemm::GemmCoord(m, n, blockIdx.y);
  return which;
}

// Dynamic shared memory holding Kernel::SharedStorage: the mainloop's stages or the
// epilogue's staging tile (16-bit: 4 x 16 KB for fprop / dgrad, 4 x 12 KB for wgrad).
template <typename Kernel>
__device__ __forceinline__ typename Kernel::SharedStorage& shared_storage() {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  return *reinterpret_cast<typename Kernel::SharedStorage*>(dynamic_shared);
}

template <typename Kernel>
constexpr int shared_bytes() {
  return static_cast<int>(sizeof(typename Kernel::SharedStorage));
}

// One output tile of a fprop or stride-1 dgrad problem: CUTLASS's
// ImplicitGemmConvolution body for the tile we give it (no split of the reduction).
template <typename Kernel>
__device__ __forceinline__ void implicit_gemm_tile(const typename Kernel::Params& params,
                                                   cutlass::gemm::GemmCoord tile,
                                                   typename Kernel::SharedStorage& smem) {
  using Mma = typename Kernel::Mma;
  using Epilogue = typename Kernel::Epilogue;
  const int thread_idx = threadIdx.x;
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int lane_idx = threadIdx.x % 32;
  typename Mma::IteratorA iterator_A(params.iterator_A, params.problem_size, params.ptr_A, thread_idx,
                                     cutlass::MatrixCoord(tile.m() * Mma::Shape::kM, 0));
  typename Mma::IteratorB iterator_B(params.iterator_B, params.problem_size, params.ptr_B, thread_idx,
                                     cutlass::MatrixCoord(0, tile.n() * Mma::Shape::kN));
  Mma mma(smem.main_loop, thread_idx, warp_idx, lane_idx);
  typename Mma::FragmentC accumulators;
  accumulators.clear();
  mma(params.gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators,
      params.gemm_k_iterations_per_channel);

  const cutlass::MatrixCoord offset(tile.m() * Mma::Shape::kM, tile.n() * Mma::Shape::kN);
  const auto extent = Kernel::ConvOutputIteratorParameter::extent(params.problem_size);
  typename Epilogue::OutputTileIterator iterator_D(params.iterator_D, params.ptr_D, extent, thread_idx, offset);
  typename Epilogue::OutputTileIterator iterator_C(params.iterator_C, params.ptr_C, extent, thread_idx, offset);
  Epilogue epilogue(smem.epilogue, thread_idx, warp_idx, lane_idx);
  // Reads C (the broadcast bias) only where beta != 0.
  epilogue(typename Kernel::EpilogueOutputOp(params.output_op), iterator_D, accumulators, iterator_C);
}

// One output tile of a strided dgrad problem: CUTLASS's ImplicitGemmConvolutionStridedDgrad
// body. The tile's row block names its phase (start_r, start_s); the phase's taps are
// the dense reduction, and a phase that no tap reaches stores zeros.
template <typename Kernel>
__device__ __forceinline__ void strided_dgrad_tile(const typename Kernel::Params& params,
                                                   cutlass::gemm::GemmCoord tile,
                                                   typename Kernel::SharedStorage& smem) {
  using Mma = typename Kernel::Mma;
  using Epilogue = typename Kernel::Epilogue;
  const auto& problem = params.problem_size;
  const int thread_idx = threadIdx.x;
  // Phase of this tile: its first GEMM row over the rows of one phase (whole tiles).
  int filter_tile_m, row_in_phase;
  params.iterator_D.tiled_rows_per_filter(filter_tile_m, row_in_phase, tile.m() * Mma::Shape::kM);
  int start_r, start_s;
  params.stride_w_divmod(start_r, start_s, filter_tile_m);
  int start_h, start_w;
  cutlass::conv::strided_dgrad_starting_coords(problem, params.stride_h_divmod, params.stride_w_divmod,
                                               start_r, start_s, start_h, start_w);
  if (start_h >= problem.H || start_w >= problem.W) return;  // a phase with no grad_x row

  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int lane_idx = threadIdx.x % 32;
  typename Mma::FragmentC accumulators;
  accumulators.clear();
  if (start_r < problem.R && start_s < problem.S) {
    const int gemm_k_iterations = params.gemm_k_iterations / (problem.R * problem.S) *
                                  problem.num_gemm_k_filter_positions(start_r, start_s);
    typename Mma::IteratorA iterator_A(params.iterator_A, problem, params.ptr_A, thread_idx,
                                       params.stride_h_divmod, params.stride_w_divmod, start_r, start_s,
                                       cutlass::MatrixCoord(tile.m() * Mma::Shape::kM, 0));
    typename Mma::IteratorB iterator_B(params.iterator_B, problem, params.ptr_B, thread_idx, start_r, start_s,
                                       cutlass::MatrixCoord(0, tile.n() * Mma::Shape::kN));
    Mma mma(smem.main_loop, thread_idx, warp_idx, lane_idx);
    mma(gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators);
  }
  typename Epilogue::OutputTileIterator iterator_D(
      params.iterator_D, params.ptr_D, Kernel::ConvOutputIteratorParameter::extent(problem), thread_idx,
      params.stride_h_divmod, params.stride_w_divmod, start_r, start_s,
      cutlass::MatrixCoord(tile.m() * Mma::Shape::kM, tile.n() * Mma::Shape::kN));
  Epilogue epilogue(smem.epilogue, thread_idx, warp_idx, lane_idx);
  epilogue(typename Kernel::EpilogueOutputOp(params.output_op), iterator_D, accumulators);
}

// Forward or dgrad of base and student in ONE launch, each block one tile of one problem.
template <typename Kernel, bool kStridedDgrad>
__global__ void __launch_bounds__(Kernel::kThreadCount)
    fused_conv_kernel(const __grid_constant__ FusedParams<Kernel> p) {
  cutlass::gemm::GemmCoord tile;
  const int which = fused_tile(p, tile);
  if constexpr (kStridedDgrad) {
    strided_dgrad_tile<Kernel>(p.problem[which], tile, shared_storage<Kernel>());
  } else {
    implicit_gemm_tile<Kernel>(p.problem[which], tile, shared_storage<Kernel>());
  }
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// cutlass::TensorRef over a Tensor4d (logical N, C, H, W order) whose channels are contiguous.
template <typename Element>
cutlass::TensorRef<Element, cutlass::layout::TensorNHWC> nhwc_ref(const Tensor4d& t) {
  return {static_cast<Element*>(t.data),
          cutlass::layout::TensorNHWC(t.stride[3], t.stride[2], t.stride[0])};
}

// The problem of one network in CUTLASS's terms (input NHWC, filter KRSC).
inline cutlass::conv::Conv2dProblemSize problem_size(const AdjoinedConvShape& s, int in_channels,
                                                     int out_channels, int split_k_slices) {
  return cutlass::conv::Conv2dProblemSize(
      {s.batch, s.height, s.width, in_channels}, {out_channels, s.kernel_h, s.kernel_w, in_channels},
      {s.pad_h, s.pad_h, s.pad_w, s.pad_w}, {s.stride_h, s.stride_w}, {1, 1},
      cutlass::conv::Mode::kCrossCorrelation, split_k_slices);
}

// Whether inputs[2] / outputs[2] ([base, student]) and the weight (KRSC; nullptr: none)
// have the layouts the kernels read (see Tensor4d). input_is_x: inputs are x and
// outputs y (forward; wgrad's x and grad_y), else the reverse (dgrad).
bool layouts_ok(const AdjoinedConvShape& s, const Tensor4d* weight, const Tensor4d* inputs,
                const Tensor4d* outputs, bool input_is_x);

// Params of one fused launch from the two problems' CUTLASS arguments.
template <typename Kernel>
FusedParams<Kernel> fused_params(const typename Kernel::Arguments& base,
                                 const typename Kernel::Arguments& student) {
  FusedParams<Kernel> p;
  const typename Kernel::Arguments* args[2] = {&base, &student};
  for (int i = 0; i < 2; ++i) {
    p.problem[i] = typename Kernel::Params(*args[i]);
    p.tiles_m[i] = cutlass::FastDivmod(p.problem[i].grid_tiled_shape.m());
    p.tiles[i] = p.problem[i].grid_tiled_shape.m() * p.problem[i].grid_tiled_shape.n();
  }
  return p;
}

// Sets the dynamic shared-memory limit (needed above 48 KB) and launches.
template <typename Kernel, typename Params, typename Fn>
cudaError_t launch(Fn kernel, dim3 grid, const Params& params, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  const int bytes = shared_bytes<Kernel>();
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (status != cudaSuccess) return status;
  kernel<<<grid, Kernel::kThreadCount, bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace anfast
