"""Backward kernels of the fused margin-softmax cross-entropy: the logits gradient D of one class chunk and its
per-class normalisation corrections k, consumed by two cuBLAS GEMMs (kernels/triton/__init__.py).

``_grad_logits_kernel`` (every head without sub-centers) recomputes the chunk's raw cosines itself with the
forward's tl.dot tiles (wgmma on sm_90, 128 rows x 64 classes: 233-255 registers and no spills on triton 3.6.0
and 3.9.0, tests/test_gpu_static.py) and writes D directly: one launch a chunk, and no float32 (B, chunk) dots
buffer (32 MB at B = 1024) written by cuBLAS and read back by an elementwise pass. A program owns 64 classes and
steps over every row, so that k is summed whole and deterministically; the row tile of X (1 MB at B = 1024, d =
512) is re-read from L2 by each program. ``_grad_logits_from_dots_kernel`` is that epilogue alone, over cuBLAS's
float32 dots: the sub-center heads take it (their running max and its index beside the accumulator spill).

For an element, with g_i the upstream gradient of row i's loss (0 for ignored rows) and
raw_ij = dots_ij * inv_x_i * inv_w_j (dots_ij = x_i . w_j):
  dz_ij = g_i (softmax(z_i)_j - [j = y_i]),   softmax(z_i)_j = exp(z_ij - lse_i)
  dc_ij = dz_ij * s * (phi'(c_i) on the target, N'(c_ij) elsewhere) * [-1 < raw_ij < 1]
The kernel writes D_ij = dc_ij * inv_x_i * inv_w_j (B, chunk) and k_j = -inv_w_j^2 P_j, P_j = sum_i D_ij dots_ij
(each program sums its classes over every row). Then, with raw x and w (no normalised copies):
  A  = D @ W_chunk             = d x_hat / ||x||     (summed over chunks; the algorithm finishes dx)
  dW = D^T @ X + k * W         = (d w_hat - w_hat (w_hat . d w_hat)) / ||w||, since
       w_j . (D^T X)_j = sum_i D_ij (x_i . w_j) = sum_i D_ij dots_ij = P_j, so that w_j . dW_j = 0.
P is summed from D as stored (rounded to bfloat16 for bfloat16 / float16 inputs), the D that the D^T X GEMM
reads: w_j . dW_j = 0 then holds for the rounded D too. From the unrounded dc (sum_i dc_ij raw_ij, equal in
exact arithmetic) it would not: when a class's rows are nearly parallel to it, D^T X is nearly parallel to w_j
and the correction cancels most of it, so D's rounding (2^-8 relative) left in w_j's direction became an error
of ~2^-8 / sin(theta) of dW_j (17 % median per class at target cosines 0.9996; issue 20, item 6). With
dots_ij = raw_ij / (inv_x_i inv_w_j): k_j = -inv_w_j sum_i D_ij raw_ij ||x_i||, from the raw cosines the kernel
holds (no second tile of dots kept live).
No atomics: each program owns its classes' columns of D and their k (deterministic, and k needs no second
launch to sum row-block partials).
"""

import triton
import triton.language as tl

from .forward import _dot_tile
from .head_math import logit_tile, subcenter_max


@triton.jit
def _row_block(rows, row_mask, c0, inv_x_ptr, target_ptr, phi_ptr, dphi_ptr, tau_ptr, lse_ptr, g_ptr):
    """A row block's inputs to D: 1 / ||x||, the target relative to the chunk (int32: c0, the chunk's first class,
    subtracted here; < 0 or past the chunk: none in it), phi, phi', tau, the row's lse and its upstream gradient."""
    inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
    target = (tl.load(target_ptr + rows, mask=row_mask, other=-1) - c0).to(tl.int32)
    phi = tl.load(phi_ptr + rows, mask=row_mask, other=0.0)
    dphi = tl.load(dphi_ptr + rows, mask=row_mask, other=0.0)
    tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    return inv_x, target, phi, dphi, tau, lse, g


@triton.jit
def _grad_logits_from_dots_kernel(dots_ptr, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, dphi_ptr, tau_ptr, t_ptr,
                                  lse_ptr, g_ptr, d_ptr, corr_ptr,
                                  B, C, c0, stride_dots, stride_d, s, mv_t, bound, filter_threshold,
                                  NEGATIVES: tl.constexpr, FILTER: tl.constexpr, SUBCENTERS: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (class tile): its columns of D (in d_ptr's dtype) for every row, BLOCK_B rows a step, and their
    corrections k, whole: the program owns its columns, so k needs no second launch to sum row-block partials
    and no atomics (deterministic). The rows of D are padded to a multiple of BLOCK_C classes, so stores need
    no column mask (padding gets 0). Targets are the chunk's global class ids: c0 (the chunk's first class, a
    scalar) is subtracted here, not by a tensor op per chunk.

    SUBCENTERS > 1: the columns of dots, D and k are the classes' sub-centers (class j: j k .. j k + k - 1); a
    class's raw cosine is their max, and its dc goes to the first maximum (D and k 0 for the others). The k
    per-sub-center sums cannot all stay in registers (k up to 64, a runtime loop): they accumulate in corr_ptr,
    which this program alone reads and writes, in the same layout (each value by the thread that stored it)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    if SUBCENTERS == 1:
        inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
        acc = tl.zeros((BLOCK_C,), tl.float32)
    else:
        for i in range(SUBCENTERS):
            tl.store(corr_ptr + cols.to(tl.int64) * SUBCENTERS + i, tl.zeros((BLOCK_C,), tl.float32))
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        inv_x, target, phi, dphi, tau, lse, g = _row_block(rows, row_mask, c0, inv_x_ptr, target_ptr, phi_ptr,
                                                           dphi_ptr, tau_ptr, lse_ptr, g_ptr)  # fmt: skip
        mask = row_mask[:, None] & col_mask[None, :]
        if SUBCENTERS == 1:
            dots = tl.load(dots_ptr + rows[:, None] * stride_dots + cols[None, :], mask=mask, other=0.0)
            raw = dots * inv_x[:, None] * inv_w[None, :]
        else:
            raw = tl.full((BLOCK_B, BLOCK_C), float("-inf"), tl.float32)
            index = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
            for i in range(SUBCENTERS):  # a loop, not unrolled: k up to 64
                sub = cols.to(tl.int64) * SUBCENTERS + i
                inv_w = tl.load(inv_w_ptr + sub, mask=col_mask, other=0.0)
                dots = tl.load(dots_ptr + rows[:, None] * stride_dots + sub[None, :], mask=mask, other=0.0)
                raw, index = subcenter_max(raw, index, dots * inv_x[:, None] * inv_w[None, :], i)
        z, dz_draw, is_target = logit_tile(raw, cols, target, phi, dphi, tau, t, mv_t, s, bound, filter_threshold,
                                          NEGATIVES, FILTER)
        p = tl.exp(z - lse[:, None])
        dc = tl.where(mask, g[:, None] * (p - is_target.to(tl.float32)) * dz_draw, 0.0)
        norm_x = 1.0 / tl.where(row_mask, inv_x, 1.0)  # ||x_i|| for k from D as stored (D is 0 on padding rows)
        if SUBCENTERS == 1:
            out = (dc * inv_x[:, None] * inv_w[None, :]).to(d_ptr.dtype.element_ty)
            acc += tl.sum(out.to(tl.float32) * raw * norm_x[:, None], axis=0)
            tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], out, mask=row_mask[:, None])
        else:
            for i in range(SUBCENTERS):  # a loop, not unrolled: k up to 64
                sub = cols.to(tl.int64) * SUBCENTERS + i
                inv_w = tl.load(inv_w_ptr + sub, mask=col_mask, other=0.0)
                # raw is sub-center i's raw cosine wherever index == i, the only places D_i is not 0
                out = (tl.where(index == i, dc, 0.0) * inv_x[:, None] * inv_w[None, :]).to(d_ptr.dtype.element_ty)
                part = -inv_w * tl.sum(out.to(tl.float32) * raw * norm_x[:, None], axis=0)
                tl.store(corr_ptr + sub, tl.load(corr_ptr + sub) + part)
                tl.store(d_ptr + rows[:, None] * stride_d + sub[None, :], out, mask=row_mask[:, None])
    if SUBCENTERS == 1:
        tl.store(corr_ptr + cols, -inv_w * acc)


@triton.jit
def _grad_logits_kernel(X, W, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, dphi_ptr, tau_ptr, t_ptr, lse_ptr,
                            g_ptr, d_ptr, corr_ptr,
                            B, C, D, c0, stride_x, stride_w, stride_d, s, mv_t, bound, filter_threshold,
                            NEGATIVES: tl.constexpr, FILTER: tl.constexpr, SUBCENTERS: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """``_grad_logits_from_dots_kernel`` with the recompute inside (no sub-centers: kernels/triton/__init__.py,
    ``_fused``): program (class tile) recomputes its raw cosines with the forward's tl.dot tiles (``_dot_tile``:
    wgmma, float32 accumulation), BLOCK_B rows a step over every row, so no float32 (B, chunk) dots buffer is
    written and read and no second launch runs; its classes' k is summed whole (no atomics, deterministic).
    X (1 MB at B = 1024, d = 512) is read by every program and stays in L2."""
    tl.static_assert(SUBCENTERS == 1)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    inv_w = tl.load(inv_w_ptr + cols, mask=col_mask, other=0.0)
    acc_k = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        acc = _dot_tile(X, W, rows, row_mask, cols.to(tl.int64), col_mask, D, stride_x, stride_w, BLOCK_B, BLOCK_C,
                        BLOCK_K, DOT_PRECISION)
        inv_x, target, phi, dphi, tau, lse, g = _row_block(rows, row_mask, c0, inv_x_ptr, target_ptr, phi_ptr,
                                                           dphi_ptr, tau_ptr, lse_ptr, g_ptr)  # fmt: skip
        raw = acc * inv_x[:, None] * inv_w[None, :]
        z, dz_draw, is_target = logit_tile(raw, cols, target, phi, dphi, tau, t, mv_t, s, bound, filter_threshold,
                                          NEGATIVES, FILTER)
        p = tl.exp(z - lse[:, None])
        dc = tl.where(row_mask[:, None] & col_mask[None, :], g[:, None] * (p - is_target.to(tl.float32)) * dz_draw,
                      0.0)
        out = (dc * inv_x[:, None] * inv_w[None, :]).to(d_ptr.dtype.element_ty)
        norm_x = 1.0 / tl.where(row_mask, inv_x, 1.0)  # ||x_i|| for k from D as stored (D is 0 on padding rows)
        acc_k += tl.sum(out.to(tl.float32) * raw * norm_x[:, None], axis=0)
        tl.store(d_ptr + rows[:, None] * stride_d + cols[None, :], out, mask=row_mask[:, None])
    tl.store(corr_ptr + cols, -inv_w * acc_k)


@triton.jit
def _dw_correction_kernel(dw_ptr, w_ptr, k_ptr, out_ptr, R, D, stride_dw, stride_w, stride_out,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = dW + k w over a chunk's R rows: D^T X (float32) plus the rank-1 normalisation correction (k per row,
    float32, from the kernels above; w in its dtype), summed in float32 and rounded once to out's dtype. One
    (BLOCK_R, BLOCK_D) tile a program, contiguous along d (a unit stride, specialised by the JIT: 16-byte
    loads and stores), where torch.addcmul over float32, bfloat16 and a broadcast column takes its
    mixed-dtype path. out may be dW itself (each element read before it is written, by the same thread)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols < D)[None, :]
    dw = tl.load(dw_ptr + rows[:, None] * stride_dw + cols[None, :], mask=mask, other=0.0)
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + rows, mask=row_mask, other=0.0)
    out = dw + w * k[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
