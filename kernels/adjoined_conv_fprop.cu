// Forward of the adjoined convolution, base and student in one launch, and the
// shape / layout checks shared by the three operations.
//
// GEMM view per network: m = (batch, out_row, out_col), n = output channel,
// k = (tap_h, tap_w, input channel). The student's problem reads x_student and the
// leading block W[:c_out, :c_in] in place (the base weight's strides).
#include <string>

#include "cutlass_conv.cuh"

namespace anfast {

template <typename T>
const char* adjoined_conv2d_shape_error(const AdjoinedConvShape& s) {
  auto supported_kernel = [](int k) { return k == 1 || k == 3 || k == 5 || k == 7; };
  if (s.batch < 0 || s.height < 1 || s.width < 1) return "batch must be >= 0 and height, width >= 1";
  if (s.in_channels < 1 || s.out_channels < 1) return "in_channels and out_channels must be >= 1";
  if (s.in_channels_student < 1 || s.in_channels_student > s.in_channels)
    return "in_channels_student must be in [1, in_channels]";
  if (s.out_channels_student < 1 || s.out_channels_student > s.out_channels)
    return "out_channels_student must be in [1, out_channels]";
  constexpr int alignment = adjoined_conv2d_channel_alignment<T>();
  if (s.in_channels % alignment || s.in_channels_student % alignment || s.out_channels % alignment ||
      s.out_channels_student % alignment)
    return "16-bit kernels need every channel count to be a multiple of 8 (zero-pad the channels)";
  if (!supported_kernel(s.kernel_h) || !supported_kernel(s.kernel_w))
    return "kernel_h and kernel_w must be 1, 3, 5 or 7";
  if (s.stride_h < 1 || s.stride_w < 1 || s.stride_h > detail::kMaxStride || s.stride_w > detail::kMaxStride)
    return "stride must be in 1..4 (dgrad keeps the divisors of every stride phase)";
  if (s.pad_h < 0 || s.pad_w < 0) return "padding must be >= 0";
  if (s.out_height() < 1 || s.out_width() < 1)
    return "the output is empty: the padded input is smaller than the kernel";
  // CUTLASS's iterators keep 32-bit byte offsets within a tensor.
  const int64_t limit = (int64_t{1} << 31) / static_cast<int64_t>(sizeof(T));
  const int64_t positions = static_cast<int64_t>(s.batch) * s.height * s.width;
  const int64_t out_positions = static_cast<int64_t>(s.batch) * s.out_height() * s.out_width();
  if (positions * s.in_channels >= limit || out_positions * s.out_channels >= limit)
    return "an activation holds 2 GiB or more: split the batch";
  return nullptr;
}

namespace detail {
namespace {

// NHWC with packed rows: stride = {H*W*C, 1, W*C, C} in (N, C, H, W) order.
bool is_nhwc_packed(const Tensor4d& t, int channels, int height, int width) {
  return t.stride[0] == static_cast<int64_t>(height) * width * channels && t.stride[1] == 1 &&
         t.stride[2] == static_cast<int64_t>(width) * channels && t.stride[3] == channels;
}

}  // namespace

bool layouts_ok(const AdjoinedConvShape& s, const Tensor4d* weight, const Tensor4d* inputs,
                const Tensor4d* outputs, bool input_is_x) {
  const int x_c[2] = {s.in_channels, s.in_channels_student};
  const int y_c[2] = {s.out_channels, s.out_channels_student};
  for (int net = 0; net < 2; ++net) {
    const bool x_ok = is_nhwc_packed(input_is_x ? inputs[net] : outputs[net], x_c[net], s.height, s.width);
    const bool y_ok =
        is_nhwc_packed(input_is_x ? outputs[net] : inputs[net], y_c[net], s.out_height(), s.out_width());
    if (!x_ok || !y_ok) return false;
  }
  // KRSC: the student reads its leading block through these strides.
  return weight == nullptr || (weight->stride[1] == 1 && weight->stride[3] == s.in_channels &&
                               weight->stride[2] == static_cast<int64_t>(s.kernel_w) * s.in_channels &&
                               weight->stride[0] == static_cast<int64_t>(s.kernel_h) * s.kernel_w * s.in_channels);
}

}  // namespace detail

template <typename T>
int adjoined_conv2d_tile_count() {
  return sizeof(T) == 2 ? detail::kTensorOpTileCount : 1;
}

template <typename T>
const char* adjoined_conv2d_tile_name(int tiles) {
  const char* name = "";
  detail::with_tiles<T>(tiles, [&](auto config) {
    using Tile = typename decltype(config)::Threadblock;
    static const std::string text =
        std::to_string(Tile::kM) + "x" + std::to_string(Tile::kN) + "x" + std::to_string(Tile::kK);
    name = text.c_str();
  });
  return name;
}

namespace detail {

template <typename Kernel>
KernelResources resources_of() {
  using Tile = typename Kernel::Mma::Shape;
  return {Tile::kM, Tile::kN, Tile::kK, Kernel::kThreadCount, shared_bytes<Kernel>()};
}

}  // namespace detail

template <typename T>
KernelResources adjoined_conv2d_kernel_resources(int tiles, ConvKernel kernel) {
  KernelResources resources{};
  detail::with_tiles<T>(tiles, [&](auto config) {
    using Kernels = detail::ConvKernels<T, decltype(config)>;
    switch (kernel) {
      case ConvKernel::kForward: resources = detail::resources_of<typename Kernels::Fprop>(); break;
      case ConvKernel::kDgrad: resources = detail::resources_of<typename Kernels::DgradUnit>(); break;
      case ConvKernel::kDgradStrided: resources = detail::resources_of<typename Kernels::DgradStrided>(); break;
      case ConvKernel::kWgrad: resources = detail::resources_of<typename Kernels::Wgrad>(); break;
    }
  });
  return resources;
}

namespace detail {
namespace {

template <typename T, typename Config>
cudaError_t launch_forward(const AdjoinedConvShape& shape, const Tensor4d* inputs, const Tensor4d& weight,
                           const T* bias, const Tensor4d* outputs, cudaStream_t stream) {
  using Kernel = typename ConvKernels<T, Config>::Fprop;
  using Element = typename CutlassElement<T>::type;
  // bias as the epilogue's source C: a tensor whose n, h, w strides are 0.
  const cutlass::TensorRef<Element, cutlass::layout::TensorNHWC> bias_ref(
      const_cast<Element*>(reinterpret_cast<const Element*>(bias)), cutlass::layout::TensorNHWC(0, 0, 0));
  const float beta = bias != nullptr ? 1.0f : 0.0f;
  const int in_c[2] = {shape.in_channels, shape.in_channels_student};
  const int out_c[2] = {shape.out_channels, shape.out_channels_student};
  typename Kernel::Arguments args[2];
  for (int net = 0; net < 2; ++net) {
    args[net] = typename Kernel::Arguments(problem_size(shape, in_c[net], out_c[net], 1),
                                           nhwc_ref<Element>(inputs[net]), nhwc_ref<Element>(weight), bias_ref,
                                           nhwc_ref<Element>(outputs[net]), {1.0f, beta});
  }
  const auto params = fused_params<Kernel>(args[0], args[1]);
  return launch<Kernel>(fused_conv_kernel<Kernel, false>, dim3(params.tiles[0] + params.tiles[1]), params,
                        stream);
}

}  // namespace
}  // namespace detail

template <typename T>
cudaError_t adjoined_conv2d_forward(const AdjoinedConvShape& shape, Tensor4d x_base,
                                    Tensor4d x_student, Tensor4d weight, const T* bias,
                                    Tensor4d y_base, Tensor4d y_student, cudaStream_t stream,
                                    KernelVariant variant) {
  const Tensor4d inputs[2] = {x_base, x_student}, outputs[2] = {y_base, y_student};
  if (adjoined_conv2d_shape_error<T>(shape) != nullptr ||
      !detail::layouts_ok(shape, &weight, inputs, outputs, true))
    return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;  // stays so for a tile index T does not have
  detail::with_tiles<T>(variant.tiles, [&](auto config) {
    // An empty batch has empty outputs (and no tile to count).
    status = shape.batch == 0 ? cudaSuccess
                              : detail::launch_forward<T, decltype(config)>(shape, inputs, weight, bias,
                                                                            outputs, stream);
  });
  return status;
}

#define ANFAST_INSTANTIATE(T)                                                                  \
  template int adjoined_conv2d_tile_count<T>();                                                \
  template const char* adjoined_conv2d_tile_name<T>(int);                                      \
  template KernelResources adjoined_conv2d_kernel_resources<T>(int, ConvKernel);               \
  template const char* adjoined_conv2d_shape_error<T>(const AdjoinedConvShape&);               \
  template cudaError_t adjoined_conv2d_forward<T>(const AdjoinedConvShape&, Tensor4d, Tensor4d, \
                                                  Tensor4d, const T*, Tensor4d, Tensor4d,       \
                                                  cudaStream_t, KernelVariant);
ANFAST_INSTANTIATE(float)
ANFAST_INSTANTIATE(__half)
ANFAST_INSTANTIATE(__nv_bfloat16)
#undef ANFAST_INSTANTIATE

}  // namespace anfast
