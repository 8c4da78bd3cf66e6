// Standalone correctness test of the fused kernels against a float64 host
// convolution: forward, dgrad and wgrad, fp32 / fp16 / bf16, every kernel variant, outputs poisoned with
// NaN first so an element the kernel never wrote fails the test. Channel counts are
// multiples of 8 (the 16-bit kernels' alignment; anfast._C pads other counts).
// Exit codes: 0 pass, 1 fail, 77 skipped (no CUDA device; ctest SKIP_RETURN_CODE).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "adjoined_conv.h"
#include "cuda_ok.h"

namespace {

constexpr int kSkip = 77;

double to_double(float v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_double(double v);
template <> float from_double<float>(double v) { return static_cast<float>(v); }
template <> __half from_double<__half>(double v) { return __float2half(static_cast<float>(v)); }
template <> __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __float2bfloat16(static_cast<float>(v));
}

// A logical (N, C, H, W) host tensor stored NHWC (channels_last), or NCHW.
struct HostTensor {
  int d[4];
  bool nhwc;
  std::vector<double> v;
  HostTensor(int n, int c, int h, int w, bool channels_last)
      : d{n, c, h, w}, nhwc(channels_last), v(static_cast<size_t>(n) * c * h * w, 0.0) {}
  int64_t stride(int axis) const {
    const int64_t n = d[0], c = d[1], h = d[2], w = d[3];
    (void)n;
    if (nhwc) { const int64_t s[4] = {h * w * c, 1, w * c, c}; return s[axis]; }
    const int64_t s[4] = {c * h * w, h * w, w, 1};
    return s[axis];
  }
  double& at(int i0, int i1, int i2, int i3) {
    return v[i0 * stride(0) + i1 * stride(1) + i2 * stride(2) + i3 * stride(3)];
  }
};

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
double uniform() {  // in [-1, 1)
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(rng_state >> 11) / static_cast<double>(1ull << 52) - 1.0;
}

// Random values already rounded to T, so the host reference sees what the GPU sees.
template <typename T>
void fill_random(HostTensor& t) {
  for (double& x : t.v) x = to_double(from_double<T>(uniform()));
}

template <typename T>
struct DeviceTensor {
  T* ptr = nullptr;
  size_t count = 0;
  int64_t s[4];
  explicit DeviceTensor(const HostTensor& h) : count(h.v.size()) {
    for (int i = 0; i < 4; ++i) s[i] = h.stride(i);
    CUDA_OK(cudaMalloc(&ptr, count * sizeof(T) + 1));
    std::vector<T> staged(count);
    for (size_t i = 0; i < count; ++i) staged[i] = from_double<T>(h.v[i]);
    CUDA_OK(cudaMemcpy(ptr, staged.data(), count * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceTensor() { cudaFree(ptr); }
  void poison() { CUDA_OK(cudaMemset(ptr, 0xFF, count * sizeof(T))); }  // all-ones bits: NaN
  anfast::Tensor4d desc() const { return {ptr, {s[0], s[1], s[2], s[3]}}; }
  std::vector<double> read() const {
    std::vector<T> staged(count);
    CUDA_OK(cudaMemcpy(staged.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<double> out(count);
    for (size_t i = 0; i < count; ++i) out[i] = to_double(staged[i]);
    return out;
  }
};

int failures = 0;

void compare(const char* what, const char* dtype, const std::vector<double>& got,
             const std::vector<double>& want, double tolerance) {
  double diff = 0.0, norm = 0.0;
  size_t nans = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i])) { ++nans; continue; }
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  const double error = std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
  const bool ok = nans == 0 && error <= tolerance;
  if (!ok) ++failures;
  std::printf("  %-4s %-14s rel err %.3e (tol %.0e), unwritten/NaN %zu  %s\n", dtype, what, error,
              tolerance, nans, ok ? "ok" : "FAIL");
}

template <typename T>
void run_case(const anfast::AdjoinedConvShape& s, const char* dtype, double tolerance) {
  const int ho = s.out_height(), wo = s.out_width();
  const int cis = s.in_channels_student, cos = s.out_channels_student;
  HostTensor x_b(s.batch, s.in_channels, s.height, s.width, true);
  HostTensor x_s(s.batch, cis, s.height, s.width, true);
  HostTensor w(s.out_channels, s.in_channels, s.kernel_h, s.kernel_w, true);
  HostTensor bias(1, s.out_channels, 1, 1, false);
  HostTensor gy_b(s.batch, s.out_channels, ho, wo, true);
  HostTensor gy_s(s.batch, cos, ho, wo, true);
  for (HostTensor* t : {&x_b, &x_s, &w, &bias, &gy_b, &gy_s}) fill_random<T>(*t);

  HostTensor y_b(s.batch, s.out_channels, ho, wo, true), y_s(s.batch, cos, ho, wo, true);
  HostTensor gx_b(s.batch, s.in_channels, s.height, s.width, true);
  HostTensor gx_s(s.batch, cis, s.height, s.width, true);
  // NCHW: wgrad writes dW with any strides.
  HostTensor gw(s.out_channels, s.in_channels, s.kernel_h, s.kernel_w, false);
  // Each network's taps: y[n,o,p,q] += x[n,c,p*sh-ph+r,q*sw-pw+t] * w[o,c,r,t].
  struct Net { HostTensor *x, *gy, *y, *gx; int cin, cout; };
  for (Net net : {Net{&x_b, &gy_b, &y_b, &gx_b, s.in_channels, s.out_channels},
                  Net{&x_s, &gy_s, &y_s, &gx_s, cis, cos}}) {
    for (int n = 0; n < s.batch; ++n)
      for (int o = 0; o < net.cout; ++o)
        for (int p = 0; p < ho; ++p)
          for (int q = 0; q < wo; ++q) {
            double acc = bias.at(0, o, 0, 0);
            for (int r = 0; r < s.kernel_h; ++r)
              for (int t = 0; t < s.kernel_w; ++t) {
                const int ih = p * s.stride_h - s.pad_h + r, iw = q * s.stride_w - s.pad_w + t;
                if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) continue;
                for (int c = 0; c < net.cin; ++c) {
                  acc += net.x->at(n, c, ih, iw) * w.at(o, c, r, t);
                  net.gx->at(n, c, ih, iw) += net.gy->at(n, o, p, q) * w.at(o, c, r, t);
                  gw.at(o, c, r, t) += net.gy->at(n, o, p, q) * net.x->at(n, c, ih, iw);
                }
              }
            net.y->at(n, o, p, q) = acc;
          }
  }

  DeviceTensor<T> d_xb(x_b), d_xs(x_s), d_w(w), d_bias(bias), d_gyb(gy_b), d_gys(gy_s);
  DeviceTensor<T> d_yb(y_b), d_ys(y_s), d_gxb(gx_b), d_gxs(gx_s), d_gw(gw);
  // Every kernel variant (tile shape x wgrad split) against the same reference.
  for (int tiles = 0; tiles < anfast::adjoined_conv2d_tile_count<T>(); ++tiles) {
    for (bool split : {true, false}) {
      const anfast::KernelVariant variant{tiles, split};
      std::printf("  %s tiles %s, wgrad %s\n", dtype, anfast::adjoined_conv2d_tile_name<T>(tiles),
                  split ? "split" : "unsplit");
      for (DeviceTensor<T>* out : {&d_yb, &d_ys, &d_gxb, &d_gxs, &d_gw}) out->poison();
      CUDA_OK(anfast::adjoined_conv2d_forward<T>(s, d_xb.desc(), d_xs.desc(), d_w.desc(), d_bias.ptr,
                                                 d_yb.desc(), d_ys.desc(), nullptr, variant));
      CUDA_OK(anfast::adjoined_conv2d_dgrad<T>(s, d_gyb.desc(), d_gys.desc(), d_w.desc(), d_gxb.desc(),
                                               d_gxs.desc(), nullptr, variant));
      const size_t workspace_bytes = anfast::adjoined_conv2d_wgrad_workspace_bytes<T>(s, variant);
      void* workspace = nullptr;
      CUDA_OK(cudaMalloc(&workspace, workspace_bytes));
      CUDA_OK(anfast::adjoined_conv2d_wgrad<T>(s, d_gyb.desc(), d_gys.desc(), d_xb.desc(), d_xs.desc(),
                                               d_gw.desc(), workspace, workspace_bytes, nullptr, variant));
      CUDA_OK(cudaDeviceSynchronize());
      compare("y_base", dtype, d_yb.read(), y_b.v, tolerance);
      compare("y_student", dtype, d_ys.read(), y_s.v, tolerance);
      compare("grad_x_base", dtype, d_gxb.read(), gx_b.v, tolerance);
      compare("grad_x_student", dtype, d_gxs.read(), gx_s.v, tolerance);
      compare("grad_weight", dtype, d_gw.read(), gw.v, tolerance);
      CUDA_OK(cudaFree(workspace));
    }
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device; the fused-kernel test needs a GPU (sm_80+)\n");
    return kSkip;
  }
  // batch, C_in, c_in, H, W, C_out, c_out, kh, kw, stride_h, stride_w, pad_h, pad_w
  const anfast::AdjoinedConvShape shapes[] = {
      {2, 16, 16, 9, 7, 24, 8, 3, 3, 2, 2, 1, 1},
      {1, 64, 64, 17, 5, 40, 8, 7, 7, 1, 1, 3, 3},
      {3, 8, 8, 6, 11, 8, 8, 5, 5, 2, 1, 0, 2},
      {2, 128, 64, 8, 8, 136, 72, 1, 1, 1, 1, 0, 0},
      {1, 64, 64, 12, 10, 72, 64, 3, 5, 2, 2, 1, 2},
      {2, 128, 64, 9, 9, 128, 32, 1, 1, 2, 2, 0, 0},
  };
  for (const auto& s : shapes) {
    std::printf("N=%d C_in=%d/%d H=%d W=%d C_out=%d/%d k=%dx%d stride=%d,%d pad=%d,%d\n",
                s.batch, s.in_channels, s.in_channels_student, s.height, s.width, s.out_channels,
                s.out_channels_student, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h,
                s.pad_w);
    const char* why = anfast::adjoined_conv2d_shape_error<__half>(s);
    if (why == nullptr && anfast::adjoined_conv2d_wgrad_student_channels(s) != s.in_channels_student)
      why = "in_channels_student is not whole wgrad tiles";
    if (why != nullptr) {
      std::printf("  bad test shape: %s\n", why);
      return 1;
    }
    run_case<float>(s, "fp32", 1e-5);
    run_case<__half>(s, "fp16", 1e-2);
    run_case<__nv_bfloat16>(s, "bf16", 2e-2);
  }
  std::printf(failures ? "FAILED: %d comparisons\n" : "PASSED%.0d\n", failures);
  return failures ? 1 : 0;
}
