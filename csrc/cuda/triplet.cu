// CUDA kernels of the fused triplet ops: the distance matrix D from the Gram matrix (which the glue
// computes with cuBLAS), then one thread per anchor running the mining of facekernels/triplet_select.h
// (the same code as the CPU kernel). Thread a reads column a of D, equal to row a since D is exactly
// symmetric, so that the threads of a warp read consecutive addresses; for the same reason it writes
// column a of coef (coef = W^T, see csrc/cpu/triplet.cpp). Each thread owns its anchor's outputs (stats
// row, coef column, slice of the terms): no atomics, deterministic. Includes only CUDA and our own
// headers (plain `nvcc -c` in CI).
#include "facekernels/cuda_launchers.h"
#include "facekernels/triplet_select.h"

namespace facekernels {
namespace {

// One warp per block: with one thread per anchor a batch of 4096 is only 128 warps, and small blocks
// spread them over every SM instead of a quarter of them.
constexpr int kThreads = 32;
constexpr int kTileX = 32, kTileY = 8;  // distance kernel: a warp per 32 consecutive columns

__device__ __forceinline__ int64_t anchor_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

unsigned blocks_for(int64_t batch) { return static_cast<unsigned>((batch + kThreads - 1) / kThreads); }

template <typename Acc>
__global__ void triplet_distance_kernel(const Acc* __restrict__ gram, int64_t batch, Distance distance,
                                        const int64_t* __restrict__ rep, Acc* __restrict__ dist) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileX + threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kTileY + threadIdx.y;
  if (i >= batch || j >= batch) return;
  dist[i * batch + j] = pair_distance(distance, gram, batch, rep, i, j);
}

template <typename Acc>
__global__ void triplet_reduce_kernel(const Acc* __restrict__ dist, const int64_t* __restrict__ labels,
                                      int64_t batch, Mining mining, Distance distance, Acc margin, bool soft,
                                      Acc* __restrict__ stats, Acc* __restrict__ coef) {
  const int64_t a = anchor_index();
  if (a >= batch) return;
  const AnchorRow<Acc> row{dist + a, batch, labels, batch, a, distance};
  reduce_anchor(row, mining, margin, soft, stats + 3 * a, coef + a, batch);
}

__global__ void triplet_count_kernel(const int64_t* __restrict__ labels, int64_t batch, Mining mining,
                                     int64_t* __restrict__ counts) {
  const int64_t a = anchor_index();
  if (a >= batch) return;
  // the count reads the labels only: no Gram matrix needed
  counts[a] = count_anchor_terms(AnchorRow<float>{nullptr, 0, labels, batch, a, Distance::kSquaredEuclidean},
                                 mining);
}

template <typename Acc>
__global__ void triplet_fill_kernel(const Acc* __restrict__ dist, const int64_t* __restrict__ labels,
                                    int64_t batch, Mining mining, Distance distance, Acc margin, bool soft,
                                    const int64_t* __restrict__ offsets, Acc* __restrict__ terms,
                                    int64_t* __restrict__ triplets, Acc* __restrict__ slopes) {
  const int64_t a = anchor_index();
  if (a >= batch) return;
  const AnchorRow<Acc> row{dist + a, batch, labels, batch, a, distance};
  fill_anchor_terms(row, mining, margin, soft, offsets[a], terms, triplets, slopes);
}

}  // namespace

cudaError_t launch_triplet_distance(DType acc_dtype, const void* gram, int64_t batch, int distance,
                                    const int64_t* rep, void* dist, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const dim3 block(kTileX, kTileY);
  // grid.y <= 65535 holds for batch < 524k
  const dim3 grid(static_cast<unsigned>((batch + kTileX - 1) / kTileX),
                  static_cast<unsigned>((batch + kTileY - 1) / kTileY));
  const auto d = static_cast<Distance>(distance);
  switch (acc_dtype) {
    case DType::kFloat32:
      triplet_distance_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(gram), batch, d, rep,
                                                                 static_cast<float*>(dist));
      return cudaGetLastError();
    case DType::kFloat64:
      triplet_distance_kernel<double><<<grid, block, 0, stream>>>(static_cast<const double*>(gram), batch, d, rep,
                                                                  static_cast<double*>(dist));
      return cudaGetLastError();
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_triplet_reduce(DType acc_dtype, const void* dist, const int64_t* labels, int64_t batch,
                                  int mining, int distance, double margin, bool soft, void* stats, void* coef,
                                  cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const auto m = static_cast<Mining>(mining);
  const auto d = static_cast<Distance>(distance);
  switch (acc_dtype) {
    case DType::kFloat32:
      triplet_reduce_kernel<float><<<blocks_for(batch), kThreads, 0, stream>>>(
          static_cast<const float*>(dist), labels, batch, m, d, static_cast<float>(margin), soft,
          static_cast<float*>(stats), static_cast<float*>(coef));
      return cudaGetLastError();
    case DType::kFloat64:
      triplet_reduce_kernel<double><<<blocks_for(batch), kThreads, 0, stream>>>(
          static_cast<const double*>(dist), labels, batch, m, d, margin, soft, static_cast<double*>(stats),
          static_cast<double*>(coef));
      return cudaGetLastError();
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_triplet_count(const int64_t* labels, int64_t batch, int mining, int64_t* counts,
                                 cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  triplet_count_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(labels, batch, static_cast<Mining>(mining),
                                                                     counts);
  return cudaGetLastError();
}

cudaError_t launch_triplet_fill(DType acc_dtype, const void* dist, const int64_t* labels, int64_t batch,
                                int mining, int distance, double margin, bool soft, const int64_t* offsets,
                                void* terms, int64_t* triplets, void* slopes, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const auto m = static_cast<Mining>(mining);
  const auto d = static_cast<Distance>(distance);
  switch (acc_dtype) {
    case DType::kFloat32:
      triplet_fill_kernel<float><<<blocks_for(batch), kThreads, 0, stream>>>(
          static_cast<const float*>(dist), labels, batch, m, d, static_cast<float>(margin), soft, offsets,
          static_cast<float*>(terms), triplets, static_cast<float*>(slopes));
      return cudaGetLastError();
    case DType::kFloat64:
      triplet_fill_kernel<double><<<blocks_for(batch), kThreads, 0, stream>>>(
          static_cast<const double*>(dist), labels, batch, m, d, margin, soft, offsets,
          static_cast<double*>(terms), triplets, static_cast<double*>(slopes));
      return cudaGetLastError();
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace facekernels
