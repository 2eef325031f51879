"""Backward kernels of the fused margin-softmax cross-entropy: tiles are recomputed from (x, W, lse).

For a tile, with g_i the upstream gradient of row i's loss (0 for ignored rows):
  dz_ij = g_i (softmax(z_i)_j - [j = y_i]),   softmax(z_i)_j = exp(z_ij - lse_i)
  dc_ij = dz_ij * s * (phi'(c_i) on the target, N'(c_ij) elsewhere) * [-1 < raw_ij < 1]
  dx_hat_i = sum_j dc_ij w_hat_j,   dw_hat_j = sum_i dc_ij x_hat_i
and the normalisation backward dx_i = (dx_hat_i - x_hat_i (x_hat_i . dx_hat_i)) * inv_x_i. The projection
x_hat_i . dx_hat_i = sum_j dc_ij (x_hat_i . w_hat_j) = sum_j dc_ij raw_ij is a sum over the tile's cosines,
so a program that owns only a slice of the feature dimension still finishes its own slice (and the
same for w_j with sum_i dc_ij raw_ij).

Work split (no atomics, deterministic):
* dW: a program owns BLOCK_C classes x BLOCK_D features and loops over every row block (B <= ~1024):
  its classes' gradient is complete in registers and written once, in the weight's dtype.
* dX: a reduction over all C classes. A program owns (row block, class split, feature slice) and writes
  its partial into a float32 (n_splits, B, d) buffer that torch sums over splits. Chosen over float32
  atomics into (B, d): deterministic, no contention on the few B*d addresses that all C/BLOCK_C class
  tiles would hit; n_splits <= 64 caps the buffer at 64 * B * d floats (128 MB at B = 1024, d = 512).
Both recompute the cosine tile with the full d: a feature slice narrower than d costs one recompute per
slice, which is why BLOCK_D is as wide as the registers allow.
(Cut Cross-Entropy instead lets every (row, class) tile add into both gradients with locks/atomics and
skips tiles whose softmax is negligible; Liger's fused linear CE materialises logits chunk by chunk.)
"""

import triton
import triton.language as tl

from .margin_ce_fwd import logit_tile, raw_cosine_tile


@triton.jit
def _grad_cosine_tile(X, W, rows, cols, row_mask, col_mask, inv_x, inv_w, target, phi, dphi, tau, lse, g, t,
                      mv_t, s, D, stride_x, stride_w, NEGATIVES: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(dloss/d raw cosine, raw cosine) of a (rows, cols) tile; 0 outside the masks."""
    raw = raw_cosine_tile(X, W, rows, cols, row_mask, col_mask, inv_x, inv_w, D, stride_x, stride_w,
                          BLOCK_B, BLOCK_C, BLOCK_K, DOT_PRECISION)
    z, dz_draw, is_target = logit_tile(raw, cols, target, phi, dphi, tau, t, mv_t, s, NEGATIVES)
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (p - is_target.to(tl.float32))
    dc = tl.where(row_mask[:, None] & col_mask[None, :], dz * dz_draw, 0.0)
    return dc, raw


@triton.jit
def _dx_partial_kernel(X, W, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, dphi_ptr, tau_ptr, t_ptr, lse_ptr,
                       g_ptr, dx_part_ptr,
                       B, C, D, stride_x, stride_w, classes_per_split, s, mv_t,
                       NEGATIVES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, class split, feature slice): its split's share of dx for its rows and slice,
    already through the normalisation backward (linear, so the split shares add up to dx)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1).to(tl.int64)
    feats = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    feat_mask = feats < D
    inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    phi = tl.load(phi_ptr + rows, mask=row_mask, other=0.0)
    dphi = tl.load(dphi_ptr + rows, mask=row_mask, other=0.0)
    tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    dx_hat = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
    proj = tl.zeros((BLOCK_B,), tl.float32)
    c_begin = split * classes_per_split
    c_end = tl.minimum(c_begin + classes_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < c_end
        inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
        dc, raw = _grad_cosine_tile(X, W, rows, cols, row_mask, col_mask, inv_x, inv_w, target, phi, dphi, tau,
                                    lse, g, t, mv_t, s, D, stride_x, stride_w, NEGATIVES, BLOCK_B, BLOCK_C,
                                    BLOCK_K, DOT_PRECISION)
        proj += tl.sum(dc * raw, axis=1)
        w = tl.load(W + cols[:, None] * stride_w + feats[None, :], mask=col_mask[:, None] & feat_mask[None, :],
                    other=0.0)
        # w_hat_j = w_j * inv_w_j: scale dc's columns, multiply the raw rows (tensor cores for bf16/fp16)
        dx_hat = tl.dot((dc * inv_w[None, :]).to(w.dtype), w, dx_hat, input_precision=DOT_PRECISION)
    x = tl.load(X + rows[:, None] * stride_x + feats[None, :], mask=row_mask[:, None] & feat_mask[None, :],
                other=0.0).to(tl.float32)
    dx = (dx_hat - x * inv_x[:, None] * proj[:, None]) * inv_x[:, None]
    out = dx_part_ptr + (split * B + rows[:, None]) * D + feats[None, :]
    tl.store(out, dx, mask=row_mask[:, None] & feat_mask[None, :])


@triton.jit
def _dw_kernel(X, W, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, dphi_ptr, tau_ptr, t_ptr, lse_ptr, g_ptr, dw_ptr,
               B, C, D, stride_x, stride_w, stride_dw, s, mv_t,
               NEGATIVES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (class tile, feature slice): the complete dw of its classes and slice, over all rows."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    feats = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < C
    feat_mask = feats < D
    inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    dw_hat = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    proj = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
        phi = tl.load(phi_ptr + rows, mask=row_mask, other=0.0)
        dphi = tl.load(dphi_ptr + rows, mask=row_mask, other=0.0)
        tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
        dc, raw = _grad_cosine_tile(X, W, rows, cols, row_mask, col_mask, inv_x, inv_w, target, phi, dphi, tau,
                                    lse, g, t, mv_t, s, D, stride_x, stride_w, NEGATIVES, BLOCK_B, BLOCK_C,
                                    BLOCK_K, DOT_PRECISION)
        proj += tl.sum(dc * raw, axis=0)
        x = tl.load(X + rows[:, None] * stride_x + feats[None, :], mask=row_mask[:, None] & feat_mask[None, :],
                    other=0.0)
        dw_hat = tl.dot(tl.trans((dc * inv_x[:, None]).to(x.dtype)), x, dw_hat, input_precision=DOT_PRECISION)
    w = tl.load(W + cols[:, None] * stride_w + feats[None, :], mask=col_mask[:, None] & feat_mask[None, :],
                other=0.0).to(tl.float32)
    dw = (dw_hat - w * inv_w[:, None] * proj[:, None]) * inv_w[:, None]
    out = dw_ptr + cols[:, None] * stride_dw + feats[None, :]
    tl.store(out, dw.to(dw_ptr.dtype.element_ty), mask=col_mask[:, None] & feat_mask[None, :])
