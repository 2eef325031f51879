"""The per-class head math of ``docs/heads.md`` as ``@triton.jit`` helpers: the one Triton definition.

The per-row target math (phi, phi', tau, t) is computed once in torch (``facekernels/_rowmath.py``) for every
backend and reaches the kernels as per-row tensors; what is per (row, class) lives here. The structural
choice (which N) is a constexpr; the numbers (s, MV's t, CurricularFace's t) are runtime values, so new
margins do not recompile.
"""

import triton
import triton.language as tl


@triton.jit
def clamp_cosine(raw):
    """clamp(raw, -1, 1) that keeps NaN: tl.maximum / tl.minimum drop NaN operands (fmax semantics), which
    would turn a NaN embedding into a finite loss instead of a NaN one."""
    return tl.where(raw != raw, raw, tl.minimum(tl.maximum(raw, -1.0), 1.0))


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
