// anfast._C: torch bindings of the fused adjoined convolution kernels (kernels/).
//
// Plain pybind11 functions taking at::Tensor; the custom op anfast::adjoined_conv2d
// (anfast/ops/conv.py) calls them through anfast.ops.cuda_backend. Every input is
// checked here, naming the argument, before a kernel sees it. Optional `out`
// tensors let tests poison outputs and check that every element is written; `variant`
// names the kernels' tile shape (variants() lists them; the tuner picks one per problem).
//
// The kernels read channels_last tensors whose channel counts are multiples of the
// dtype's alignment (8 for 16-bit); inputs that are not are copied here (zero-padded
// channels contribute nothing), and results are copied into outputs of another layout.
#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

namespace py = pybind11;

#include "adjoined_conv.h"
#ifdef ANFAST_HAS_SM90A
#include "adjoined_conv_sm90a.h"
#endif

#define CHECK_DEVICE(x)                                                                     \
  TORCH_CHECK((x).is_cuda(), "anfast._C: " #x " must be a CUDA tensor, got one on ",      \
              (x).device(), "; move it with .cuda() or use backend='torch'")
#define CHECK_SAME_DEVICE(x, ref)                                                           \
  TORCH_CHECK((x).device() == (ref).device(), "anfast._C: " #x " is on ", (x).device(),    \
              " but " #ref " is on ", (ref).device(), "; put every tensor on one GPU")
#define CHECK_DTYPE(x, ref)                                                                 \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), "anfast._C: " #x " has dtype ",     \
              (x).scalar_type(), " but " #ref " has ", (ref).scalar_type(),                 \
              "; cast both to one of float32, float16, bfloat16")
#define CHECK_LAYOUT(x)                                                                     \
  TORCH_CHECK((x).layout() == at::kStrided, "anfast._C: " #x " must be a strided (dense) " \
              "tensor, got layout ", (x).layout())
#define CHECK_SHAPE(x, ...)                                                                 \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "anfast._C: " #x              \
              " must have shape (" #__VA_ARGS__ ") = ", at::IntArrayRef({__VA_ARGS__}),     \
              ", got ", (x).sizes())
#define CHECK_INPUT(x, ref)  \
  CHECK_DEVICE(x);           \
  CHECK_SAME_DEVICE(x, ref); \
  CHECK_DTYPE(x, ref);       \
  CHECK_LAYOUT(x)

namespace {

anfast::Tensor4d describe(const at::Tensor& t) {
  return {t.data_ptr(), {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

// A channels_last-contiguous tensor with its canonical strides {H*W*C, 1, W*C, C}:
// torch leaves the strides of size-1 dims arbitrary (an NCHW 1x1 weight passes as
// channels_last), and they address nothing, but the kernels check and use all four.
anfast::Tensor4d describe_nhwc(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(at::MemoryFormat::ChannelsLast));
  const int64_t c = t.size(1), h = t.size(2), w = t.size(3);
  return {t.data_ptr(), {h * w * c, 1, w * c, c}};
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<kernel type>) for the tensor's dtype.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kHalf: fn(TypeTag<__half>{}); break;
    case at::kBFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
    default:
      TORCH_CHECK(false, "anfast._C: dtype ", dtype,
                  " is not supported; use float32, float16 or bfloat16");
  }
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// The shape the kernels run: every channel count rounded up to the dtype's alignment.
anfast::AdjoinedConvShape padded_shape(anfast::AdjoinedConvShape s, at::ScalarType dtype) {
  int alignment = 1;
  dispatch_dtype(dtype, [&](auto tag) {
    alignment = anfast::adjoined_conv2d_channel_alignment<typename decltype(tag)::type>();
  });
  for (int* channels : {&s.in_channels, &s.in_channels_student, &s.out_channels, &s.out_channels_student})
    *channels = static_cast<int>(round_up(*channels, alignment));
  return s;
}

// Sizes shared by the three entry points, checked against x_base / x_student / weight.
anfast::AdjoinedConvShape conv_shape(const at::Tensor& x_base, const at::Tensor& x_student,
                                     const at::Tensor& weight, int64_t out_student,
                                     const std::vector<int64_t>& stride,
                                     const std::vector<int64_t>& padding) {
  TORCH_CHECK(x_base.dim() == 4, "anfast._C: x_base must be 4-D (N, C, H, W), got ", x_base.sizes());
  TORCH_CHECK(x_student.dim() == 4, "anfast._C: x_student must be 4-D (N, C, H, W), got ",
              x_student.sizes());
  TORCH_CHECK(weight.dim() == 4, "anfast._C: weight must be 4-D (C_out, C_in, kh, kw), got ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2,
              "anfast._C: stride and padding must be pairs (h, w)");
  CHECK_INPUT(x_base, weight);
  CHECK_INPUT(x_student, weight);
  TORCH_CHECK(x_base.size(1) == weight.size(1), "anfast._C: x_base has ", x_base.size(1),
              " channels but weight expects ", weight.size(1), " (the cuda backend needs groups=1)");
  CHECK_SHAPE(x_student, x_base.size(0), x_student.size(1), x_base.size(2), x_base.size(3));
  for (int64_t size : {x_base.size(0), x_base.size(1), x_base.size(2), x_base.size(3),
                       weight.size(0)}) {
    TORCH_CHECK(size <= INT32_MAX, "anfast._C: tensor sizes must fit in int32, got ", size);
  }
  anfast::AdjoinedConvShape shape{};
  shape.batch = static_cast<int>(x_base.size(0));
  shape.in_channels = static_cast<int>(x_base.size(1));
  shape.in_channels_student = static_cast<int>(x_student.size(1));
  shape.height = static_cast<int>(x_base.size(2));
  shape.width = static_cast<int>(x_base.size(3));
  shape.out_channels = static_cast<int>(weight.size(0));
  shape.out_channels_student = static_cast<int>(out_student);
  shape.kernel_h = static_cast<int>(weight.size(2));
  shape.kernel_w = static_cast<int>(weight.size(3));
  shape.stride_h = static_cast<int>(stride[0]);
  shape.stride_w = static_cast<int>(stride[1]);
  shape.pad_h = static_cast<int>(padding[0]);
  shape.pad_w = static_cast<int>(padding[1]);
  // The kernels run the padded shape (padded_shape: channels rounded up to the dtype's
  // alignment), so that shape's sizes are checked, in the dtype's own bytes (the 2 GiB
  // limit of a 16-bit activation is twice a float one's).
  const char* error = nullptr;
  dispatch_dtype(weight.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    error = anfast::adjoined_conv2d_shape_error<T>(padded_shape(shape, weight.scalar_type()));
  });
  TORCH_CHECK(error == nullptr, "anfast._C: unsupported convolution: ", error, " (x_base ",
              x_base.sizes(), ", x_student ", x_student.sizes(), ", weight ", weight.sizes(),
              ", out_student ", out_student, ", stride ", at::IntArrayRef(stride), ", padding ", at::IntArrayRef(padding), ")");
  return shape;
}

// The memory format F.conv2d gives on CUDA (channels_last when the input or the weight
// suggests it), which the custom op's fake implementation promises to torch.compile.
at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight) {
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A caller-given output after its checks, or a fresh one made by `make`.
template <typename Make>
at::Tensor output_or(const std::optional<at::Tensor>& given, const char* name,
                     at::IntArrayRef shape, const at::Tensor& ref, Make make) {
  if (!given.has_value()) return make();
  const at::Tensor& out = *given;
  TORCH_CHECK(out.is_cuda() && out.device() == ref.device(), "anfast._C: ", name,
              " must be on ", ref.device(), ", got ", out.device());
  TORCH_CHECK(out.scalar_type() == ref.scalar_type(), "anfast._C: ", name, " must have dtype ",
              ref.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == shape, "anfast._C: ", name, " must have shape ", shape, ", got ",
              out.sizes());
  TORCH_CHECK(out.is_non_overlapping_and_dense(), "anfast._C: ", name,
              " must be dense and non-overlapping (contiguous or channels_last)");
  return out;
}

// Kernel variants by name: the tile shape ("128x64x32"), then "-unsplit" where wgrad
// keeps its reduction in one slice. The tuner (anfast.ops.tuning) times each per problem.
constexpr const char* kUnsplit = "-unsplit";
// The Hopper-native kernels (kernels/adjoined_conv_sm90a.cu, CUTLASS 3 TMA + wgmma), a
// 16-bit variant where the extension was built for sm_90; runs on sm_90 devices only.
// Each phase the sm_90a kernels refuse for a shape (adjoined_conv2d_sm90a_shape_error: a
// bias in the forward, a strided dgrad) runs the default 2.x tiles of the same call.
constexpr const char* kSm90aVariant = "sm90a-tma-wgmma";

constexpr bool sm90a_built() {
#ifdef ANFAST_HAS_SM90A
  return true;
#else
  return false;
#endif
}

template <typename T>
std::vector<std::string> variant_names() {
  std::vector<std::string> names;
  for (int tiles = 0; tiles < anfast::adjoined_conv2d_tile_count<T>(); ++tiles) {
    const std::string tile = anfast::adjoined_conv2d_tile_name<T>(tiles);
    names.push_back(tile);
    names.push_back(tile + kUnsplit);
  }
  if (sm90a_built() && sizeof(T) == 2) names.push_back(kSm90aVariant);
  return names;
}

// The variant called `name` for the dtype; "" is the default (the largest tile, split),
// which is also what the sm_90a variant runs in the phases its kernels refuse.
anfast::KernelVariant variant_named(const std::string& name, at::ScalarType dtype) {
  anfast::KernelVariant variant;
  if (name.empty()) return variant;
  std::vector<std::string> names;
  dispatch_dtype(dtype, [&](auto tag) { names = variant_names<typename decltype(tag)::type>(); });
  const auto found = std::find(names.begin(), names.end(), name);
  TORCH_CHECK(found != names.end(), "anfast._C: variant '", name, "' is not a ", dtype,
              " kernel variant; choose one of ", c10::Join(", ", names), " (anfast._C.variants())");
  if (name == kSm90aVariant) return variant;
  const int index = static_cast<int>(found - names.begin());
  variant.tiles = index / 2;
  variant.split_wgrad = index % 2 == 0;
  return variant;
}

// Whether t's data starts on 16 bytes, as the kernels' vector loads and stores (8 16-bit
// channels per cp.async) and TMA descriptors need. A fresh allocation does; a view need
// not (x[:, 4:20] of a channels_last tensor is channels_last-contiguous and starts 4
// channels in), and the kernels would fault on it.
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// t as channels_last with `channels` channels, zero past t's own: t itself when it
// already is one (and starts on 16 bytes).
at::Tensor nhwc(const at::Tensor& t, int64_t channels) {
  if (t.size(1) == channels) {
    at::Tensor dense = t.contiguous(at::MemoryFormat::ChannelsLast);
    if (aligned16(dense)) return dense;
  }
  // at::empty, then zero_: at::zeros drops the memory format of its TensorOptions (it
  // returned an NCHW tensor here, and describe_nhwc's check failed on the GPU).
  at::Tensor padded = at::empty({t.size(0), channels, t.size(2), t.size(3)},
                                t.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return padded;
}

// The weight as KRSC (channels_last) with the padded shape's channel counts.
at::Tensor krsc(const at::Tensor& weight, const anfast::AdjoinedConvShape& p) {
  if (weight.size(0) == p.out_channels && weight.size(1) == p.in_channels) {
    at::Tensor dense = weight.contiguous(at::MemoryFormat::ChannelsLast);
    if (aligned16(dense)) return dense;
  }
  at::Tensor padded = at::empty({p.out_channels, p.in_channels, weight.size(2), weight.size(3)},
                                weight.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  padded.narrow(0, 0, weight.size(0)).narrow(1, 0, weight.size(1)).copy_(weight);
  return padded;
}

// Where a kernel writes `out` (padded to `channels`): out itself when it has the
// kernels' layout and alignment, else a scratch tensor that finish() copies back.
at::Tensor kernel_target(const at::Tensor& out, int64_t channels) {
  if (out.size(1) == channels && out.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(out))
    return out;
  return at::empty({out.size(0), channels, out.size(2), out.size(3)},
                   out.options().memory_format(at::MemoryFormat::ChannelsLast));
}

void finish(const at::Tensor& target, at::Tensor& out) {
  if (!target.is_same(out)) out.copy_(target.narrow(1, 0, out.size(1)));
}

#ifdef ANFAST_HAS_SM90A
// Calls fn(TypeTag<kernel type>) for a 16-bit dtype, the sm_90a kernels' only types
// (sm90a_runs refuses the others first).
template <typename Fn>
void dispatch_16bit(at::ScalarType dtype, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto tag) {
    if constexpr (sizeof(typename decltype(tag)::type) == 2) fn(tag);
  });
}

// Whether the sm_90a kernel of `phase` runs this padded shape: refuses, saying why, off
// sm_90 and for dtypes other than 16-bit ones; false (the 2.x kernels run the phase) for
// the shapes adjoined_conv2d_sm90a_shape_error refuses.
bool sm90a_runs(const anfast::AdjoinedConvShape& p, anfast::ConvKernel phase, at::ScalarType dtype,
                bool has_bias) {
  int major = 0, minor = 0;
  const int device = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major == 9 && minor == 0, "anfast._C: variant '", kSm90aVariant,
              "' runs on sm_90 GPUs only, this one is sm_", major, minor,
              "; choose another variant (anfast._C.variants())");
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "anfast._C: variant '", kSm90aVariant,
              "' takes float16 or bfloat16, got ", dtype);
  bool runs = false;
  dispatch_16bit(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    runs = anfast::adjoined_conv2d_sm90a_shape_error<T>(p, phase, has_bias) == nullptr;
  });
  return runs;
}
#endif

std::vector<at::Tensor> forward(const at::Tensor& x_base, const at::Tensor& x_student,
                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                int64_t out_student, const std::vector<int64_t>& stride,
                                const std::vector<int64_t>& padding,
                                const std::optional<at::Tensor>& y_base_out,
                                const std::optional<at::Tensor>& y_student_out, const std::string& variant) {
  const anfast::AdjoinedConvShape s = conv_shape(x_base, x_student, weight, out_student, stride, padding);
  const anfast::KernelVariant kernels = variant_named(variant, weight.scalar_type());
  if (bias.has_value()) {
    const at::Tensor& bias_tensor = *bias;
    CHECK_INPUT(bias_tensor, weight);
    CHECK_SHAPE(bias_tensor, weight.size(0));
  }
  const c10::cuda::CUDAGuard device_guard(x_base.device());
  const std::vector<int64_t> y_base_shape{s.batch, s.out_channels, s.out_height(), s.out_width()};
  const std::vector<int64_t> y_student_shape{s.batch, s.out_channels_student, s.out_height(),
                                             s.out_width()};
  const at::Tensor weight_student = weight.slice(0, 0, s.out_channels_student).slice(1, 0, s.in_channels_student);
  at::Tensor y_base = output_or(y_base_out, "y_base_out", y_base_shape, x_base, [&] {
    return at::empty(y_base_shape, x_base.options().memory_format(conv_output_format(x_base, weight)));
  });
  at::Tensor y_student = output_or(y_student_out, "y_student_out", y_student_shape, x_base, [&] {
    return at::empty(y_student_shape,
                     x_base.options().memory_format(conv_output_format(x_student, weight_student)));
  });
  const anfast::AdjoinedConvShape p = padded_shape(s, weight.scalar_type());
  const at::Tensor xb = nhwc(x_base, p.in_channels), xs = nhwc(x_student, p.in_channels_student);
  const at::Tensor w = krsc(weight, p);
  at::Tensor bias_padded;
  if (bias.has_value()) {
    if (p.out_channels == s.out_channels && aligned16(bias->contiguous())) {
      bias_padded = bias->contiguous();
    } else {
      bias_padded = at::zeros({p.out_channels}, weight.options());
      bias_padded.narrow(0, 0, s.out_channels).copy_(*bias);
    }
  }
  const at::Tensor yb = kernel_target(y_base, p.out_channels);
  const at::Tensor ys = kernel_target(y_student, p.out_channels_student);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
#ifdef ANFAST_HAS_SM90A
  if (variant == kSm90aVariant &&
      sm90a_runs(p, anfast::ConvKernel::kForward, weight.scalar_type(), bias.has_value())) {
    dispatch_16bit(weight.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(anfast::adjoined_conv2d_forward_sm90a<T>(p, describe_nhwc(xb), describe_nhwc(xs),
                                                              describe_nhwc(w), describe_nhwc(yb),
                                                              describe_nhwc(ys), stream));
    });
    finish(yb, y_base);
    finish(ys, y_student);
    return {y_base, y_student};
  }
#endif
  dispatch_dtype(weight.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* bias_ptr = bias.has_value() ? static_cast<const T*>(bias_padded.data_ptr()) : nullptr;
    C10_CUDA_CHECK(anfast::adjoined_conv2d_forward<T>(p, describe_nhwc(xb), describe_nhwc(xs), describe_nhwc(w),
                                                      bias_ptr, describe_nhwc(yb), describe_nhwc(ys), stream,
                                                      kernels));
  });
  finish(yb, y_base);
  finish(ys, y_student);
  return {y_base, y_student};
}

// dgrad and wgrad take the same output gradients: on the weight's device and dtype,
// shaped as the base and student outputs.
void check_output_grads(const at::Tensor& grad_base, const at::Tensor& grad_student,
                        const at::Tensor& weight, const anfast::AdjoinedConvShape& s) {
  CHECK_INPUT(grad_base, weight);
  CHECK_INPUT(grad_student, weight);
  CHECK_SHAPE(grad_base, s.batch, s.out_channels, s.out_height(), s.out_width());
  CHECK_SHAPE(grad_student, s.batch, s.out_channels_student, s.out_height(), s.out_width());
}

std::vector<at::Tensor> dgrad(const at::Tensor& grad_base, const at::Tensor& grad_student,
                              const at::Tensor& x_base, const at::Tensor& x_student,
                              const at::Tensor& weight, int64_t out_student,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                              const std::optional<at::Tensor>& grad_x_base_out,
                              const std::optional<at::Tensor>& grad_x_student_out, const std::string& variant) {
  const anfast::AdjoinedConvShape s = conv_shape(x_base, x_student, weight, out_student, stride, padding);
  const anfast::KernelVariant kernels = variant_named(variant, weight.scalar_type());
  check_output_grads(grad_base, grad_student, weight, s);
  const c10::cuda::CUDAGuard device_guard(x_base.device());
  // empty_like keeps x's strides, as the backward op's fake implementation promises.
  at::Tensor grad_x_base = output_or(grad_x_base_out, "grad_x_base_out", x_base.sizes(), x_base,
                                     [&] { return at::empty_like(x_base); });
  at::Tensor grad_x_student = output_or(grad_x_student_out, "grad_x_student_out", x_student.sizes(),
                                        x_base, [&] { return at::empty_like(x_student); });
  const anfast::AdjoinedConvShape p = padded_shape(s, weight.scalar_type());
  const at::Tensor gb = nhwc(grad_base, p.out_channels), gs = nhwc(grad_student, p.out_channels_student);
  const at::Tensor w = krsc(weight, p);
  const at::Tensor dxb = kernel_target(grad_x_base, p.in_channels);
  const at::Tensor dxs = kernel_target(grad_x_student, p.in_channels_student);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
#ifdef ANFAST_HAS_SM90A
  if (variant == kSm90aVariant && sm90a_runs(p, anfast::ConvKernel::kDgrad, weight.scalar_type(), false)) {
    dispatch_16bit(weight.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(anfast::adjoined_conv2d_dgrad_sm90a<T>(p, describe_nhwc(gb), describe_nhwc(gs),
                                                            describe_nhwc(w), describe_nhwc(dxb),
                                                            describe_nhwc(dxs), stream));
    });
    finish(dxb, grad_x_base);
    finish(dxs, grad_x_student);
    return {grad_x_base, grad_x_student};
  }
#endif
  dispatch_dtype(weight.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(anfast::adjoined_conv2d_dgrad<T>(p, describe_nhwc(gb), describe_nhwc(gs), describe_nhwc(w),
                                                    describe_nhwc(dxb), describe_nhwc(dxs), stream, kernels));
  });
  finish(dxb, grad_x_base);
  finish(dxs, grad_x_student);
  return {grad_x_base, grad_x_student};
}

at::Tensor wgrad(const at::Tensor& grad_base, const at::Tensor& grad_student,
                 const at::Tensor& x_base, const at::Tensor& x_student, const at::Tensor& weight,
                 int64_t out_student, const std::vector<int64_t>& stride,
                 const std::vector<int64_t>& padding,
                 const std::optional<at::Tensor>& grad_weight_out, const std::string& variant) {
  const anfast::AdjoinedConvShape s = conv_shape(x_base, x_student, weight, out_student, stride, padding);
  const anfast::KernelVariant kernels = variant_named(variant, weight.scalar_type());
  check_output_grads(grad_base, grad_student, weight, s);
  const c10::cuda::CUDAGuard device_guard(x_base.device());
  at::Tensor grad_weight = output_or(grad_weight_out, "grad_weight_out", weight.sizes(), weight,
                                     [&] { return at::empty_like(weight); });
  anfast::AdjoinedConvShape p = padded_shape(s, weight.scalar_type());
  const at::Tensor gb = nhwc(grad_base, p.out_channels), gs = nhwc(grad_student, p.out_channels_student);
  const bool padded = p.out_channels != s.out_channels || p.in_channels != s.in_channels;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
#ifdef ANFAST_HAS_SM90A
  if (variant == kSm90aVariant && sm90a_runs(p, anfast::ConvKernel::kWgrad, weight.scalar_type(), false)) {
    const at::Tensor xb = nhwc(x_base, p.in_channels), xs = nhwc(x_student, p.in_channels_student);
    // CUTLASS 3's wgrad writes packed KRSC alone: grad_weight itself where it is that.
    const at::Tensor dw =
        !padded && grad_weight.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(grad_weight)
            ? grad_weight
            : at::empty({p.out_channels, p.in_channels, s.kernel_h, s.kernel_w},
                        weight.options().memory_format(at::MemoryFormat::ChannelsLast));
    dispatch_16bit(weight.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(anfast::adjoined_conv2d_wgrad_sm90a<T>(p, describe_nhwc(gb), describe_nhwc(gs),
                                                            describe_nhwc(xb), describe_nhwc(xs),
                                                            describe_nhwc(dw), stream));
    });
    if (!dw.is_same(grad_weight)) grad_weight.copy_(dw.narrow(0, 0, s.out_channels).narrow(1, 0, s.in_channels));
    return grad_weight;
  }
#endif
  p.in_channels_student = anfast::adjoined_conv2d_wgrad_student_channels(p);
  const at::Tensor xb = nhwc(x_base, p.in_channels), xs = nhwc(x_student, p.in_channels_student);
  // The slice-summing kernel writes any strides: only padding needs a scratch dW.
  const at::Tensor dw = padded ? at::empty({p.out_channels, p.in_channels, s.kernel_h, s.kernel_w}, weight.options())
                               : grad_weight;
  dispatch_dtype(weight.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t workspace_bytes = anfast::adjoined_conv2d_wgrad_workspace_bytes<T>(p, kernels);
    const at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes / sizeof(float))},
                                           weight.options().dtype(at::kFloat));
    C10_CUDA_CHECK(anfast::adjoined_conv2d_wgrad<T>(p, describe_nhwc(gb), describe_nhwc(gs), describe_nhwc(xb),
                                                    describe_nhwc(xs), describe(dw), workspace.data_ptr(), workspace_bytes,
                                                    stream, kernels));
  });
  if (padded) grad_weight.copy_(dw.narrow(0, 0, s.out_channels).narrow(1, 0, s.in_channels));
  return grad_weight;
}

// Every compiled conv kernel of every tile shape: what it asks of an SM (for
// benchmarks/kernel_report.py, which reads registers and spills from the SASS).
std::vector<std::map<std::string, py::object>> kernel_resources() {
  const std::pair<anfast::ConvKernel, const char*> ops[] = {
      {anfast::ConvKernel::kForward, "forward"}, {anfast::ConvKernel::kDgrad, "dgrad"},
      {anfast::ConvKernel::kDgradStrided, "dgrad_strided"}, {anfast::ConvKernel::kWgrad, "wgrad"}};
  std::vector<std::map<std::string, py::object>> rows;
  auto add = [&](auto tag, const char* dtype) {
    using T = typename decltype(tag)::type;
    for (int tiles = 0; tiles < anfast::adjoined_conv2d_tile_count<T>(); ++tiles) {
      for (const auto& [op, op_name] : ops) {
        const anfast::KernelResources r = anfast::adjoined_conv2d_kernel_resources<T>(tiles, op);
        rows.push_back({{"dtype", py::str(dtype)}, {"tiles", py::str(anfast::adjoined_conv2d_tile_name<T>(tiles))},
                        {"op", py::str(op_name)},
                        {"threadblock", py::make_tuple(r.tile_m, r.tile_n, r.tile_k)},
                        {"threads", py::int_(r.threads)}, {"shared_bytes", py::int_(r.shared_bytes)}});
      }
    }
  };
  add(TypeTag<float>{}, "float32");
  add(TypeTag<__half>{}, "float16");
  add(TypeTag<__nv_bfloat16>{}, "bfloat16");
#ifdef ANFAST_HAS_SM90A
  auto add_sm90a = [&](auto tag, const char* dtype) {
    using T = typename decltype(tag)::type;
    for (const auto& [op, op_name] : ops) {
      if (op == anfast::ConvKernel::kDgradStrided) continue;  // the 2.x strided dgrad runs it
      const anfast::KernelResources r = anfast::adjoined_conv2d_sm90a_kernel_resources<T>(op);
      rows.push_back({{"dtype", py::str(dtype)}, {"tiles", py::str(kSm90aVariant)}, {"op", py::str(op_name)},
                      {"threadblock", py::make_tuple(r.tile_m, r.tile_n, r.tile_k)},
                      {"threads", py::int_(r.threads)}, {"shared_bytes", py::int_(r.shared_bytes)}});
    }
  };
  add_sm90a(TypeTag<__half>{}, "float16");
  add_sm90a(TypeTag<__nv_bfloat16>{}, "bfloat16");
#endif
  return rows;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CUDA kernels of the adjoined convolution (base + student in one launch)";
  m.def("forward", &forward,
        "(y_base, y_student) of the adjoined convolution; prefix channel map, groups=1, dilation=1",
        py::arg("x_base"), py::arg("x_student"), py::arg("weight"), py::arg("bias"),
        py::arg("out_student"), py::arg("stride"), py::arg("padding"),
        py::arg("y_base_out") = py::none(), py::arg("y_student_out") = py::none(), py::arg("variant") = "");
  m.def("dgrad", &dgrad, "(grad_x_base, grad_x_student), one launch", py::arg("grad_base"),
        py::arg("grad_student"), py::arg("x_base"), py::arg("x_student"), py::arg("weight"),
        py::arg("out_student"), py::arg("stride"), py::arg("padding"),
        py::arg("grad_x_base_out") = py::none(), py::arg("grad_x_student_out") = py::none(),
        py::arg("variant") = "");
  m.def("wgrad", &wgrad,
        "grad_weight with the student's gradient summed into its leading block, one launch",
        py::arg("grad_base"), py::arg("grad_student"), py::arg("x_base"), py::arg("x_student"),
        py::arg("weight"), py::arg("out_student"), py::arg("stride"), py::arg("padding"),
        py::arg("grad_weight_out") = py::none(), py::arg("variant") = "");
  m.def("variants", [] {
    return std::map<std::string, std::vector<std::string>>{
        {"float32", variant_names<float>()}, {"float16", variant_names<__half>()},
        {"bfloat16", variant_names<__nv_bfloat16>()}};
  }, "{dtype name: kernel variant names}; the first of each is the default (variant='')");
  m.def("kernel_resources", &kernel_resources,
        "per compiled conv kernel: dtype, op, threadblock tile, threads and dynamic shared bytes");
}
