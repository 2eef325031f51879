// Host-side entry points of the CUDA kernels: raw pointers, sizes and a stream, no torch types, so the
// kernel files compile with plain nvcc and the torch-facing glue (csrc/cuda/*_glue.cpp) only calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace facekernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// out[i] = clamp(x_hat_i . w_hat_j, -1, 1) with j = labels[i] - class_start, or 0 when j is outside
// [0, num_classes). x: (rows, features) with row stride x_stride; w: (num_classes, features) with row
// stride w_stride; both of `dtype`. out is float32 (float64 when dtype is kFloat64).
cudaError_t launch_target_cosine(DType dtype, const void* x, int64_t x_stride, const void* w, int64_t w_stride,
                                 const int64_t* labels, void* out, int64_t rows, int64_t num_classes,
                                 int64_t features, int64_t class_start, cudaStream_t stream);

}  // namespace facekernels
