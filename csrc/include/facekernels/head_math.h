// The margin-softmax head math, written once for every C++ / CUDA backend (shared/spec/heads.md).
// No torch include: a .cu kernel compiled by plain nvcc can include it.
//
// Every head is one point of the parametrisation of facekernels/_params.py:
//   phi_raw(c) = cos(m1 * theta + m2) - m3,  theta = acos(c)          (target before the fallback)
//   phi(c)     = phi_raw(c) on its valid range, else c - fallback_offset (derivative 1) (Fallback)
//   tau(c)     = phi_raw(c)                     (hard-negative threshold: the value *before* any fallback)
//   N(c)       = c, (t + 1) c + t  or  c (t + c) for hard negatives c_j > tau (Negatives)
// and the logits are z_j = s N(c_j) (s c_j for the easy ones), z_y = s phi(c_y).
#pragma once

#include <cmath>
#include <cstdint>

#include "facekernels/common.h"

namespace facekernels {

using std::acos;
using std::cos;
using std::sin;

// Same values as facekernels._params.Fallback / Negatives (IntEnum).
enum class Fallback : int32_t { kNone = 0, kMonotonic = 1, kPositive = 2, kAboveM3 = 3 };
enum class Negatives : int32_t { kPlain = 0, kMV = 1, kCurricular = 2 };

// sin(theta) = sqrt(1 - c^2) is floored here in the exact derivative (facekernels._params.SIN_THETA_EPS).
constexpr double kSinThetaEps = 1e-6;

// Plain-old-data hyper-parameters of one head (HeadParams minus reduction / ignore_index, plus the
// constants derived from them once on the host). Build it with make_head_math().
struct HeadMath {
  double s;
  double m1, m2, m3;
  double cos_m2, sin_m2;      // of m2, for the m1 = 1 closed form
  double fallback_threshold;  // phi = phi_raw above it (unused for kNone)
  double fallback_offset;     // phi = c - fallback_offset below it
  double mv_t;                // MV-Softmax's fixed t
  Fallback fallback;
  Negatives negatives;
  bool target_is_linear;  // m1 = 1 and m2 = 0: phi_raw = c - m3 exactly, no sqrt / acos
  bool exact_margin_grad;  // false: margin_grad="straight_through", phi' := 1
};

// Mirrors HeadParams.fallback_threshold / fallback_offset:
//   kMonotonic (ArcFace official): phi_raw is used while theta + m2 < pi, i.e. c > cos(pi - m2); below,
//     phi = c - sin(pi - m2) m2 keeps phi decreasing in theta (insightface's th / mm constants).
//   kPositive (easy_margin, MV-Arc): c > 0.   kAboveM3 (MV-AM): c > m3.
FK_HOST_DEVICE HeadMath make_head_math(double s, double m1, double m2, double m3, int32_t fallback,
                                       int32_t negatives, double mv_t, bool exact_margin_grad) {
  const double pi = 3.14159265358979323846;
  HeadMath p{};
  p.s = s;
  p.m1 = m1;
  p.m2 = m2;
  p.m3 = m3;
  p.cos_m2 = cos(m2);
  p.sin_m2 = sin(m2);
  p.fallback = static_cast<Fallback>(fallback);
  p.negatives = static_cast<Negatives>(negatives);
  p.fallback_threshold = p.fallback == Fallback::kMonotonic ? cos(pi - m2)
                         : p.fallback == Fallback::kAboveM3 ? m3
                                                            : 0.0;
  p.fallback_offset = p.fallback == Fallback::kMonotonic ? sin(pi - m2) * m2 : 0.0;
  p.mv_t = mv_t;
  p.target_is_linear = m1 == 1.0 && m2 == 0.0;
  p.exact_margin_grad = exact_margin_grad;
  return p;
}

template <typename T>
struct TargetLogit {
  T phi;   // target logit / s
  T dphi;  // d phi / d c (1 on the fallback branch and under straight_through)
  T tau;   // hard-negative threshold: phi_raw, before the fallback
};

// phi, phi' and tau of a target cosine c in [-1, 1].
//   phi_raw = cos(m1 theta + m2) - m3, and with d theta / dc = -1 / sin(theta):
//   phi_raw' = m1 sin(m1 theta + m2) / sin(theta);
//   for m1 = 1, cos(theta + m2) = c cos m2 - sin(theta) sin m2, phi_raw' = cos m2 + c sin m2 / sin(theta);
//   for m1 = 1, m2 = 0 (CosFace, NormSoftmax, MV-AM), phi_raw = c - m3 exactly, phi_raw' = 1.
// sin(theta) is floored at kSinThetaEps in the derivatives only (the value uses the true sqrt).
template <typename T>
FK_HOST_DEVICE TargetLogit<T> target_logit(T c, const HeadMath& p) {
  T phi_raw, dphi_raw;
  if (p.target_is_linear) {
    phi_raw = c - T(p.m3);
    dphi_raw = T(1);
  } else {
    const T sin_theta = sqrt(fmax(T(1) - c * c, T(0)));
    const T sin_theta_floored = fmax(sin_theta, T(kSinThetaEps));
    if (p.m1 == 1.0) {
      phi_raw = c * T(p.cos_m2) - sin_theta * T(p.sin_m2) - T(p.m3);
      dphi_raw = T(p.cos_m2) + c * T(p.sin_m2) / sin_theta_floored;
    } else {
      const T angle = T(p.m1) * acos(c) + T(p.m2);
      phi_raw = cos(angle) - T(p.m3);
      dphi_raw = T(p.m1) * sin(angle) / sin_theta_floored;
    }
  }
  TargetLogit<T> out{phi_raw, dphi_raw, phi_raw};
  if (p.fallback != Fallback::kNone && !(c > T(p.fallback_threshold))) {
    out.phi = c - T(p.fallback_offset);
    out.dphi = T(1);
  }
  if (!p.exact_margin_grad) out.dphi = T(1);  // straight-through: phi' := 1
  return out;
}

template <typename T>
struct NegativeLogit {
  T value;       // N(c): the logit / s of a non-target class
  T derivative;  // N'(c)
};

// N(c) of a non-target cosine c, given the row's threshold tau and CurricularFace's t.
//   plain:      N = c                                   (no mask: every negative is "easy")
//   MV:         N = (t + 1) c + t,  N' = t + 1          for hard negatives c > tau (MV-Softmax, fixed t)
//   Curricular: N = c (t + c),      N' = t + 2c         (t is a buffer, not differentiated)
// The hard mask c > tau is a constant for differentiation (spec).
template <typename T>
FK_HOST_DEVICE NegativeLogit<T> negative_logit(T c, T tau, T t, const HeadMath& p) {
  if (p.negatives == Negatives::kPlain || !(c > tau)) return {c, T(1)};
  if (p.negatives == Negatives::kMV) return {(T(p.mv_t) + T(1)) * c + T(p.mv_t), T(p.mv_t) + T(1)};
  return {c * (t + c), t + T(2) * c};
}

// c = clamp(raw, -1, 1); d c / d raw = 1 strictly inside (-1, 1), 0 elsewhere (spec: dc/dx_hat).
// Comparisons, not fmin / fmax, so that a NaN cosine stays NaN (like torch.clamp) instead of becoming +-1.
template <typename T>
FK_HOST_DEVICE T clamp_unit(T raw) {
  return raw < T(-1) ? T(-1) : (raw > T(1) ? T(1) : raw);
}

template <typename T>
FK_HOST_DEVICE bool inside_unit(T raw) {
  return raw > T(-1) && raw < T(1);
}

// CurricularFace: t <- momentum * mean(c_target over valid rows) + (1 - momentum) * t, before the
// negatives are formed (Huang et al. 2020, Eq. 9). Computed in double like the reference; a batch without a
// valid row leaves t unchanged.
FK_HOST_DEVICE double curricular_t_update(double t, double target_cosine_sum, int64_t valid_rows,
                                          double momentum) {
  if (valid_rows == 0) return t;
  return momentum * (target_cosine_sum / double(valid_rows)) + (1.0 - momentum) * t;
}

}  // namespace facekernels
