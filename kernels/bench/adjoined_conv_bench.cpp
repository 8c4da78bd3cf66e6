// Timing of the fused kernels with CUDA events, for integrators without Python.
// Prints the median time per launch and the TFLOP/s of the base + student work.
// The Python benchmark (benchmarks/conv.py) compares against cuDNN; this one only
// measures the kernels themselves. Exit code 77 when no CUDA device is present.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "adjoined_conv.h"
#include "cuda_ok.h"

namespace {

anfast::Tensor4d nhwc(void* data, int c, int h, int w) {
  return {data, {static_cast<int64_t>(h) * w * c, 1, static_cast<int64_t>(w) * c, c}};
}

float median_ms(const std::function<cudaError_t()>& launch, int repeats) {
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) CUDA_OK(launch());  // warm-up
  std::vector<float> times;
  for (int i = 0; i < repeats; ++i) {
    CUDA_OK(cudaEventRecord(start));
    CUDA_OK(launch());
    CUDA_OK(cudaEventRecord(stop));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <typename T>
void bench(const anfast::AdjoinedConvShape& s, const char* dtype) {
  const int ho = s.out_height(), wo = s.out_width();
  const size_t x_count = static_cast<size_t>(s.batch) * s.in_channels * s.height * s.width;
  const size_t y_count = static_cast<size_t>(s.batch) * s.out_channels * ho * wo;
  const size_t w_count = static_cast<size_t>(s.out_channels) * s.in_channels * s.kernel_h * s.kernel_w;
  // Contents do not change the timing; zeros keep every value finite.
  std::vector<void*> buffers;
  auto alloc = [&](size_t count) {
    void* p = nullptr;
    CUDA_OK(cudaMalloc(&p, count * sizeof(T)));
    CUDA_OK(cudaMemset(p, 0, count * sizeof(T)));
    buffers.push_back(p);
    return p;
  };
  const anfast::Tensor4d x_b = nhwc(alloc(x_count), s.in_channels, s.height, s.width);
  const anfast::Tensor4d x_s = nhwc(alloc(x_count), s.in_channels_student, s.height, s.width);
  const anfast::Tensor4d y_b = nhwc(alloc(y_count), s.out_channels, ho, wo);
  const anfast::Tensor4d y_s = nhwc(alloc(y_count), s.out_channels_student, ho, wo);
  const anfast::Tensor4d w = {alloc(w_count), {static_cast<int64_t>(s.in_channels) * s.kernel_h * s.kernel_w,
                                               1, static_cast<int64_t>(s.kernel_w) * s.in_channels, s.in_channels}};
  // wgrad reads x_student with its tile-aligned channel count (the buffer holds x_base's).
  anfast::AdjoinedConvShape ws = s;
  ws.in_channels_student = anfast::adjoined_conv2d_wgrad_student_channels(s);
  const anfast::Tensor4d x_s_wgrad = nhwc(x_s.data, ws.in_channels_student, s.height, s.width);
  const size_t workspace_bytes = anfast::adjoined_conv2d_wgrad_workspace_bytes<T>(ws);
  void* workspace = alloc((workspace_bytes + sizeof(T) - 1) / sizeof(T));
  const double macs_per_position = static_cast<double>(s.kernel_h) * s.kernel_w *
      (static_cast<double>(s.in_channels) * s.out_channels +
       static_cast<double>(s.in_channels_student) * s.out_channels_student);
  const double flops = 2.0 * macs_per_position * s.batch * ho * wo;
  const int repeats = 20;
  const float fwd = median_ms([&] { return anfast::adjoined_conv2d_forward<T>(s, x_b, x_s, w, nullptr, y_b, y_s, nullptr); }, repeats);
  const float dgrad = median_ms([&] { return anfast::adjoined_conv2d_dgrad<T>(s, y_b, y_s, w, x_b, x_s, nullptr); }, repeats);
  const float wgrad = median_ms([&] { return anfast::adjoined_conv2d_wgrad<T>(ws, y_b, y_s, x_b, x_s_wgrad, w, workspace, workspace_bytes, nullptr); }, repeats);
  std::printf("%-4s N=%-3d C=%4d/%-4d HxW=%3dx%-3d K=%4d/%-4d k=%d s=%d | fwd %8.3f ms %6.1f TF/s"
              " | dgrad %8.3f ms %6.1f TF/s | wgrad %8.3f ms %6.1f TF/s\n",
              dtype, s.batch, s.in_channels, s.in_channels_student, s.height, s.width,
              s.out_channels, s.out_channels_student, s.kernel_h, s.stride_h,
              fwd, flops / fwd * 1e-9, dgrad, flops / dgrad * 1e-9, wgrad, flops / wgrad * 1e-9);
  for (void* p : buffers) CUDA_OK(cudaFree(p));
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device; the benchmark needs a GPU (sm_80+)\n");
    return 77;
  }
  cudaDeviceProp props{};
  CUDA_OK(cudaGetDeviceProperties(&props, 0));
  std::printf("device: %s (sm_%d%d)\n", props.name, props.major, props.minor);
  // ResNet-50 3x3 convolutions of layer2..layer4 at batch 32, student alpha = 4.
  const anfast::AdjoinedConvShape shapes[] = {
      {32, 128, 32, 28, 28, 128, 32, 3, 3, 1, 1, 1, 1},
      {32, 256, 64, 14, 14, 256, 64, 3, 3, 1, 1, 1, 1},
      {32, 512, 128, 7, 7, 512, 128, 3, 3, 1, 1, 1, 1},
      {32, 256, 64, 56, 56, 512, 128, 1, 1, 2, 2, 0, 0},
  };
  for (const auto& s : shapes) {
    bench<__nv_bfloat16>(s, "bf16");
    bench<float>(s, "fp32");
  }
  return 0;
}
