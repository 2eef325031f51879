// The per-class head math of the fused C++ kernels (docs/heads.md), written once for the CPU and CUDA
// builds. No torch include: a .cu kernel compiled by plain nvcc can include it.
//
// The per-row target math (phi, phi', tau of the target cosine, CurricularFace's t) is O(B) and lives in
// torch, in facekernels/_rowmath.py, shared by every backend; the kernels receive it as per-row tensors and
// apply the per-class part here: the logits are z_j = s N(c_j) for the classes j != y, z_y = s phi.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "facekernels/common.h"

namespace facekernels {

// Same values as facekernels._params.Negatives (IntEnum).
enum class Negatives : int32_t { kPlain = 0, kMV = 1, kCurricular = 2 };

// What the per-class math needs of a head besides the per-row tensors.
struct NegativeMath {
  double s;     // logit scale
  double mv_t;  // MV-Softmax's fixed t
  Negatives negatives;
  double bound;   // every cosine is clamped to [-bound, bound] (1; AdaFace 1 - eps)
  double filter;  // inter-class filtering: a negative with c > filter gets the logit 0 (infinity: off)
};

template <typename T>
struct NegativeLogit {
  T value;       // N(c): the logit / s of a non-target class
  T derivative;  // N'(c)
};

// N(c) of a non-target cosine c, given the row's threshold tau and CurricularFace's t.
//   filtered:   N = 0,              N' = 0              c > filter (insightface's inter-class filtering: the
//                                                       logit 0, still in the row's sum; only on plain heads)
//   plain:      N = c                                   (no mask: every negative is "easy")
//   MV:         N = (t + 1) c + t,  N' = t + 1          for hard negatives c > tau (MV-Softmax, fixed t)
//   Curricular: N = c (t + c),      N' = t + 2c         (t is a buffer, not differentiated)
// The masks c > filter and c > tau are constants for differentiation (spec).
template <typename T>
FK_HOST_DEVICE NegativeLogit<T> negative_logit(T c, T tau, T t, const NegativeMath& p) {
  if (c > T(p.filter)) return {T(0), T(0)};
  if (p.negatives == Negatives::kPlain || !(c > tau)) return {c, T(1)};
  if (p.negatives == Negatives::kMV) return {(T(p.mv_t) + T(1)) * c + T(p.mv_t), T(p.mv_t) + T(1)};
  return {c * (t + c), t + T(2) * c};
}

// c = clamp(raw, -b, b); d c / d raw = 1 strictly inside (-b, b), 0 elsewhere (spec: dc/dx_hat; b = 1, or
// AdaFace's 1 - eps). Comparisons, not fmin / fmax, so that a NaN cosine stays NaN (like torch.clamp) instead
// of becoming +-b.
template <typename T>
FK_HOST_DEVICE T clamp_cosine(T raw, T b) {
  return raw < -b ? -b : (raw > b ? b : raw);
}

template <typename T>
FK_HOST_DEVICE bool inside_bound(T raw, T b) {
  return raw > -b && raw < b;
}

// A class's raw cosine with k sub-centers (Sub-center ArcFace): the max over its k consecutive values, and
// which one (the first maximum: it alone gets the gradient); a NaN wins, so that NaN in gives NaN out.
template <typename T>
struct SubcenterMax {
  T raw;
  int64_t index;
};

template <typename T>
FK_HOST_DEVICE SubcenterMax<T> subcenter_max(const T* raw, int64_t k) {
  SubcenterMax<T> best{raw[0], 0};
  for (int64_t i = 1; i < k; ++i) {
    if (raw[i] > best.raw || (raw[i] != raw[i] && best.raw == best.raw)) best = {raw[i], i};
  }
  return best;
}

// The target's margin-free rank (HeadStats.rank, facekernels/_rowmath.py beats_target): class j beats a target
// of clamped cosine tc in [-b, b] when !(clamp(raw_j, -b, b) <= tc): raw_j or tc NaN, or raw_j > tc with tc < b
// (no clamped cosine exceeds tc = b). That is !(raw_j <= threshold) with threshold = tc below b, +inf at b,
// -inf for a NaN tc: one compare per class and no clamp (the Triton kernel's _rank_threshold is the same).
template <typename T>
FK_HOST_DEVICE T rank_threshold(T target_cos, T b) {
  if (target_cos != target_cos) return -std::numeric_limits<T>::infinity();
  return target_cos < b ? target_cos : std::numeric_limits<T>::infinity();
}

// max(a, b) that returns NaN when either is NaN. std::max(m, NaN) is m, so a running max over logits
// would drop a NaN logit and a merge of partial log-sum-exps would skip the partial that holds it.
template <typename T>
FK_HOST_DEVICE T max_keep_nan(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : (a < b ? b : a);
}

}  // namespace facekernels
