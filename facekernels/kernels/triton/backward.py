"""Backward kernel of the fused margin-softmax cross-entropy: the logits gradient of one class chunk, from
one recompute of its cosine tiles; the GEMMs that consume it run in cuBLAS (kernels/triton/__init__.py).

For a tile, with g_i the upstream gradient of row i's loss (0 for ignored rows):
  dz_ij = g_i (softmax(z_i)_j - [j = y_i]),   softmax(z_i)_j = exp(z_ij - lse_i)
  dc_ij = dz_ij * s * (phi'(c_i) on the target, N'(c_ij) elsewhere) * [-1 < raw_ij < 1]
The kernel writes D_ij = dc_ij * inv_x_i * inv_w_j (B, chunk) and the per-(row block, class) partial sums
P_j = sum_i dc_ij raw_ij. Then, with raw x and w (no normalised copies):
  A  = D @ W_chunk                 = d x_hat / ||x||     (summed over chunks; the algorithm finishes dx)
  dW = D^T @ X - (inv_w^2 P) * W   = (d w_hat - w_hat (w_hat . d w_hat)) / ||w||, since
       w_hat_j . d w_hat_j = sum_i dc_ij (x_hat_i . w_hat_j) = sum_i dc_ij raw_ij = P_j.
No atomics: each program owns its (rows, classes) tile of D and of the partial sums (deterministic).
"""

import triton
import triton.language as tl

from .forward import logit_tile, raw_cosine_tile
from .head_math import clamp_cosine


@triton.jit
def _grad_logits_kernel(X, W, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, dphi_ptr, tau_ptr, t_ptr, lse_ptr,
                        g_ptr, d_ptr, proj_ptr,
                        B, C, D, stride_x, stride_w, stride_d, s, mv_t,
                        NEGATIVES: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, class tile): its tile of D (in d_ptr's dtype) and of P's row-block partials."""
    row_block = tl.program_id(0)
    rows = row_block.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < B
    col_mask = cols < C
    inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    phi = tl.load(phi_ptr + rows, mask=row_mask, other=0.0)
    dphi = tl.load(dphi_ptr + rows, mask=row_mask, other=0.0)
    tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    raw = raw_cosine_tile(X, W, rows, cols.to(tl.int64), row_mask, col_mask, inv_x, inv_w, D, stride_x, stride_w,
                          BLOCK_B, BLOCK_C, BLOCK_K, DOT_PRECISION)
    # from here on only c = clamp(raw) is kept (register pressure): dc is 0 wherever raw lies outside (-1, 1)
    # (the clamp's derivative; on the target column through phi'), and c = raw wherever it does not, so
    # dc * c = dc * raw in the projection sums, and the clamp mask reads c as well as raw
    c = clamp_cosine(raw)
    z, dz_dc, is_target = logit_tile(c, cols, target, phi, dphi, tau, t, mv_t, s, NEGATIVES)
    p = tl.exp(z - lse[:, None])
    dc = g[:, None] * (p - is_target.to(tl.float32)) * dz_dc
    dc = tl.where(row_mask[:, None] & col_mask[None, :], dc, 0.0)
    tl.store(proj_ptr + row_block.to(tl.int64) * C + cols, tl.sum(dc * c, axis=0), mask=col_mask)
    out = (dc * inv_x[:, None] * inv_w[None, :]).to(d_ptr.dtype.element_ty)
    tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], out, mask=row_mask[:, None] & col_mask[None, :])
