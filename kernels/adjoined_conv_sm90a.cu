// Hopper-native adjoined convolution (sm_90a only): CUTLASS 3's implicit-GEMM conv
// collectives, TMA im2col loads of the activation, TMA tiled loads of the other operand
// and warp-specialized wgmma mainloops, for the forward, the weight gradient and the
// stride-1 data gradient.
//
// Base and student are two launches per phase on one stream. CUTLASS 3's ConvUniversal
// runs one problem per launch, and fusing the two into one persistent grid can gain at
// most about 4% (issue 24: they share only the weight slice). The student reads the
// leading block W[:c_out, :c_in] in place (forward, dgrad): ConvProblemShape takes the
// filter's strides, and TMA only asks that the channel stride be 1 and the others 16-byte
// multiples. wgrad's problem must describe a packed dW (CUTLASS's can_implement checks
// it), but its epilogue takes any 16-byte strides: the student's launch adds its dW into
// the leading block of the base's result (beta = 1, one fp32 sum per element), no scratch.
//
// Compiled only with -gencode arch=compute_90a,code=sm_90a (setup.py, CMakeLists.txt):
// wgmma and the TMA im2col mode exist on no other architecture.

// CuTe's device asserts are calls: left in, ptxas serializes every wgmma across them
// (warning C7510). Release builds define NDEBUG; this file needs it in every build.
#ifndef NDEBUG
#define NDEBUG
#endif

#include <type_traits>

#include "adjoined_conv_sm90a.h"
#include "cutlass_element.cuh"

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

using cutlass::conv::Operator;

// One traits struct per kernel: element type, tile and cluster, and the CUTLASS 3
// types the builders derive from them (mainloop stages fill the shared memory the
// epilogue leaves).
template <typename T, Operator Op>
struct Sm90aConv {
  using Element = typename CutlassElement<T>::type;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  // GEMM modes (CUTLASS's conv/detail.hpp): fprop M = output positions, N = output
  // channels, K = (input channel, tap); dgrad M = input positions, N = input channels,
  // K = (output channel, tap); wgrad M = output channels, N = (input channel, tap),
  // K = output positions. 128 x 128 x 64 per CTA each; wgrad tiles N's channel sub-mode.
  using TileShape = std::conditional_t<Op == Operator::kWgrad,
                                       cute::Shape<cute::_128, cute::Shape<cute::_128>, cute::Shape<cute::_64>>,
                                       cute::Shape<cute::_128, cute::_128, cute::Shape<cute::_64>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  // The epilogue writes an activation NHWC (fprop's y, dgrad's dx) or the filter KRSC
  // (wgrad's dW), which CUTLASS tags by its GEMM modes (K, (C, S, R)).
  using OutputLayout =
      std::conditional_t<Op == Operator::kWgrad, cutlass::layout::TensorKCSR, cutlass::layout::TensorNHWC>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, OutputLayout, kAlignment, Element,
      OutputLayout, kAlignment, cutlass::epilogue::TmaWarpSpecialized>::CollectiveOp;

  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Op, Element, cutlass::layout::TensorNHWC, kAlignment,
      Element, cutlass::layout::TensorNHWC, kAlignment, float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<Op, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Device = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  using StrideOutput = typename Kernel::StrideD;
};

// One network's problem as CUTLASS 3 names every operator: by its forward convolution,
// the activation x [N, H, W, in_c] (fprop's and wgrad's input, dgrad's output) and the
// filter [out_c, kh, kw, in_c], each with its strides (Tensor4d's (N, C, H, W) order);
// the output-gradient / output tensor between them is packed.
template <Operator Op>
cutlass::conv::ConvProblemShape<Op, 2> problem_shape(const AdjoinedConvShape& s, int in_c, int out_c,
                                                     const Tensor4d& activation, const Tensor4d& filter) {
  return {cutlass::conv::Mode::kCrossCorrelation,
          {s.batch, s.height, s.width, in_c},
          {activation.stride[0], activation.stride[2], activation.stride[3], 1},
          {out_c, s.kernel_h, s.kernel_w, in_c},
          {filter.stride[0], filter.stride[2], filter.stride[3], 1},
          {s.pad_h, s.pad_w},
          {s.pad_h, s.pad_w},
          {s.stride_h, s.stride_w},
          {1, 1},
          1};
}

// The strides of a packed KRSC filter of in_c channels (wgrad's problem must name one).
Tensor4d packed_filter(const AdjoinedConvShape& s, int in_c) {
  const int64_t tap = in_c;
  return {nullptr, {s.kernel_h * s.kernel_w * tap, 1, s.kernel_w * tap, tap}};
}

// The epilogue's view of an activation output, ((w, h, n), c): its strides from the problem's.
template <typename Conv>
typename Conv::StrideOutput activation_output_strides(const typename Conv::ProblemShape& problem) {
  typename Conv::StrideOutput strides{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Conv::StrideOutput{})>{}, [&](auto i) {
    cute::get<0, i>(strides) = problem.stride_C[Conv::ProblemShape::RankT - 2 - i];
  });
  return strides;
}

// The epilogue's view of dW, (k, (c, s, r)), from the tensor's own strides.
template <typename Conv>
typename Conv::StrideOutput filter_output_strides(const Tensor4d& filter) {
  typename Conv::StrideOutput strides{};
  cute::get<0>(strides) = filter.stride[0];
  cute::get<1, 1>(strides) = filter.stride[3];
  cute::get<1, 2>(strides) = filter.stride[2];
  return strides;
}

// One launch: out = A (*) B + beta * out, with CUTLASS's operand order (fprop: x, W;
// dgrad: dy, W; wgrad: dy, x).
template <typename Conv>
cudaError_t run(const typename Conv::ProblemShape& problem, const void* a, const void* b, void* out,
                typename Conv::StrideOutput out_strides, float beta, cudaStream_t stream) {
  using Element = typename Conv::Element;
  auto* out_data = reinterpret_cast<Element*>(out);
  typename Conv::Device::Arguments args{
      problem,
      {reinterpret_cast<const Element*>(a), reinterpret_cast<const Element*>(b)},
      // With beta = 0, C is never read; it names the output so that its TMA descriptor is valid.
      {{1.0f, beta}, out_data, out_strides, out_data, out_strides}};

  typename Conv::Device conv;
  if (conv.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  // The TMA warp-specialized schedules without split-K or stream-K need no workspace.
  if (Conv::Device::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
  if (conv.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (conv.run(stream) != cutlass::Status::kSuccess) return cudaErrorLaunchFailure;
  return cudaGetLastError();
}

template <typename T>
KernelResources resources_of() {
  using Kernel = typename T::Kernel;
  using Tile = typename T::TileShape;
  return {cute::size<0>(Tile{}), cute::size<1>(Tile{}), cute::size<2>(Tile{}),
          static_cast<int>(Kernel::MaxThreadsPerBlock), static_cast<int>(Kernel::SharedStorageSize)};
}

}  // namespace
}  // namespace detail

template <typename T>
const char* adjoined_conv2d_sm90a_shape_error(const AdjoinedConvShape& s, ConvKernel phase, bool has_bias) {
  if (const char* error = adjoined_conv2d_shape_error<T>(s)) return error;
  // The 16-byte rule of TMA: the 2.x check above already asks for channels in multiples
  // of 8 (16-bit), which is also what the im2col descriptor needs.
  // TMA im2col's corners are 8-bit signed per spatial dimension in 2-D.
  if (s.pad_h > 127 || s.pad_w > 127) return "TMA im2col takes padding up to 127";
  switch (phase) {
    case ConvKernel::kForward:
      if (has_bias) return "the sm_90a forward takes no bias (ResNet's convs have none): the 2.x tiles run it";
      return nullptr;
    case ConvKernel::kDgrad:
      // CUTLASS 3's sm90 collective hands the stride to TMA im2col as the forward's, and
      // no upstream test covers a strided dgrad.
      if (s.stride_h != 1 || s.stride_w != 1)
        return "the sm_90a dgrad takes stride 1 only (CUTLASS 3 tests no strided dgrad): the 2.x strided dgrad "
               "runs it";
      return nullptr;
    case ConvKernel::kWgrad:
      return nullptr;
    default:
      return "the sm_90a kernels have no strided-dgrad kernel: the 2.x strided dgrad runs it";
  }
}

template <typename T>
cudaError_t adjoined_conv2d_forward_sm90a(const AdjoinedConvShape& shape, Tensor4d x_base, Tensor4d x_student,
                                          Tensor4d weight, Tensor4d y_base, Tensor4d y_student,
                                          cudaStream_t stream) {
  using Conv = detail::Sm90aConv<T, cutlass::conv::Operator::kFprop>;
  const Tensor4d inputs[2] = {x_base, x_student}, outputs[2] = {y_base, y_student};
  if (adjoined_conv2d_sm90a_shape_error<T>(shape, ConvKernel::kForward, false) != nullptr ||
      !detail::layouts_ok(shape, &weight, inputs, outputs, true))
    return cudaErrorInvalidValue;
  if (shape.batch == 0) return cudaSuccess;
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  for (int net = 0; net < 2; ++net) {
    const auto problem = detail::problem_shape<cutlass::conv::Operator::kFprop>(shape, in_c[net], out_c[net],
                                                                                inputs[net], weight);
    const cudaError_t status = detail::run<Conv>(problem, inputs[net].data, weight.data, outputs[net].data,
                                                 detail::activation_output_strides<Conv>(problem), 0.0f, stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t adjoined_conv2d_dgrad_sm90a(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                        Tensor4d grad_y_student, Tensor4d weight, Tensor4d grad_x_base,
                                        Tensor4d grad_x_student, cudaStream_t stream) {
  using Conv = detail::Sm90aConv<T, cutlass::conv::Operator::kDgrad>;
  const Tensor4d grad_y[2] = {grad_y_base, grad_y_student}, grad_x[2] = {grad_x_base, grad_x_student};
  if (adjoined_conv2d_sm90a_shape_error<T>(shape, ConvKernel::kDgrad, false) != nullptr ||
      !detail::layouts_ok(shape, &weight, grad_y, grad_x, false))
    return cudaErrorInvalidValue;
  if (shape.batch == 0) return cudaSuccess;
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  for (int net = 0; net < 2; ++net) {
    const auto problem = detail::problem_shape<cutlass::conv::Operator::kDgrad>(shape, in_c[net], out_c[net],
                                                                                grad_x[net], weight);
    const cudaError_t status = detail::run<Conv>(problem, grad_y[net].data, weight.data, grad_x[net].data,
                                                 detail::activation_output_strides<Conv>(problem), 0.0f, stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t adjoined_conv2d_wgrad_sm90a(const AdjoinedConvShape& shape, Tensor4d grad_y_base,
                                        Tensor4d grad_y_student, Tensor4d x_base, Tensor4d x_student,
                                        Tensor4d grad_weight, cudaStream_t stream) {
  using Conv = detail::Sm90aConv<T, cutlass::conv::Operator::kWgrad>;
  const Tensor4d grad_y[2] = {grad_y_base, grad_y_student}, x[2] = {x_base, x_student};
  if (adjoined_conv2d_sm90a_shape_error<T>(shape, ConvKernel::kWgrad, false) != nullptr ||
      !detail::layouts_ok(shape, &grad_weight, x, grad_y, true))  // dW: packed KRSC, as the weight
    return cudaErrorInvalidValue;
  if (shape.batch == 0) {  // an empty reduction; zero bits are 0.0 in both 16-bit types
    const size_t bytes = sizeof(T) * shape.out_channels * shape.kernel_h * shape.kernel_w * shape.in_channels;
    return cudaMemsetAsync(grad_weight.data, 0, bytes, stream);
  }
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  for (int net = 0; net < 2; ++net) {
    const auto problem = detail::problem_shape<cutlass::conv::Operator::kWgrad>(
        shape, in_c[net], out_c[net], x[net], detail::packed_filter(shape, in_c[net]));
    // The student's epilogue reads and writes dW[:c_out, :c_in] through the full dW's strides.
    const cudaError_t status =
        detail::run<Conv>(problem, grad_y[net].data, x[net].data, grad_weight.data,
                          detail::filter_output_strides<Conv>(grad_weight), net == 0 ? 0.0f : 1.0f, stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

template <typename T>
KernelResources adjoined_conv2d_sm90a_kernel_resources(ConvKernel kernel) {
  switch (kernel) {
    case ConvKernel::kForward: return detail::resources_of<detail::Sm90aConv<T, cutlass::conv::Operator::kFprop>>();
    case ConvKernel::kDgrad: return detail::resources_of<detail::Sm90aConv<T, cutlass::conv::Operator::kDgrad>>();
    case ConvKernel::kWgrad: return detail::resources_of<detail::Sm90aConv<T, cutlass::conv::Operator::kWgrad>>();
    default: return {};
  }
}

#define ANFAST_INSTANTIATE(T)                                                                             \
  template const char* adjoined_conv2d_sm90a_shape_error<T>(const AdjoinedConvShape&, ConvKernel, bool);  \
  template cudaError_t adjoined_conv2d_forward_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,     \
                                                        Tensor4d, Tensor4d, Tensor4d, cudaStream_t);      \
  template cudaError_t adjoined_conv2d_dgrad_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,       \
                                                      Tensor4d, Tensor4d, Tensor4d, cudaStream_t);        \
  template cudaError_t adjoined_conv2d_wgrad_sm90a<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d,       \
                                                      Tensor4d, Tensor4d, Tensor4d, cudaStream_t);        \
  template KernelResources adjoined_conv2d_sm90a_kernel_resources<T>(ConvKernel);
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
