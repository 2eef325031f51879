// Small math shared by the CPU and CUDA builds. This header includes nothing from torch, so plain
// `nvcc -c` can compile every kernel file that uses it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FK_HOST_DEVICE inline
#endif

namespace facekernels {

using std::fmax;
using std::sqrt;

// x_hat = x / max(||x||, kNormEps): the eps of torch.nn.functional.normalize and of
// facekernels/_params.py's NORM_EPS.
constexpr double kNormEps = 1e-12;

template <typename Acc>
FK_HOST_DEVICE Acc inv_norm(Acc squared_norm) {
  return Acc(1) / fmax(sqrt(squared_norm), Acc(kNormEps));
}

// max(x, 0) that keeps NaN (fmax(NaN, 0) is 0): a NaN input must give a NaN loss, never a finite one.
template <typename Acc>
FK_HOST_DEVICE Acc relu_keep_nan(Acc x) {
  return (x > Acc(0) || x != x) ? x : Acc(0);
}

// clamp(x, -1, 1) that keeps NaN, like torch.clamp: fmin / fmax return the number when one side is NaN,
// which turned a NaN cosine into -1 (comparisons with NaN are false, so it falls through unchanged).
template <typename Acc>
FK_HOST_DEVICE Acc clamp_unit_keep_nan(Acc x) {
  return x < Acc(-1) ? Acc(-1) : (x > Acc(1) ? Acc(1) : x);
}

// c = clamp(x_hat . w_hat, -1, 1) from the three dot products x.w, x.x and w.w; NaN in, NaN out.
template <typename Acc>
FK_HOST_DEVICE Acc cosine_from_dots(Acc x_dot_w, Acc x_dot_x, Acc w_dot_w) {
  return clamp_unit_keep_nan(x_dot_w * inv_norm(x_dot_x) * inv_norm(w_dot_w));
}

}  // namespace facekernels
