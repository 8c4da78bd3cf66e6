// Hopper-native forward of the adjoined convolution (sm_90a only): CUTLASS 3's
// implicit-GEMM conv collectives, TMA im2col loads of the activation, TMA tiled
// loads of the weight and warp-specialized wgmma mainloops.
//
// Base and student are two launches on one stream. CUTLASS 3's ConvUniversal runs one
// problem per launch, and fusing the two into one persistent grid can gain at most
// about 4% (issue 24: they share only the weight slice). The student reads the leading
// block W[:c_out, :c_in] in place: ConvProblemShape takes the filter's strides, and
// TMA only asks that the channel stride be 1 and the others 16-byte multiples.
//
// Compiled only with -gencode arch=compute_90a,code=sm_90a (setup.py, CMakeLists.txt):
// wgmma and the TMA im2col mode exist on no other architecture.

// CuTe's device asserts are calls: left in, ptxas serializes every wgmma across them
// (warning C7510). Release builds define NDEBUG; this file needs it in every build.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "adjoined_conv_sm90a.h"

#include "cute/tensor.hpp"
// Before the conv collectives: CUTLASS 4.2's sm100 collective names KernelHardwareInfo
// without including it.
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/numeric_types.h"

namespace anfast {
namespace detail {
namespace {

template <typename T>
struct Sm90aElement;
template <>
struct Sm90aElement<__half> {
  using type = cutlass::half_t;
};
template <>
struct Sm90aElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};

// One traits struct per kernel: element type, tile and cluster, and the CUTLASS 3
// types the builders derive from them (mainloop stages fill the shared memory the
// epilogue leaves).
template <typename T, cutlass::conv::Operator Op>
struct Sm90aConv {
  using Element = typename Sm90aElement<T>::type;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, cutlass::layout::TensorNHWC,
      kAlignment, Element, cutlass::layout::TensorNHWC, kAlignment,
      cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;

  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Op, Element, cutlass::layout::TensorNHWC, kAlignment,
      Element, cutlass::layout::TensorNHWC, kAlignment, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<Op, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Device = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <typename T>
using Sm90aFprop = Sm90aConv<T, cutlass::conv::Operator::kFprop>;

// One network's fprop: activation x[N, H, W, in_c] (packed NHWC), the weight's leading
// block [out_c, kh, kw, in_c] read through the full weight's strides, output y packed.
template <typename T>
cudaError_t run_fprop(const AdjoinedConvShape& s, int in_c, int out_c, const Tensor4d& x, const Tensor4d& weight,
                      const Tensor4d& y, cudaStream_t stream) {
  using Conv = Sm90aFprop<T>;
  using Element = typename Conv::Element;
  using ProblemShape = typename Conv::ProblemShape;
  // Strides in [n, h, w, c] / [k, r, s, c] order, as ConvProblemShape reads them.
  const int64_t x_strides[4] = {x.stride[0], x.stride[2], x.stride[3], 1};
  const int64_t w_strides[4] = {weight.stride[0], weight.stride[2], weight.stride[3], 1};
  const ProblemShape problem(cutlass::conv::Mode::kCrossCorrelation, {s.batch, s.height, s.width, in_c},
                             {x_strides[0], x_strides[1], x_strides[2], x_strides[3]},
                             {out_c, s.kernel_h, s.kernel_w, in_c},
                             {w_strides[0], w_strides[1], w_strides[2], w_strides[3]}, {s.pad_h, s.pad_w},
                             {s.pad_h, s.pad_w}, {s.stride_h, s.stride_w}, {1, 1}, 1);

  // The epilogue sees the output as ((q, p, n), k): its strides from the problem's.
  typename Conv::Kernel::StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Conv::Kernel::StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = problem.stride_C[ProblemShape::RankT - 2 - i];
  });
  auto* y_data = reinterpret_cast<Element*>(y.data);
  typename Conv::Device::Arguments args{
      problem,
      {reinterpret_cast<const Element*>(x.data), reinterpret_cast<const Element*>(weight.data)},
      // beta = 0: C is never read; it names y so that its TMA descriptor is valid.
      {{1.0f, 0.0f}, y_data, stride_d, y_data, stride_d}};

  typename Conv::Device conv;
  if (conv.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // The TMA warp-specialized schedule without split-K or stream-K needs no workspace.
  if (Conv::Device::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
  if (conv.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (conv.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

template <typename T>
const char* adjoined_conv2d_sm90a_shape_error(const AdjoinedConvShape& s, bool has_bias) {
  if (const char* error = adjoined_conv2d_shape_error<T>(s)) return error;
  // The 16-byte rule of TMA: the 2.x check above already asks for channels in multiples
  // of 8 (16-bit), which is also what the im2col descriptor needs.
  if (has_bias) return "the sm_90a kernels take no bias (ResNet's convs have none): use the 2.x tiles";
  // TMA im2col's corners are 8-bit signed per spatial dimension in 2-D.
  if (s.pad_h > 127 || s.pad_w > 127) return "TMA im2col takes padding up to 127";
  return nullptr;
}

template <typename T>
cudaError_t adjoined_conv2d_forward_sm90a(const AdjoinedConvShape& shape, Tensor4d x_base, Tensor4d x_student,
                                          Tensor4d weight, Tensor4d y_base, Tensor4d y_student,
                                          cudaStream_t stream) {
  const Tensor4d inputs[2] = {x_base, x_student}, outputs[2] = {y_base, y_student};
  if (adjoined_conv2d_sm90a_shape_error<T>(shape, false) != nullptr ||
      !detail::layouts_ok(shape, &weight, inputs, outputs, true))
    return cudaErrorInvalidValue;
  if (shape.batch == 0) return cudaSuccess;
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  for (int net = 0; net < 2; ++net) {
    const cudaError_t status =
        detail::run_fprop<T>(shape, in_c[net], out_c[net], inputs[net], weight, outputs[net], stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <typename T>
KernelResources adjoined_conv2d_sm90a_kernel_resources(ConvKernel kernel) {
  if (kernel != ConvKernel::kForward) return {};
  using Kernel = typename detail::Sm90aFprop<T>::Kernel;
  using Tile = typename detail::Sm90aFprop<T>::TileShape;
  return {cute::size<0>(Tile{}), cute::size<1>(Tile{}), cute::size<2>(Tile{}),
          static_cast<int>(Kernel::MaxThreadsPerBlock), static_cast<int>(Kernel::SharedStorageSize)};
}

#define ANFAST_INSTANTIATE(T)                                                                         \
  template const char* adjoined_conv2d_sm90a_shape_error<T>(const AdjoinedConvShape&, bool);          \
  template cudaError_t adjoined_conv2d_forward_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d, \
                                                        Tensor4d, Tensor4d, Tensor4d, cudaStream_t);  \
  template KernelResources adjoined_conv2d_sm90a_kernel_resources<T>(ConvKernel);
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
