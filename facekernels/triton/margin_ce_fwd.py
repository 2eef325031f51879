"""Forward kernels of the fused margin-softmax cross-entropy: the O(B + C) pre-pass (inverse row norms,
target cosines and the target logit) and the class-split online log-sum-exp.

Normalisation is folded into the tiles: cos_ij = (x_i . w_j) * inv_x_i * inv_w_j with inv = 1 / max(||row||,
NORM_EPS) precomputed per row, so the operands of tl.dot are the raw inputs (bfloat16 / float16 tensor
cores, float32 accumulation) and no normalised copy of W is made. Logits never leave the registers; they
are float32 (s = 64 times a cosine overflows no float32 exp after the max is subtracted).

Offsets: rows and classes are widened to int64 before they multiply a stride (C * d > 2^31 at a few
million classes).
"""

import triton
import triton.language as tl

from .head_math import clamp_cosine, negative_logit, target_logit


@triton.jit
def _inv_norm_kernel(X, out_ptr, n_rows, D, stride_x, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, eps):
    """out_r = 1 / max(||x_r||, eps) in float32, BLOCK_R rows per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    sq = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=row_mask[:, None] & (k < D)[None, :], other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sq), eps), mask=row_mask)


@triton.jit
def _target_kernel(X, W, target_ptr, inv_x_ptr, inv_w_ptr, c_ptr, phi_ptr, dphi_ptr, tau_ptr,
                   B, D, stride_x, stride_w,
                   m1, cos_m2, sin_m2, m2, m3, threshold, offset, sin_theta_eps,
                   TARGET_FORM: tl.constexpr, FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: c_i = clamp(x_hat_i . w_hat_(y_i), -1, 1) and (phi, phi', tau)(c_i); rows whose target is
    -1 (ignored) get c = 0 (their loss and gradient are zeroed by the caller)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    valid = row_mask & (target >= 0)
    safe = tl.where(valid, target, 0).to(tl.int64)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = valid[:, None] & (k < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + safe[:, None] * stride_w + k[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(x * w, axis=1)
    inv_x = tl.load(inv_x_ptr + rows, mask=valid, other=0.0)
    inv_w = tl.load(inv_w_ptr + safe, mask=valid, other=0.0)
    c = clamp_cosine(dot * inv_x * inv_w)
    phi, dphi, tau = target_logit(c, m1, cos_m2, sin_m2, m2, m3, threshold, offset, sin_theta_eps,
                                  TARGET_FORM, FALLBACK, STRAIGHT_THROUGH)
    tl.store(c_ptr + rows, c, mask=row_mask)
    tl.store(phi_ptr + rows, phi, mask=row_mask)
    tl.store(dphi_ptr + rows, dphi, mask=row_mask)
    tl.store(tau_ptr + rows, tau, mask=row_mask)


@triton.jit
def _target_logit_kernel(c_ptr, phi_ptr, dphi_ptr, tau_ptr, B,
                         m1, cos_m2, sin_m2, m2, m3, threshold, offset, sin_theta_eps,
                         TARGET_FORM: tl.constexpr, FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """(phi, phi', tau) of given target cosines c (the class-sharded mode: c all-reduced over the shards)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    c = tl.load(c_ptr + rows, mask=row_mask, other=0.0)
    phi, dphi, tau = target_logit(c, m1, cos_m2, sin_m2, m2, m3, threshold, offset, sin_theta_eps,
                                  TARGET_FORM, FALLBACK, STRAIGHT_THROUGH)
    tl.store(phi_ptr + rows, phi, mask=row_mask)
    tl.store(dphi_ptr + rows, dphi, mask=row_mask)
    tl.store(tau_ptr + rows, tau, mask=row_mask)


@triton.jit
def raw_cosine_tile(X, W, rows, cols, row_mask, col_mask, inv_x, inv_w, D, stride_x, stride_w,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """x_hat_rows . w_hat_cols^T (BLOCK_B, BLOCK_C) in float32, before the clamp; rows, cols int64."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < D
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + cols[:, None] * stride_w + k[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc * inv_x[:, None] * inv_w[None, :]


@triton.jit
def logit_tile(raw, cols, target, phi, dphi, tau, t, mv_t, s, NEGATIVES: tl.constexpr):
    """Logits z = s * (phi on the target column, N(c) elsewhere) of a raw cosine tile, and dz/d(raw):
    s * (phi' or N'(c)) times the clamp's derivative (1 strictly inside (-1, 1), else 0).
    The hard-negative mask c > tau is a constant (spec)."""
    c = clamp_cosine(raw)
    is_target = cols[None, :] == target[:, None]
    n, dn = negative_logit(c, c > tau[:, None], t, mv_t, NEGATIVES)
    z = s * tl.where(is_target, phi[:, None], n)
    inside = (raw > -1.0) & (raw < 1.0)
    dz_draw = tl.where(inside, s * tl.where(is_target, dphi[:, None], dn), 0.0)
    return z, dz_draw, is_target


@triton.jit
def _lse_partial_kernel(X, W, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, tau_ptr, t_ptr,
                        part_max_ptr, part_sum_ptr,
                        B, C, D, stride_x, stride_w, classes_per_split, n_splits, s, mv_t,
                        NEGATIVES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, class split): online (max, sum exp(z - max)) of its rows over its classes.

    Axis 0 (row blocks) varies fastest in launch order, so the programs that read the same W tiles run
    together and share them through L2 (W is read from HBM about once, not once per row block).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1).to(tl.int64)
    row_mask = rows < B
    inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    phi = tl.load(phi_ptr + rows, mask=row_mask, other=0.0)
    tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < c_end
        inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
        raw = raw_cosine_tile(X, W, rows, cols, row_mask, col_mask, inv_x, inv_w, D, stride_x, stride_w,
                              BLOCK_B, BLOCK_C, BLOCK_K, DOT_PRECISION)
        z, _, _ = logit_tile(raw, cols, target, phi, phi, tau, t, mv_t, s, NEGATIVES)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    out = rows * n_splits + split
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=row_mask)
