"""The head math of ``shared/spec/heads.md`` as ``@triton.jit`` helpers: the one Triton definition.

Every head is a point of the (m1, m2, m3, fallback, negatives) parametrisation of ``facekernels/_params.py``.
The structural choices are constexprs (a handful of compiled variants); the numbers (s, m1, m2, m3, the
fallback's threshold and offset, t) are runtime arguments, so new margins do not recompile.

TARGET_FORM (constexpr): 0 linear (m1 = 1, m2 = 0: phi_raw = c - m3, no acos), 1 arc (m1 = 1: the
closed form of cos(theta + m2)), 2 general (m1 != 1: cos(m1 acos(c) + m2), acos by polynomial below).
"""

import triton
import triton.language as tl

TARGET_LINEAR = 0
TARGET_ARC = 1
TARGET_GENERAL = 2


@triton.jit
def acos_f32(c):
    """acos(c) for c in [-1, 1] in float32, |error| <= 2e-8 (+ float32 rounding).

    Abramowitz & Stegun 4.4.46: acos(x) = sqrt(1 - x) * P7(x) on [0, 1], and acos(-x) = pi - acos(x).
    A polynomial because no acos is portable here: triton.language.math has none, and libdevice.acos
    fails under the interpreter of triton 3.9 (the CPU test path); tests/test_triton_heads.py checks this
    against torch.acos in float64. The sqrt(1 - x) factor keeps the relative accuracy as x -> 1, where
    acos(x) ~ sqrt(2 (1 - x)).
    """
    x = tl.abs(c)
    p = -0.0012624911
    p = p * x + 0.0066700901
    p = p * x - 0.0170881256
    p = p * x + 0.0308918810
    p = p * x - 0.0501743046
    p = p * x + 0.0889789874
    p = p * x - 0.2145988016
    p = p * x + 1.5707963050
    r = tl.sqrt(tl.maximum(1.0 - x, 0.0)) * p
    return tl.where(c < 0, 3.14159265358979 - r, r)


@triton.jit
def clamp_cosine(raw):
    """clamp(raw, -1, 1) that keeps NaN: tl.maximum / tl.minimum drop NaN operands (fmax semantics), which
    would turn a NaN embedding into a finite loss instead of a NaN one."""
    return tl.where(raw != raw, raw, tl.minimum(tl.maximum(raw, -1.0), 1.0))


@triton.jit
def target_logit(c, m1, cos_m2, sin_m2, m2, m3, threshold, offset, sin_theta_eps,
                 TARGET_FORM: tl.constexpr, FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr):
    """(phi, phi', tau) of target cosines c (float32), like facekernels.reference.heads.target_logit.

    phi_raw(c) = cos(m1 theta + m2) - m3, theta = acos c, and d theta / dc = -1 / sin theta, so
      phi_raw'(c) = m1 sin(m1 theta + m2) / sin theta                       (general)
                  = cos m2 + c sin m2 / sin theta                            (m1 = 1: cos(theta + m2) =
                                                                              c cos m2 - sin theta sin m2)
    with sin theta = sqrt(1 - c^2) floored at sin_theta_eps in the divisions (finite at c = +-1).
    tau, the hard-negative threshold, is phi_raw before any fallback. Fallbacks (phi = c - offset,
    derivative 1): FALLBACK 1 (monotonic) / 2 (positive) / 3 (above m3) use phi_raw where c > threshold,
    0 uses it everywhere. STRAIGHT_THROUGH sets phi' := 1 (insightface's arcface_torch).
    """
    if TARGET_FORM == 0:
        phi_raw = c - m3
        dphi_raw = tl.full(c.shape, 1.0, tl.float32)
    else:
        sin_theta = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))
        if TARGET_FORM == 1:
            phi_raw = c * cos_m2 - sin_theta * sin_m2 - m3
            dphi_raw = cos_m2 + c * sin_m2 / tl.maximum(sin_theta, sin_theta_eps)
        else:
            angle = m1 * acos_f32(c) + m2
            phi_raw = tl.cos(angle) - m3
            dphi_raw = m1 * tl.sin(angle) / tl.maximum(sin_theta, sin_theta_eps)
    if FALLBACK == 0:
        phi = phi_raw
        dphi = dphi_raw
    else:
        use_raw = c > threshold
        phi = tl.where(use_raw, phi_raw, c - offset)
        dphi = tl.where(use_raw, dphi_raw, 1.0)
    if STRAIGHT_THROUGH:
        dphi = tl.full(c.shape, 1.0, tl.float32)
    return phi, dphi, phi_raw


@triton.jit
def negative_logit(c, hard, t, mv_t, NEGATIVES: tl.constexpr):
    """(N(c), N'(c)) for non-target cosines c; hard = c > tau (a constant for differentiation).

    NEGATIVES 0 (plain): N(c) = c. 1 (MV-Softmax, fixed t): hard ones (t + 1) c + t, N' = t + 1.
    2 (CurricularFace, running t, not differentiated): hard ones c (t + c), N' = t + 2 c.
    Easy negatives keep N(c) = c, N' = 1.
    """
    if NEGATIVES == 0:
        n = c
        dn = tl.full(c.shape, 1.0, tl.float32)
    elif NEGATIVES == 1:
        n = tl.where(hard, (mv_t + 1.0) * c + mv_t, c)
        dn = tl.where(hard, mv_t + 1.0, 1.0)
    else:
        n = tl.where(hard, c * (t + c), c)
        dn = tl.where(hard, t + 2.0 * c, 1.0)
    return n, dn
