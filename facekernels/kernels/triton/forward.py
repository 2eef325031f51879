"""Forward kernels of the fused margin-softmax cross-entropy: inverse norms and the class-split online
log-sum-exp (with each row's largest logit, for monitoring).

Normalisation is folded into the tiles: cos_ij = (x_i . w_j) * inv_x_i * inv_w_j with inv = 1 / max(||row||,
NORM_EPS) precomputed per row, so the operands of tl.dot are the raw inputs (bfloat16 / float16 tensor cores,
float32 accumulation) and no normalised copy of W is made. Logits never leave the registers; they are float32
(s = 64 times a cosine overflows no float32 exp after the max is subtracted).

Tiles are sized for Hopper's wgmma: BLOCK_B rows (64 per warpgroup of 4 warps: 128 rows with 8 warps) by
BLOCK_C = 128 classes (two such accumulators per x tile when PAIRED), BLOCK_K-wide steps over d pipelined
num_stages deep (kernels/triton/__init__.py, ``tile_config``). tests/test_gpu_static.py compiles every launch
the heads make for sm_90 and checks that each tl.dot lowers to wgmma without spills.

Offsets: rows and classes are widened to int64 before they multiply a stride (C * d > 2^31 at a few million
classes); the target compare runs in int32 (C < 2^31).
"""

import triton
import triton.language as tl

from .head_math import clamp_cosine, logit_tile, subcenter_max, target_logit


@triton.jit
def _inv_norm_rows(X, rows, row_mask, D, stride_x, BLOCK_K: tl.constexpr, eps):
    """1 / max(||x_r||, eps) in float32 of the rows ``rows``. The squares are summed in float64: a float32 sum
    overflows for norms above ~1.8e19 and would make such a row a zero vector. NaN stays NaN."""
    sq = tl.zeros(rows.shape, tl.float64)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=row_mask[:, None] & (k < D)[None, :], other=0.0)
        x = x.to(tl.float64)
        sq += tl.sum(x * x, axis=1)
    norm = tl.sqrt(sq)
    norm = tl.where(norm != norm, norm, tl.maximum(norm, eps))  # tl.maximum would drop a NaN
    return (1.0 / norm).to(tl.float32)


@triton.jit
def _inv_norm_kernel(X, out_ptr, n_rows, D, stride_x, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, eps):
    """out_r = 1 / max(||x_r||, eps) (``_inv_norm_rows``), BLOCK_R rows per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    tl.store(out_ptr + rows, _inv_norm_rows(X, rows, row_mask, D, stride_x, BLOCK_K, eps), mask=row_mask)


@triton.jit
def _target_rows_kernel(X, W, inv_w_ptr, target_ptr, valid_ptr, inv_x_ptr, c_ptr, rows_ptr, t_part_ptr, B, D,
                        stride_x, stride_w, cos_m2, sin_m2, m3, threshold, offset, bound, eps,
                        SUBCENTERS: tl.constexpr, LINEAR: tl.constexpr, FALLBACK: tl.constexpr,
                        STRAIGHT_THROUGH: tl.constexpr, T_PARTS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """The forward's per-row pre-pass for the head's own margins, BLOCK_R rows per program: the rows' inverse
    norms, target cosines and (phi, phi' times the clamp's derivative, tau), as the torch of ``_rowmath``
    computes them (target_cosine, target_logit), in one launch instead of ~40 small ones.

    c = clamp(x . w_target * inv_x * inv_w_target, -bound, bound) with the dot in float64 (sub-centers: the first
    maximum over the class's k rows), 0 for a row whose target is not in w (target < 0). Outputs: inv_x (B,),
    c (B,), rows (3, B) = phi, phi', tau. T_PARTS (CurricularFace's t update): the program's float64 sum of c over
    its valid rows and their count, into t_parts[pid] and t_parts[programs + pid] (``_update_t_kernel`` sums
    them)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    inv_x = _inv_norm_rows(X, rows, row_mask, D, stride_x, BLOCK_K, eps)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    has = row_mask & (target >= 0)
    first = tl.where(has, target, 0) * SUBCENTERS
    best = tl.zeros((BLOCK_R,), tl.float64)
    index = tl.zeros((BLOCK_R,), tl.int32)
    for j in tl.static_range(SUBCENTERS):
        dot = tl.zeros((BLOCK_R,), tl.float64)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = has[:, None] & (k < D)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=mask, other=0.0)
            w = tl.load(W + (first + j)[:, None] * stride_w + k[None, :], mask=mask, other=0.0)
            dot += tl.sum(x.to(tl.float64) * w.to(tl.float64), axis=1)
        inv_w = tl.load(inv_w_ptr + first + j, mask=has, other=0.0)
        raw = dot * inv_x.to(tl.float64) * inv_w.to(tl.float64)
        if j == 0:
            best = raw
        else:
            best, index = subcenter_max(best, index, raw, j)
    raw = tl.where(has, best, 0.0)
    inside = has & (raw > -bound) & (raw < bound)
    c = clamp_cosine(raw, bound).to(tl.float32)
    phi, dphi, tau = target_logit(c, cos_m2, sin_m2, m3, threshold, offset, LINEAR, FALLBACK, STRAIGHT_THROUGH)
    tl.store(inv_x_ptr + rows, inv_x, mask=row_mask)
    tl.store(c_ptr + rows, c, mask=row_mask)
    tl.store(rows_ptr + rows, phi, mask=row_mask)
    tl.store(rows_ptr + B + rows, dphi * inside.to(tl.float32), mask=row_mask)  # NaN * 0 stays NaN, as in torch
    tl.store(rows_ptr + 2 * B + rows, tau, mask=row_mask)
    if T_PARTS:
        valid = tl.load(valid_ptr + rows, mask=row_mask, other=0) != 0
        tl.store(t_part_ptr + pid, tl.sum(tl.where(valid, c.to(tl.float64), 0.0), axis=0))
        tl.store(t_part_ptr + tl.num_programs(0) + pid, tl.sum(valid.to(tl.float64), axis=0))


@triton.jit
def _update_t_kernel(t_part_ptr, t_ptr, t_used_ptr, n_parts, momentum, BLOCK_P: tl.constexpr):
    """CurricularFace: t <- momentum * mean + (1 - momentum) * t in float64 (``_rowmath.update_t_``; momentum
    arrives as a float32 kernel argument, < 1e-9 relative in t against torch's Python double), the mean
    of the valid rows' target cosines from ``_target_rows_kernel``'s partial sums and counts; t is left as it is
    without a valid row or for a mean that is not finite. Writes t in place and the value the step uses to t_used.
    One program."""
    total = tl.zeros((BLOCK_P,), tl.float64)
    count = tl.zeros((BLOCK_P,), tl.float64)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = parts < n_parts
        total += tl.load(t_part_ptr + parts, mask=mask, other=0.0)
        count += tl.load(t_part_ptr + n_parts + parts, mask=mask, other=0.0)
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1.0)
    t = tl.load(t_ptr)
    new_t = momentum * mean + (1.0 - momentum) * t.to(tl.float64)
    keep = (n == 0.0) | (mean != mean) | (tl.abs(mean) == float("inf"))
    t = tl.where(keep, t.to(tl.float64), new_t).to(t.dtype)
    tl.store(t_ptr, t)
    tl.store(t_used_ptr, t)


@triton.jit
def _online_lse(raw, cols, col_mask, target, phi, tau, t, mv_t, s, bound, filter_threshold, run_max, run_sum,
                NEGATIVES: tl.constexpr, FILTER: tl.constexpr):
    """Fold one tile of raw cosines into the rows' running (max, sum exp(z - max))."""
    z, _, _ = logit_tile(raw, cols, target, phi, phi, tau, t, mv_t, s, bound, filter_threshold, NEGATIVES, FILTER)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    tile_max = tl.max(z, axis=1)
    # tl.maximum drops NaN: a NaN logit must make the row's max (and so its lse) NaN
    new_max = tl.where(tile_max != tile_max, tile_max, tl.maximum(run_max, tile_max))
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def _rank_threshold(target_cos, bound):
    """Per row, the raw-cosine threshold of _beats_target: a class beats a target of (clamped) cosine tc when
    not (clamp(raw) <= tc), i.e. (tc in [-bound, bound]) when raw is NaN, or tc is NaN, or raw > tc with tc < bound
    (at tc = bound no clamped cosine exceeds it). So: not (raw <= threshold) with threshold tc below the bound,
    +inf at it, -inf for a NaN tc: one compare per class, no clamp in the tile (registers: PAIRED)."""
    return tl.where(target_cos != target_cos, float("-inf"), tl.where(target_cos < bound, target_cos, float("inf")))


@triton.jit
def _beats_target(raw, cols, col_mask, target, threshold):
    """Per row, int32: the tile's classes other than the target column (by index: the tile's recomputed target
    cosine may differ from the target's by a rounding) whose clamped margin-free cosine beats the target's,
    not (c <= target_cos): strictly greater or NaN (facekernels/_rowmath.py, beats_target), through the row's
    _rank_threshold."""
    beats = ((raw <= threshold[:, None]) == 0) & col_mask[None, :] & (cols[None, :] != target[:, None])
    return tl.sum(beats.to(tl.int32), axis=1)


@triton.jit
def _dot_tile(X, W, rows, row_mask, w_rows, w_mask, D, stride_x, stride_w, BLOCK_B: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x[rows] . w[w_rows] over d: one (BLOCK_B, BLOCK_C) float32 tile of raw dot products."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < D
        x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + w_rows[:, None] * stride_w + k[None, :], mask=w_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lse_partial_kernel(X, W, inv_x_ptr, inv_w_ptr, target_ptr, phi_ptr, tau_ptr, t_ptr,
                        part_max_ptr, part_sum_ptr, target_cos_ptr, part_rank_ptr,
                        B, C, D, class_offset, stride_x, stride_w, stride_part, classes_per_split, s, mv_t, bound,
                        filter_threshold,
                        NEGATIVES: tl.constexpr, FILTER: tl.constexpr, SUBCENTERS: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PAIRED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, RANK: tl.constexpr):
    """Program (row block, class split): online (max, sum exp(z - max)) of its rows over its classes, into
    column ``split`` of the (B, stride_part) partials. W holds the classes class_offset .. class_offset + C: the
    targets are global class ids, made relative here (no tensor op on them per launch).

    RANK (stats only; the pointers are None otherwise and the kernel is the same as without): also counts, per
    row, its classes whose margin-free cosine beats the row's target cosine (``_beats_target``), from the same
    raw cosine tiles, into int32 partials per (row, split) that the host sums. Unpaired only: the count beside
    two accumulators spills at 128 x 128 tiles (sm_90: 184 to 520 bytes however it is ordered), while one
    accumulator and its count fit (tests/test_stats_rank.py compiles it).

    PAIRED: each step of the class loop takes two BLOCK_C tiles in one pass over d, the x tile of a K step
    feeding both tl.dot, so x crosses L2 once per 2 x BLOCK_C classes (L2 traffic bounds this kernel,
    bench/gpu_model.py) while each accumulator and its epilogue stay at BLOCK_C columns (a 2 x BLOCK_C
    epilogue would not fit the registers). The host launches it on a multiple of 2 x BLOCK_C classes and the
    ragged tail unpaired (paired, a C not divisible by 16 spills registers). Axis 0 (row blocks) varies fastest
    in launch order, so the programs that read the same W tiles run together and share them through L2.

    SUBCENTERS > 1 (unpaired): class j has the rows j k .. j k + k - 1 of W; its raw cosine is their max, one
    tl.dot tile per sub-center folded into a running max.
    """
    tl.static_assert(not (PAIRED and RANK), "the RANK variant runs unpaired (registers)")
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    split = tl.program_id(1).to(tl.int64)
    row_mask = rows < B
    inv_x = tl.load(inv_x_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(target_ptr + rows, mask=row_mask, other=-1).to(tl.int32) - class_offset  # < 0: none here
    phi = tl.load(phi_ptr + rows, mask=row_mask, other=0.0)
    tau = tl.load(tau_ptr + rows, mask=row_mask, other=0.0)
    t = 0.0
    if NEGATIVES == 2:
        t = tl.load(t_ptr)
    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_B,), tl.float32)
    beats = tl.zeros((BLOCK_B,), tl.int32)
    threshold = phi
    if RANK:
        threshold = _rank_threshold(tl.load(target_cos_ptr + rows, mask=row_mask, other=0.0), bound)
    c_begin = (split * classes_per_split).to(tl.int32)
    c_end = tl.minimum(c_begin + classes_per_split, C)
    for c0 in range(c_begin, c_end, (2 if PAIRED else 1) * BLOCK_C):
        cols_a = c0 + tl.arange(0, BLOCK_C)
        mask_a = cols_a < c_end
        if PAIRED:
            cols_b = cols_a + BLOCK_C
            mask_b = cols_b < c_end
            acc_a = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            acc_b = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_mask = k < D
                x = tl.load(X + rows[:, None] * stride_x + k[None, :], mask=row_mask[:, None] & k_mask[None, :],
                            other=0.0)
                w_a = tl.load(W + cols_a.to(tl.int64)[:, None] * stride_w + k[None, :],
                              mask=mask_a[:, None] & k_mask[None, :], other=0.0)
                acc_a = tl.dot(x, tl.trans(w_a), acc_a, input_precision=DOT_PRECISION)
                w_b = tl.load(W + cols_b.to(tl.int64)[:, None] * stride_w + k[None, :],
                              mask=mask_b[:, None] & k_mask[None, :], other=0.0)
                acc_b = tl.dot(x, tl.trans(w_b), acc_b, input_precision=DOT_PRECISION)
            inv_w_a = tl.load(inv_w_ptr + cols_a, mask=mask_a, other=0.0)
            raw_a = acc_a * inv_x[:, None] * inv_w_a[None, :]
        elif SUBCENTERS == 1:
            acc_a = _dot_tile(X, W, rows, row_mask, cols_a.to(tl.int64), mask_a, D, stride_x, stride_w, BLOCK_B,
                              BLOCK_C, BLOCK_K, DOT_PRECISION)
            inv_w_a = tl.load(inv_w_ptr + cols_a, mask=mask_a, other=0.0)
            raw_a = acc_a * inv_x[:, None] * inv_w_a[None, :]
        else:
            raw_a = tl.full((BLOCK_B, BLOCK_C), float("-inf"), tl.float32)
            index = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)  # unused here (the backward's), folded away
            for i in range(SUBCENTERS):  # a loop, not unrolled: k up to 64
                w_rows = cols_a.to(tl.int64) * SUBCENTERS + i
                acc = _dot_tile(X, W, rows, row_mask, w_rows, mask_a, D, stride_x, stride_w, BLOCK_B, BLOCK_C,
                                BLOCK_K, DOT_PRECISION)
                inv_w = tl.load(inv_w_ptr + w_rows, mask=mask_a, other=0.0)
                raw_a, index = subcenter_max(raw_a, index, acc * inv_x[:, None] * inv_w[None, :], i)
        if RANK:
            beats += _beats_target(raw_a, cols_a, mask_a, target, threshold)
        run_max, run_sum = _online_lse(raw_a, cols_a, mask_a, target, phi, tau, t, mv_t, s, bound, filter_threshold,
                                       run_max, run_sum, NEGATIVES, FILTER)
        if PAIRED:
            inv_w_b = tl.load(inv_w_ptr + cols_b, mask=mask_b, other=0.0)
            run_max, run_sum = _online_lse(acc_b * inv_x[:, None] * inv_w_b[None, :], cols_b, mask_b, target, phi,
                                           tau, t, mv_t, s, bound, filter_threshold, run_max, run_sum, NEGATIVES,
                                           FILTER)  # fmt: skip
    out = rows * stride_part + split
    tl.store(part_max_ptr + out, run_max, mask=row_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=row_mask)
    if RANK:
        tl.store(part_rank_ptr + out, beats, mask=row_mask)


@triton.jit
def _combine_lse_kernel(part_max_ptr, part_sum_ptr, lse_ptr, row_max_ptr, B, n_parts, BLOCK_R: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    """Per row, the class splits' partials (max_j, sum_j) combined: row max M = max_j max_j and
    lse = M + log sum_j sum_j exp(max_j - M), shifted by 0 instead when M = -inf (no class: lse -inf); a NaN
    partial makes both NaN (tl.max drops NaN, so it is tracked apart). One launch instead of a dozen torch ops."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < B
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_R,), tl.float32)
    nan = tl.zeros((BLOCK_R,), tl.int32)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = row_mask[:, None] & (parts < n_parts)[None, :]
        at = rows[:, None] * n_parts + parts[None, :]
        part_max = tl.load(part_max_ptr + at, mask=mask, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + at, mask=mask, other=0.0)
        nan |= tl.max((part_max != part_max).to(tl.int32), axis=1)
        new_max = tl.maximum(run_max, tl.max(part_max, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(part_sum * tl.exp(part_max - shift[:, None]), axis=1)
        run_max = new_max
    lse = tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log(run_sum)
    tl.store(lse_ptr + rows, tl.where(nan != 0, float("nan"), lse), mask=row_mask)
    tl.store(row_max_ptr + rows, tl.where(nan != 0, float("nan"), run_max), mask=row_mask)
