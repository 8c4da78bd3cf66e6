// The strided-dgrad epilogue's output iterator, with every row decode done by
// multiply-shift (cutlass::FastDivmod) instead of integer division.
//
// A strided-dgrad tile holds rows of ONE phase (start_h, start_w) of grad_x: row i of
// the phase is (n, p, q) = i over (N, p_phase, q_phase), stored at grad_x row
// n * H * W + (start_h + p * stride_h) * W + start_w + q * stride_w. CUTLASS's
// PredicatedTileIteratorStridedDgrad decodes that with four integer divisions per
// stored row; here the divisors of every phase are prepared on the host (Params), so
// the kernel only selects its phase's. Same interface as CUTLASS's iterator for the
// store path the epilogue uses (the strided dgrad has no source operand).
#pragma once

#include <cutlass/array.h>
#include <cutlass/conv/conv2d_problem_size.h>
#include <cutlass/fast_math.h>
#include <cutlass/layout/matrix.h>
#include <cutlass/matrix_coord.h>
#include <cutlass/tensor_ref.h>

namespace anfast {
namespace detail {

// Phases = stride_h * stride_w; adjoined_conv2d_shape_error keeps strides within this.
constexpr int kMaxStride = 4;
constexpr int kMaxPhases = kMaxStride * kMaxStride;

template <typename ThreadMap_, typename Element_>
class PhaseOutputIterator {
 public:
  using ThreadMap = ThreadMap_;
  using Shape = typename ThreadMap::Shape;
  using Element = Element_;
  using Layout = cutlass::layout::RowMajor;
  using TensorRef = cutlass::TensorRef<Element, Layout>;
  using ConstTensorRef = typename TensorRef::ConstTensorRef;
  using Index = typename Layout::Index;
  using LongIndex = typename Layout::LongIndex;
  using TensorCoord = cutlass::MatrixCoord;

  static int const kElementsPerAccess = ThreadMap::kElementsPerAccess;
  static int const kThreads = ThreadMap::kThreads;
  static int const kIterations = ThreadMap::Count::kTile;

  using Fragment = cutlass::Array<Element, ThreadMap::Iterations::kColumn * ThreadMap::Iterations::kRow *
                                               ThreadMap::Iterations::kGroup * ThreadMap::Iterations::kCluster *
                                               ThreadMap::kElementsPerAccess>;
  using AccessType = cutlass::AlignedArray<Element, ThreadMap::kElementsPerAccess>;

  struct Params {
    int64_t row_bytes = 0;  // bytes between consecutive grad_x rows (n, h, w)
    int height = 0, width = 0, stride_h = 1, stride_w = 1;
    cutlass::FastDivmod tiled_rows_per_filter;  // GEMM rows of one phase, whole tiles
    // Per phase (start_r * stride_w + start_s): first grad_x row / column, and the
    // phase's (p, q) extents as divisors.
    int start_h[kMaxPhases] = {}, start_w[kMaxPhases] = {};
    cutlass::FastDivmod phase_image[kMaxPhases], phase_cols[kMaxPhases];

    CUTLASS_HOST_DEVICE Params() {}

    CUTLASS_HOST_DEVICE Params(Layout const& layout, cutlass::conv::Conv2dProblemSize const& problem,
                               int threadblock_rows)
        : row_bytes(static_cast<int64_t>(layout.stride(0)) * static_cast<int64_t>(sizeof(Element))),
          height(problem.H),
          width(problem.W),
          stride_h(problem.stride_h),
          stride_w(problem.stride_w),
          tiled_rows_per_filter(cutlass::conv::strided_dgrad_tile_m_per_filter(problem, threadblock_rows) *
                                threadblock_rows) {
      const cutlass::FastDivmod divmod_h(problem.stride_h), divmod_w(problem.stride_w);
      for (int r = 0; r < problem.stride_h && r < kMaxStride; ++r) {
        for (int s = 0; s < problem.stride_w && s < kMaxStride; ++s) {
          const int phase = r * problem.stride_w + s;
          cutlass::conv::strided_dgrad_starting_coords(problem, divmod_h, divmod_w, r, s, start_h[phase],
                                                       start_w[phase]);
          const int rows = (problem.H - start_h[phase] + problem.stride_h - 1) / problem.stride_h;
          const int cols = (problem.W - start_w[phase] + problem.stride_w - 1) / problem.stride_w;
          // A phase past the image (start beyond H or W) never stores: any divisor >= 1 does.
          phase_image[phase] = cutlass::FastDivmod(rows > 0 && cols > 0 ? rows * cols : 1);
          phase_cols[phase] = cutlass::FastDivmod(cols > 0 ? cols : 1);
        }
      }
    }
  };

  struct Mask {
    static int const kCount = ThreadMap::Iterations::kColumn;
    bool predicates[kCount];
    CUTLASS_HOST_DEVICE Mask() { enable(); }
    CUTLASS_HOST_DEVICE void clear() {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCount; ++i) predicates[i] = false;
    }
    CUTLASS_DEVICE void enable() {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kCount; ++i) predicates[i] = true;
    }
  };

  CUTLASS_DEVICE
  PhaseOutputIterator(Params const& params, Element* pointer, TensorCoord extent, int thread_idx,
                      cutlass::FastDivmod const& /*stride_h_divmod*/, cutlass::FastDivmod const& /*stride_w_divmod*/,
                      int start_r, int start_s, TensorCoord threadblock_offset = TensorCoord())
      : params_(params) {
    const TensorCoord thread_offset = ThreadMap::initial_offset(thread_idx) + threadblock_offset;
    const int phase = start_r * params.stride_w + start_s;
    start_h_ = params.start_h[phase];
    start_w_ = params.start_w[phase];
    phase_image_ = params.phase_image[phase];
    phase_cols_ = params.phase_cols[phase];
    extent_row_ = extent.row();
    thread_start_row_ = thread_offset.row();
    thread_start_column_ = thread_offset.column();
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < ThreadMap::Iterations::kColumn; ++c)
      mask_.predicates[c] = thread_offset.column() + ThreadMap::Delta::kColumn * c < extent.column();
    if (!pointer) mask_.clear();
    byte_pointer_ = reinterpret_cast<uint8_t*>(pointer);
    state_[0] = state_[1] = state_[2] = 0;
  }

  CUTLASS_HOST_DEVICE void add_pointer_offset(LongIndex offset) {
    byte_pointer_ += offset * cutlass::sizeof_bits<Element>::value / 8;
  }

  CUTLASS_DEVICE void store(Fragment const& frag) {
    AccessType const* frag_ptr = reinterpret_cast<AccessType const*>(&frag);
    CUTLASS_PRAGMA_UNROLL
    for (int cluster = 0; cluster < ThreadMap::Iterations::kCluster; ++cluster) {
      CUTLASS_PRAGMA_UNROLL
      for (int group = 0; group < ThreadMap::Iterations::kGroup; ++group) {
        CUTLASS_PRAGMA_UNROLL
        for (int row = 0; row < ThreadMap::Iterations::kRow; ++row) {
          const int frag_row = row + ThreadMap::Iterations::kRow * (group + ThreadMap::Iterations::kGroup * cluster);
          const int row_offset =
              row * ThreadMap::Delta::kRow + group * ThreadMap::Delta::kGroup + cluster * ThreadMap::Delta::kCluster;
          int unused, phase_row, n, pq, p, q;
          params_.tiled_rows_per_filter(unused, phase_row, row_offset + thread_start_row_);
          phase_image_(n, pq, phase_row);
          phase_cols_(p, q, pq);
          const int mapped_row = n * (params_.height * params_.width) +
                                 (start_h_ + p * params_.stride_h) * params_.width + start_w_ + q * params_.stride_w;
          const bool row_guard = mapped_row < extent_row_;
          const int64_t row_byte_offset = mapped_row * params_.row_bytes;
          CUTLASS_PRAGMA_UNROLL
          for (int column = 0; column < ThreadMap::Iterations::kColumn; ++column) {
            const int64_t column_byte_offset = (thread_start_column_ + column * ThreadMap::Delta::kColumn) *
                                               (cutlass::sizeof_bits<Element>::value / 8);
            cutlass::arch::global_store<AccessType, sizeof(AccessType)>(
                frag_ptr[frag_row * ThreadMap::Iterations::kColumn + column],
                byte_pointer_ + row_byte_offset + column_byte_offset, row_guard && mask_.predicates[column]);
          }
        }
      }
    }
  }

  // The same walk over the tile's row iterations as CUTLASS's output iterators.
  CUTLASS_HOST_DEVICE PhaseOutputIterator& operator++() {
    ++state_[0];
    thread_start_row_ += ThreadMap::Shape::kRow;
    if (state_[0] == ThreadMap::Count::kRow) {
      state_[0] = 0;
      ++state_[1];
      thread_start_row_ += (ThreadMap::Shape::kGroup - 1) * ThreadMap::Shape::kRow * ThreadMap::Count::kRow;
      if (state_[1] == ThreadMap::Count::kGroup) {
        state_[1] = 0;
        ++state_[2];
        thread_start_row_ +=
            ThreadMap::Count::kGroup * ThreadMap::Shape::kGroup * ThreadMap::Count::kRow * ThreadMap::Shape::kRow;
        if (state_[2] == ThreadMap::Count::kCluster) state_[2] = 0;
      }
    }
    return *this;
  }

  CUTLASS_DEVICE void clear_mask() { mask_.clear(); }
  CUTLASS_DEVICE void enable_mask() { mask_.enable(); }

 private:
  Params const& params_;
  uint8_t* byte_pointer_;
  Mask mask_;
  Index extent_row_;
  int start_h_, start_w_;
  cutlass::FastDivmod phase_image_, phase_cols_;
  Index thread_start_row_, thread_start_column_;
  int state_[3];
};

}  // namespace detail
}  // namespace anfast
