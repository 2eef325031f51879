"""The per-class head math of ``docs/heads.md`` as ``@triton.jit`` helpers: the one Triton definition.

The per-row target math (phi, phi', tau, t) is computed once in torch (``facekernels/_rowmath.py``) for every
backend and reaches the kernels as per-row tensors; what is per (row, class) lives here. The structural
choice (which N) is a constexpr; the numbers (s, MV's t, CurricularFace's t) are runtime values, so new
margins do not recompile.
"""

import triton
import triton.language as tl


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
