"""The head math of ``docs/heads.md`` as ``@triton.jit`` helpers: the one Triton definition.

What is per (row, class) lives here. The per-row target math (phi, phi', tau, t) is defined in torch
(``facekernels/_rowmath.py``) for every backend; ``target_logit`` is its Triton mirror for the heads' own
(scalar) margins, which the CUDA forward's one pre-pass kernel uses (tests/test_target_rows.py checks the two
against each other). The structural choices (which N, which fallback) are constexprs; the numbers (s, the
margins, MV's t, CurricularFace's t) are runtime values, so new margins do not recompile.
"""

import triton
import triton.language as tl

from ..._params import SIN_THETA_EPS as _SIN_THETA_EPS

SIN_THETA_EPS = tl.constexpr(_SIN_THETA_EPS)  # the floor of sin(theta) in phi'


@triton.jit
def clamp_cosine(raw, bound):
    """clamp(raw, -bound, bound) (bound 1, or AdaFace's 1 - eps) that keeps NaN: tl.maximum / tl.minimum drop
    NaN operands (fmax semantics), which would turn a NaN embedding into a finite loss instead of a NaN one."""
    return tl.where(raw != raw, raw, tl.minimum(tl.maximum(raw, -bound), bound))


@triton.jit
def negative_logit(c, hard, t, mv_t, filter_threshold, NEGATIVES: tl.constexpr, FILTER: tl.constexpr):
    """(N(c), N'(c)) for non-target cosines c; hard = c > tau (a constant for differentiation).

    NEGATIVES 0 (plain): N(c) = c. 1 (MV-Softmax, fixed t): hard ones (t + 1) c + t, N' = t + 1.
    2 (CurricularFace, running t, not differentiated): hard ones c (t + c), N' = t + 2 c.
    Easy negatives keep N(c) = c, N' = 1. FILTER (insightface's inter-class filtering, plain heads): a negative
    with c > filter_threshold gets N = 0, N' = 0 (the logit 0, still counted in the row's sum).
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
    if FILTER:
        filtered = c > filter_threshold
        n = tl.where(filtered, 0.0, n)
        dn = tl.where(filtered, 0.0, dn)
    return n, dn


@triton.jit
def subcenter_max(best, index, raw, i):
    """Fold sub-center i's raw cosines into the running (max, index of the first maximum); a NaN wins (NaN in,
    NaN out)."""
    better = (raw > best) | ((raw != raw) & (best == best))
    return tl.where(better, raw, best), tl.where(better, i, index)


@triton.jit
def logit_tile(raw, cols, target, phi, dphi, tau, t, mv_t, s, bound, filter_threshold, NEGATIVES: tl.constexpr,
               FILTER: tl.constexpr):
    """Logits z = s * (phi on the target column, N(c) elsewhere) of a raw cosine tile, and dz/d(raw):
    s * phi' on the target column (phi' already holds the clamp's derivative there, _rowmath), s * N'(c)
    times the clamp's derivative (1 strictly inside (-bound, bound), else 0) elsewhere. The hard-negative and
    filter masks are constants (spec). cols and target are int32."""
    c = clamp_cosine(raw, bound)
    is_target = cols[None, :] == target[:, None]
    n, dn = negative_logit(c, c > tau[:, None], t, mv_t, filter_threshold, NEGATIVES, FILTER)
    z = s * tl.where(is_target, phi[:, None], n)
    inside = (raw > -bound) & (raw < bound)
    dz_draw = s * tl.where(is_target, dphi[:, None], tl.where(inside, dn, 0.0))
    return z, dz_draw, is_target


@triton.jit
def target_logit(c, cos_m2, sin_m2, m3, threshold, offset, LINEAR: tl.constexpr, FALLBACK: tl.constexpr,
                 STRAIGHT_THROUGH: tl.constexpr):
    """(phi, phi', tau) of target cosines c (float32) for the head's own margins with m1 = 1: ``_rowmath``'s
    target_logit without the per-row margins, the acos branch (m1 != 1) and Fallback.CLIP, which stay in torch.

    phi_raw = c - m3 (LINEAR), else c cos m2 - sin(theta) sin m2 - m3 with phi_raw' = cos m2 + c sin m2 /
    max(sin theta, eps); tau = phi_raw. FALLBACK: phi = c - offset, phi' = 1 where not c > threshold (the branch's
    constants from ``_rowmath.fallback_branch``). STRAIGHT_THROUGH: phi' = 1."""
    if LINEAR:
        phi_raw = c - m3
        dphi_raw = tl.full(c.shape, 1.0, tl.float32)
    else:
        sin_theta = tl.sqrt(tl.maximum(1.0 - c * c, 0.0))  # a NaN c makes phi and phi' NaN through c itself
        phi_raw = c * cos_m2 - sin_theta * sin_m2 - m3
        dphi_raw = cos_m2 + c * sin_m2 / tl.where(sin_theta < SIN_THETA_EPS, SIN_THETA_EPS, sin_theta)
    phi, dphi = phi_raw, dphi_raw
    if FALLBACK:
        use_raw = c > threshold
        phi = tl.where(use_raw, phi_raw, c - offset)
        dphi = tl.where(use_raw, dphi_raw, 1.0)
    if STRAIGHT_THROUGH:
        dphi = tl.full(c.shape, 1.0, tl.float32)
    return phi, dphi, phi_raw
