// Host-side entry points of the CUDA kernels: raw pointers, sizes and a stream, no torch types, so the
// kernel files compile with plain nvcc and the torch-facing glue (csrc/cuda/*_glue.cpp) only calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace facekernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Fused triplet mining (csrc/cuda/triplet.cu; semantics and outputs in csrc/cpu/triplet.cpp and
// csrc/include/facekernels/triplet_select.h). acc_dtype: kFloat32 or kFloat64, the dtype of every
// floating buffer; mining and distance: the values of facekernels::Mining and facekernels::Distance;
// labels: (batch,) int64.
// dist (batch, batch) = the distances of pair_distance from gram, the (batch, batch) Gram matrix.
// rep: the rows' representatives (pair_distance in triplet_select.h), nullptr for none.
cudaError_t launch_triplet_distance(DType acc_dtype, const void* gram, int64_t batch, int distance,
                                    const int64_t* rep, void* dist, cudaStream_t stream);
// stats: (batch, 3); coef: (batch, batch), zero-filled by the caller, receives W^T.
cudaError_t launch_triplet_reduce(DType acc_dtype, const void* dist, const int64_t* labels, int64_t batch,
                                  int mining, int distance, double margin, bool soft, void* stats, void* coef,
                                  cudaStream_t stream);
// counts[a] = the number of terms of anchor a (depends on the labels only).
cudaError_t launch_triplet_count(const int64_t* labels, int64_t batch, int mining, int64_t* counts,
                                 cudaStream_t stream);
// Anchor a writes its terms from offsets[a] on: terms (T,), triplets (T, 3) int64, slopes (T, 2).
cudaError_t launch_triplet_fill(DType acc_dtype, const void* dist, const int64_t* labels, int64_t batch,
                                int mining, int distance, double margin, bool soft, const int64_t* offsets,
                                void* terms, int64_t* triplets, void* slopes, cudaStream_t stream);

}  // namespace facekernels
