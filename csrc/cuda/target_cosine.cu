// CUDA kernel of facekernels::target_cosine: one warp per row, three dot products reduced with shuffles.
// Includes only CUDA and our own headers (compiled by plain `nvcc -c` in CI).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "facekernels/common.h"
#include "facekernels/cuda_launchers.h"

namespace facekernels {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void target_cosine_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w,
                                     int64_t w_stride, const int64_t* __restrict__ labels,
                                     typename Acc<T>::type* __restrict__ out, int64_t rows, int64_t num_classes,
                                     int64_t features, int64_t class_start) {
  using acc_t = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t j = labels[row] - class_start;
  if (j < 0 || j >= num_classes) {
    if (lane == 0) out[row] = acc_t(0);
    return;
  }
  const T* xi = x + row * x_stride;
  const T* wj = w + j * w_stride;
  acc_t xw = 0, xx = 0, ww = 0;
  for (int64_t k = lane; k < features; k += kWarp) {
    const acc_t a = to_acc(xi[k]), b = to_acc(wj[k]);
    xw += a * b;
    xx += a * a;
    ww += b * b;
  }
  xw = warp_sum(xw);
  xx = warp_sum(xx);
  ww = warp_sum(ww);
  if (lane == 0) out[row] = cosine_from_dots(xw, xx, ww);
}

template <typename T>
cudaError_t launch(const void* x, int64_t x_stride, const void* w, int64_t w_stride, const int64_t* labels,
                   void* out, int64_t rows, int64_t num_classes, int64_t features, int64_t class_start,
                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  target_cosine_kernel<T><<<static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, 0, stream>>>(
      static_cast<const T*>(x), x_stride, static_cast<const T*>(w), w_stride, labels,
      static_cast<typename Acc<T>::type*>(out), rows, num_classes, features, class_start);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_target_cosine(DType dtype, const void* x, int64_t x_stride, const void* w, int64_t w_stride,
                                 const int64_t* labels, void* out, int64_t rows, int64_t num_classes,
                                 int64_t features, int64_t class_start, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(x, x_stride, w, w_stride, labels, out, rows, num_classes, features, class_start, stream);
    case DType::kFloat16:
      return launch<__half>(x, x_stride, w, w_stride, labels, out, rows, num_classes, features, class_start, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(x, x_stride, w, w_stride, labels, out, rows, num_classes, features, class_start,
                                   stream);
    case DType::kFloat64:
      return launch<double>(x, x_stride, w, w_stride, labels, out, rows, num_classes, features, class_start, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace facekernels
