"""The Triton kernels of the heads behind the algorithm's kernel interface (``facekernels._algorithm.HeadKernels``):
``backend="triton"``, and ``"auto"`` on CUDA tensors.

* inverse norms: ``_inv_norm_kernel`` (float64 sums), once per step for W (and x for the heads below);
* the forward's per-row pre-pass (``target_rows``): ``_target_rows_kernel`` gives x's inverse norms, the target
  cosines and (phi, phi', tau), and ``_update_t_kernel`` CurricularFace's t, in place of ~60 small torch ops,
  for the heads' own margins (``covers_target_rows``; AdaFace, MagFace, ElasticFace and the acos heads keep
  facekernels/_rowmath.py's torch);
* forward: ``_lse_partial_kernel`` over (row blocks x class splits), wgmma-sized tiles, online log-sum-exp;
  the splits' partials are combined by ``_combine_lse_kernel``;
* backward (``TritonBackward``, driven chunk by chunk by facekernels/_algorithm.py), per class chunk sized to
  stay in L2 (``chunk_classes``): ``_grad_logits_kernel`` recomputes the chunk's cosines with tl.dot tiles and
  writes the scaled logits gradient D (B, chunk) and the per-class normalisation corrections k (sub-centers:
  cuBLAS's float32 dots and ``_grad_logits_from_dots_kernel``), and two cuBLAS GEMMs give d x_hat / ||x|| +=
  D @ W_chunk (``torch.addmm`` into one float32 accumulator) and the chunk's weight gradient D^T @ X, finished
  by its rank-1 normalisation correction k w in one pass that also rounds to w's dtype (``_dw_correction_kernel``):
  four launches a chunk.
  The chunk loop launches the kernel directly: the ``triton_grad_logits`` op (and its dispatch, ~30 us a call)
  is used only while torch.compile / torch.func trace the backward.

D is bfloat16 for bfloat16 and float16 inputs (float16's 5-bit exponent would flush p * g ~ 1e-9, the typical
negative-class gradient at C = 1M, to zero; bfloat16 keeps float32's range, and float16 operands go to the
two GEMMs as two bfloat16 parts each, whose sum is exact: four GEMMs, ``_gemm_parts`` says why), float32 for
float32 inputs (GEMMs at torch's float32 matmul precision, like the reference). The chunk's D^T X and its
rank-1 correction are summed in float32 and rounded once to W's dtype.

The kernel launches go through ``_launch`` so that tests/test_gpu_static.py can capture the launches the heads
really make (with meta tensors, at the target shapes) and compile each for sm_90 without a GPU. The head's
settings reach the launches as one ``KernelSettings``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

from ..._errors import BackendUnavailableError
from ..._params import NORM_EPS, Fallback, HeadParams
from ..._rowmath import fallback_branch, has_fallback_branch

try:
    import triton
except ImportError as err:  # the backend raises BackendUnavailableError when it is asked for
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = err
else:
    _TRITON_IMPORT_ERROR = None
    from .backward import _dw_correction_kernel, _grad_logits_kernel, _grad_logits_from_dots_kernel
    from .forward import (_combine_lse_kernel, _inv_norm_kernel, _lse_partial_kernel, _target_rows_kernel,
                          _update_t_kernel)

# Triton decides at decoration time whether its kernels run under the interpreter (CPU tensors).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this to fill every buffer a kernel writes with NaN first, so an unwritten element shows.
POISON_OUTPUTS = False
# Bytes of one backward chunk's working set between the kernel that writes D and the two GEMMs that read it: D
# (B, chunk) in the GEMM dtype, the chunk of W and its float32 dW (``chunk_classes``). Not sized to the L2 (50 MB,
# which gave 123 chunks at B = 1024, C = 1M): the first GPU run (bench/results/h200-2026-12-04) timed a step
# that bench/gpu_model.py fits only with every host call ~7.5x what it costs on the development machine, about
# 0.25 ms of host per chunk of 4 launches against ~0.09 ms of GPU work. Fewer, larger chunks cost D's round trip
# through HBM instead (~1.6 ms per million classes at B = 1024, bf16) and ~640 MB of temporaries. At B = 1024,
# d = 512, bfloat16: 131072 classes, 8 chunks at C = 1M (at B = 256: 187136, 6 chunks). Which size wins is the
# next GPU run's to say (bench/gpu_step_profile.py times 40 MB to 2.5 GB). Tests make it small.
CHUNK_BYTES = 640 * 2**20
# The embedding width the chunks are sized for when the caller does not say (the algorithm's protocol passes
# (batch, classes, dtype)): the largest of the target widths (128, 256, 512), so a narrower W only leaves room.
CHUNK_FEATURES = 512
# Streaming multiprocessors the grid is sized for when no CUDA device is queried (H100 SXM: 132).
DEFAULT_SMS = 132
# A list while tests/test_gpu_static.py captures launches (kernel, grid, args, meta) instead of running them.
CAPTURED_LAUNCHES: list | None = None


@dataclass(frozen=True)
class TileConfig:
    block_b: int  # rows per tile: 64 per warpgroup (wgmma's M), 4 warps a warpgroup
    block_c: int  # classes per tile (wgmma's N)
    block_k: int  # step over d (wgmma's K is 16; 64 bf16 = 128 bytes, one swizzled shared-memory row)
    num_warps: int
    num_stages: int  # cp.async / TMA pipeline depth of the K loop


def tile_config(batch: int, dtype: torch.dtype, subcenters: int = 1) -> TileConfig:
    """The forward tl.dot kernel's tiles, the widest that compile for sm_90 without register spills (checked by
    tests/test_gpu_static.py on every launch the heads make): wgmma needs >= 64 rows per warpgroup, so 128 rows
    with 8 warps (64 with 4 for B <= 64; the same 64 accumulators per thread); 128 classes (64 for float32,
    whose three TF32 products hold more live values, and for sub-centers, whose running max is a second tile
    beside the accumulator: 128 spills); 3 stages of (rows + classes) x K operands, K = 64 (32 for float32):
    96 KB of shared memory or less, of the 227 KB an H100 block may use."""
    rows = 128 if batch > 64 else 64
    warps = 8 if rows == 128 else 4
    if dtype == torch.float32:
        return TileConfig(rows, 64, 32, warps, 3)
    return TileConfig(rows, 128 if subcenters == 1 else 64, 64, warps, 3)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 operands go through the tensor cores either way: "tf32x3" (three TF32 products, about float32's
    accuracy) when torch's float32 matmul precision is "highest" (its default), "tf32" otherwise."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch (or capture) a kernel on the current device: the callers enter the inputs' device once
    (``_on_device``: the ops; the backward runs on autograd's thread for that device), not once per launch."""
    if CAPTURED_LAUNCHES is not None:
        CAPTURED_LAUNCHES.append((kernel, grid, args, meta))
        return
    kernel[grid](*args, **meta)


def _on_device(a: torch.Tensor):
    """The context that makes a's device current (Triton launches on the current device), once per op."""
    return torch.cuda.device(a.device) if a.device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class KernelSettings:
    """The head's settings as the kernels take them, one object from ``HeadParams`` down to the launch: the
    runtime numbers (``scalars``: s, MV-Softmax's t, the cosine bound, the filter threshold; new values do not
    recompile) and the structure (``constexprs``: the negatives' kind, filtering, sub-centers per class)."""

    s: float
    negatives: int
    mv_t: float
    cos_bound: float
    filter_threshold: float
    subcenters: int

    @classmethod
    def of(cls, p: HeadParams) -> KernelSettings:
        return cls(p.s, int(p.negatives), p.mv_t, p.cos_bound, p.filter_threshold, p.subcenters)

    @property
    def scalars(self) -> tuple[float, float, float, float]:
        return self.s, self.mv_t, self.cos_bound, self.filter_threshold

    @property
    def constexprs(self) -> dict:
        return dict(NEGATIVES=self.negatives, FILTER=self.filter_threshold != math.inf, SUBCENTERS=self.subcenters)


# ------------------------------------------------------------------------------------------ launches


def inv_norms(rows: torch.Tensor) -> torch.Tensor:
    rows = _aligned_rows(rows)
    n, features = rows.shape
    out = _empty(n, torch.float32, rows.device)
    block_k = min(128, max(16, triton.next_power_of_2(features)))
    if n > 0:
        _launch(_inv_norm_kernel, (triton.cdiv(n, 32),), rows, out, n, features, rows.stride(0), BLOCK_R=32,
                BLOCK_K=block_k, eps=NORM_EPS)  # fmt: skip
    return out


# ``_target_rows_kernel``'s rows per program and step over d (float64 products, 32 x 64 over 4 warps: 128 wide
# holds 252 registers for float32 with three sub-centers on triton 3.9)
TARGET_BLOCK_R, TARGET_BLOCK_K = 32, 64
# ``_update_t_kernel``'s partials per step
UPDATE_T_BLOCK_P = 128


def covers_target_rows(p: HeadParams) -> bool:
    """Whether ``target_rows`` computes this head's per-row pre-pass: the head's own margins with m1 = 1 and any
    fallback but CLIP (every head but AdaFace, MagFace, ElasticFace and the acos ones: those stay in torch)."""
    return p.row_margins is None and p.m1 == 1.0 and p.fallback != Fallback.CLIP


def target_rows(x, w, inv_w, target, valid, t, cos_m2: float, sin_m2: float, m3: float, threshold: float,
                offset: float, cos_bound: float, linear: bool, fallback: bool, straight_through: bool,
                subcenters: int, momentum: float | None):  # fmt: skip
    """(inv_x (B,), c (B,), (phi, phi', tau) (3, B), t_used) float32: ``_target_rows_kernel``, and with a
    ``momentum`` CurricularFace's t update in place (``_update_t_kernel``, t_used the value it leaves); else
    t_used is None. Two launches at most."""
    x, w = _aligned_rows(x), _aligned_rows(w)
    batch, features = x.shape
    inv_x, c = _empty(batch, torch.float32, x.device), _empty(batch, torch.float32, x.device)
    rows = _empty((3, batch), torch.float32, x.device)
    programs = triton.cdiv(batch, TARGET_BLOCK_R)
    t_parts = _empty(2 * programs, torch.float64, x.device) if momentum is not None else None
    if batch:
        _launch(_target_rows_kernel, (programs,), x, w, inv_w, target, valid, inv_x, c, rows, t_parts, batch,
                features, x.stride(0), w.stride(0), cos_m2, sin_m2, m3, threshold, offset, cos_bound, NORM_EPS,
                SUBCENTERS=subcenters, LINEAR=linear, FALLBACK=fallback, STRAIGHT_THROUGH=straight_through,
                T_PARTS=momentum is not None, BLOCK_R=TARGET_BLOCK_R,
                BLOCK_K=min(TARGET_BLOCK_K, max(16, triton.next_power_of_2(features))))  # fmt: skip
    t_used = None
    if momentum is not None:
        t_used = _empty((), t.dtype, t.device)
        _launch(_update_t_kernel, (1,), t_parts, t, t_used, programs, momentum, BLOCK_P=UPDATE_T_BLOCK_P)
    return inv_x, c, rows, t_used


def margin_lse(x, w, inv_x, inv_w, target, phi, tau, t, s: float, negatives: int, mv_t: float, cos_bound: float,
               filter_threshold: float, subcenters: int, target_cos=None):  # fmt: skip
    """(log-sum-exp, max) (B,) float32 of the logits over w's classes (``subcenters`` rows of w each); -inf when w
    has no class. Without sub-centers the classes up to a multiple of 2 x BLOCK_C go to the paired kernel, the
    ragged tail to an unpaired launch (forward.py). With ``target_cos`` (B,) float32, a third output: per row
    the int64 count of w's classes, the target column left out, whose margin-free cosine beats it (the kernel's
    RANK variant, unpaired over every class; None without)."""
    x, w = _aligned_rows(x), _aligned_rows(w)
    (batch, features), k = x.shape, subcenters
    classes = w.shape[0] // k
    cfg = tile_config(batch, x.dtype, k)
    row_blocks = triton.cdiv(batch, cfg.block_b)
    # the RANK variant (stats) runs unpaired: its count beside two accumulators would spill (forward.py)
    paired_end = classes // (2 * cfg.block_c) * 2 * cfg.block_c if k == 1 and target_cos is None else 0
    launches = []  # (first class, end, paired, splits, classes per split)
    for c0, c1, paired in ((0, paired_end, True), (paired_end, classes, False)):
        if c1 == c0 or batch == 0:
            continue
        step = (2 if paired else 1) * cfg.block_c
        steps = triton.cdiv(c1 - c0, step)
        # class splits: (row blocks x splits) fills the SMs about 4 times over; every split whole steps
        splits = max(1, min(steps, triton.cdiv(4 * _sm_count(x.device), row_blocks)))
        if _INTERPRETED:
            splits = min(steps, 2)  # a couple of splits, to exercise the combine
        per_split = triton.cdiv(steps, splits) * step
        launches.append((c0, c1, paired, triton.cdiv(c1 - c0, per_split), per_split))
    if not launches:  # no class (or no row): lse and max -inf, no class beats a target
        rank = None if target_cos is None else torch.zeros(batch, dtype=torch.int64, device=x.device)
        return torch.full((batch,), -math.inf, device=x.device), torch.full((batch,), -math.inf, device=x.device), rank
    # every launch writes its splits' columns of one (B, parts) buffer: one combine after them
    parts = sum(splits for *_, splits, _ in launches)
    part_max = _empty((batch, parts), torch.float32, x.device)
    part_sum = _empty((batch, parts), torch.float32, x.device)
    part_rank = None if target_cos is None else _empty((batch, parts), torch.int32, x.device)
    column = 0
    for c0, c1, paired, splits, per_split in launches:
        _launch(_lse_partial_kernel, (row_blocks, splits), x, w[c0 * k : c1 * k], inv_x, inv_w[c0 * k : c1 * k],
                target, phi, tau, t, part_max[:, column:], part_sum[:, column:], target_cos,
                None if part_rank is None else part_rank[:, column:], batch, c1 - c0, features, c0, x.stride(0),
                w.stride(0), parts, per_split, s, mv_t, cos_bound, filter_threshold, NEGATIVES=negatives,
                FILTER=filter_threshold != math.inf, SUBCENTERS=k, BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c,
                BLOCK_K=cfg.block_k, PAIRED=paired, DOT_PRECISION=_dot_precision(x.dtype), RANK=part_rank is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
        column += splits
    lse, row_max = _empty(batch, torch.float32, x.device), _empty(batch, torch.float32, x.device)
    _launch(_combine_lse_kernel, (triton.cdiv(batch, COMBINE_BLOCK_R),), part_max, part_sum, lse, row_max, batch,
            parts, BLOCK_R=COMBINE_BLOCK_R, BLOCK_P=min(64, triton.next_power_of_2(parts)))  # fmt: skip
    # int32 per split (< 2^31 classes), int64 summed
    return lse, row_max, None if part_rank is None else part_rank.sum(dim=1, dtype=torch.int64)


# ``_combine_lse_kernel``: rows per program (a row's partials are one contiguous run of ``parts`` floats)
COMBINE_BLOCK_R = 32


# ``_grad_logits_from_dots_kernel``'s tile (the sub-center heads'): elementwise (no tl.dot), 128 rows x 32
# classes a step over 4 warps (32 values a thread; 64 spill), 128-byte row segments of the float32 dots. A
# program owns its 32 classes for all rows (backward.py: k summed whole, no second launch). With sub-centers, 32
# rows (the running max's index is a second tile: 64 rows spill 104 bytes for float32 on triton 3.6.0).
GRAD_BLOCK_B, GRAD_BLOCK_C, GRAD_WARPS = 128, 32, 4
GRAD_BLOCK_B_SUBCENTERS = 32


def _grad_block_b(subcenters: int) -> int:
    return GRAD_BLOCK_B if subcenters == 1 else GRAD_BLOCK_B_SUBCENTERS


# The fused recompute (``_grad_logits_kernel``): 64 classes a program (the epilogue beside a 128 x 128
# accumulator spills), the forward's rows, K steps and stages (``tile_config``). False: cuBLAS writes float32 dots
# and ``_grad_logits_from_dots_kernel`` reads them (tests compare the two).
FUSED_RECOMPUTE = True
FUSED_BLOCK_C = 64


def _fused_tiles(batch: int, dtype: torch.dtype) -> TileConfig:
    """The forward's rows, K steps and stages at 64 classes (238 registers for bfloat16, 249 for float32's
    tf32x3 on triton 3.9, no spills)."""
    cfg = tile_config(batch, dtype)
    return TileConfig(cfg.block_b, FUSED_BLOCK_C, cfg.block_k, cfg.num_warps, cfg.num_stages)


def _fused(subcenters: int) -> bool:
    """Whether a chunk takes the fused recompute: not with sub-centers, whose running max and index beside the
    accumulator spill (40 bytes on triton 3.9 for bfloat16 even at 64 x 64 tiles, 184 for float32); they keep
    cuBLAS's dots and the elementwise kernel. On the H200 the dots (FUSED_RECOMPUTE = False) made a CurricularFace
    step (B = 1024, C = 1M, bfloat16) faster, 17.2 ms against 19.9 fused (bench/gpu_tile_sweep.py;
    bench/results/h200-2026-12-04b), for B x 4 bytes more temporaries per class of a chunk. But the elementwise
    kernel spills 8 bytes in some bfloat16 / float16 variants, against tests/test_gpu_static.py's rule: on triton
    3.6.0 at 128 rows for plain negatives at an odd C, and at 64 rows for MV-Softmax; on triton 3.9 at 128 rows
    with inter-class filtering. So the default stays fused until that kernel is spill-free."""
    return FUSED_RECOMPUTE and subcenters == 1


def _padded_columns(rows: int, subcenters: int) -> int:
    """Columns of a chunk's dots / D / k buffers for ``rows`` rows of w: whole tiles of classes (of either
    kernel), so that every chunk (the ragged last one of an odd C included) has 16-byte aligned rows and unmasked
    stores."""
    block_c = max(GRAD_BLOCK_C, FUSED_BLOCK_C)
    return triton.cdiv(max(rows // subcenters, 1), block_c) * block_c * subcenters


def grad_chunk(settings: KernelSettings, g, x, w, inv_x, inv_w, target, c0: int, phi, dphi, tau, t, lse):
    """(D (B, n k) in the GEMM dtype, k = -inv_w^2 P (n k,) float32) of one class chunk w (n k, d), the rows of
    the classes c0 .. c0 + n (``target`` holds global class ids, -1 for none): kernels/triton/backward.py. One
    launch (``FUSED_RECOMPUTE``; else two: cuBLAS's float32 dots and the elementwise kernel); no tensor op on the
    targets."""
    batch, columns = x.shape[0], w.shape[0]
    padded = _padded_columns(columns, settings.subcenters)
    d = _empty((batch, padded), _gemm_dtype(x.dtype), x.device)[:, :columns]
    corr = _empty(padded, torch.float32, x.device)
    classes = columns // settings.subcenters
    if batch and columns and _fused(settings.subcenters):
        x, w = _aligned_rows(x), _aligned_rows(w)
        cfg = _fused_tiles(batch, x.dtype)
        _launch(_grad_logits_kernel, (triton.cdiv(classes, cfg.block_c),), x, w, inv_x, inv_w, target, phi,
                dphi, tau, t, lse, g, d, corr, batch, classes, x.shape[1], c0, x.stride(0), w.stride(0), d.stride(0),
                *settings.scalars, **settings.constexprs, BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c,
                BLOCK_K=cfg.block_k, DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)  # fmt: skip
    elif batch and columns:
        dots = _empty((batch, padded), torch.float32, x.device)[:, :columns]
        _mm_float32(x, w.t(), out=dots)  # the one recompute of the chunk's cosines (before normalisation)
        _launch(_grad_logits_from_dots_kernel, (triton.cdiv(classes, GRAD_BLOCK_C),), dots, inv_x, inv_w, target,
                phi, dphi, tau, t, lse, g, d, corr, batch, classes, c0, dots.stride(0), d.stride(0), *settings.scalars,
                **settings.constexprs, BLOCK_B=_grad_block_b(settings.subcenters), BLOCK_C=GRAD_BLOCK_C,
                num_warps=GRAD_WARPS)  # fmt: skip
    elif columns:
        corr.zero_()  # no rows: D is empty and k is 0
    return d, corr[:columns]


# ``_dw_correction_kernel``'s tile: 16 rows x 256 of d over 4 warps (32 values a thread)
CORRECTION_BLOCK_R, CORRECTION_BLOCK_D = 16, 256


def dw_correction(dw: torch.Tensor, w: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = dw + k[:, None] * w (dw (n, d) float32, k (n,) float32, w and out (n, d) in their dtypes; out may be
    dw), summed in float32 and rounded once: one launch (``_dw_correction_kernel``). Traced (torch.compile: a
    Triton launch takes no fake tensor) or rows without a unit stride along d: torch's addcmul, the same sum."""
    rows, features = w.shape
    if _traced(dw) or not all(a.stride(1) == 1 for a in (dw, w, out)):
        if out is dw:
            return dw.addcmul_(w, k.unsqueeze(1))
        return torch.addcmul(dw, w, k.unsqueeze(1), out=out)
    if rows and features:
        block_d = min(CORRECTION_BLOCK_D, triton.next_power_of_2(features))
        _launch(_dw_correction_kernel, (triton.cdiv(rows, CORRECTION_BLOCK_R), triton.cdiv(features, block_d)), dw,
                w, k, out, rows, features, dw.stride(0), w.stride(0), out.stride(0), BLOCK_R=CORRECTION_BLOCK_R,
                BLOCK_D=block_d)  # fmt: skip
    return out


def grad_logits(g, x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, s: float, negatives: int, mv_t: float,
                cos_bound: float, filter_threshold: float, subcenters: int):  # fmt: skip
    """``grad_chunk`` with the settings spelled out and targets relative to w (the op's form, for tracing and
    for facekernels/benchmark/sm90.py's capture)."""
    settings = KernelSettings(s, negatives, mv_t, cos_bound, filter_threshold, subcenters)
    return grad_chunk(settings, g, x, w, inv_x, inv_w, target, 0, phi, dphi, tau, t, lse)


def _gemm_parts(a: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """a as backward GEMM operands of ``dtype`` whose sum is a exactly: [a] (no copy) when a has that dtype; for
    float16, [hi, lo] with hi = bfloat16(a) and lo = bfloat16(a - hi), exact (11 - 8 significant bits), two GEMMs.
    A float16 operand rounded to bfloat16 alone would be off by 2^-8 in direction, and the normalisation
    projections (dx: along x_i, dW: along w_j) cancel most of a near-parallel product: an error of ~2^-8 /
    sin(theta) of the result, where D's own rounding gives 2^-8 of it."""
    if a.dtype != torch.float16:
        return [a.to(dtype)]
    hi = a.to(dtype)
    return [hi, (a.float() - hi.float()).to(dtype)]


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of D and of the backward GEMMs' operands (module docstring: bfloat16 also for float16)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


# mm with a float32 result from bfloat16 operands (cuBLAS accumulates in float32 either way; this skips the
# rounding of each chunk's d x_hat to bfloat16 before the sum over chunks). CUDA only in torch.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_float32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with a float32 result: cuBLAS accumulates in float32 and, for bfloat16 / float16 operands, writes
    float32 instead of rounding to the operands' dtype (a bfloat16 cosine is off by up to 2^-9, s = 64 times
    that in a logit). CUDA has torch.mm(..., out_dtype=); elsewhere (the interpreter tests) the operands are
    upcast first."""
    if a.dtype != torch.float32:
        if a.is_cuda and _MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32, out=out) if out is not None else torch.mm(
                a, b, out_dtype=torch.float32)
        a, b = a.float(), b.float()
    return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)


def _addmm_float32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place, one GEMM launch (acc float32; cuBLAS's beta = 1 reads acc in its epilogue): no
    separate product and ``add_`` pass over it."""
    if a.dtype != torch.float32:
        if a.is_cuda and _MM_OUT_DTYPE:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        a, b = a.float(), b.float()
    return torch.addmm(acc, a, b, out=acc)


# ------------------------------------------------------------------------------------------ ops


@torch.library.custom_op("facekernels::triton_inv_norms", mutates_args=())
def _inv_norms_op(rows: torch.Tensor) -> torch.Tensor:
    with _on_device(rows):
        return inv_norms(rows)


@_inv_norms_op.register_fake
def _(rows):
    return rows.new_empty(rows.shape[0], dtype=torch.float32)


@torch.library.custom_op("facekernels::triton_target_rows", mutates_args=())
def _target_rows_op(x: torch.Tensor, w: torch.Tensor, inv_w: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                    cos_m2: float, sin_m2: float, m3: float, threshold: float, offset: float, cos_bound: float,
                    linear: bool, fallback: bool, straight_through: bool,
                    subcenters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    with _on_device(x):
        inv_x, c, rows, _ = target_rows(x, w, inv_w, target, valid, None, cos_m2, sin_m2, m3, threshold, offset,
                                        cos_bound, linear, fallback, straight_through, subcenters, None)  # fmt: skip
    return inv_x, c, rows


@_target_rows_op.register_fake
def _(x, w, inv_w, target, valid, cos_m2, sin_m2, m3, threshold, offset, cos_bound, linear, fallback,
      straight_through, subcenters):  # fmt: skip
    row = x.new_empty(x.shape[0], dtype=torch.float32)
    return row, row.clone(), x.new_empty((3, x.shape[0]), dtype=torch.float32)


@torch.library.custom_op("facekernels::triton_target_rows_update_t", mutates_args=("t",))
def _target_rows_update_t_op(x: torch.Tensor, w: torch.Tensor, inv_w: torch.Tensor, target: torch.Tensor,
                             valid: torch.Tensor, t: torch.Tensor, cos_m2: float, sin_m2: float, m3: float,
                             threshold: float, offset: float, cos_bound: float, linear: bool, fallback: bool,
                             straight_through: bool, subcenters: int,
                             momentum: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    with _on_device(x):
        return target_rows(x, w, inv_w, target, valid, t, cos_m2, sin_m2, m3, threshold, offset, cos_bound, linear,
                           fallback, straight_through, subcenters, momentum)  # fmt: skip


@_target_rows_update_t_op.register_fake
def _(x, w, inv_w, target, valid, t, cos_m2, sin_m2, m3, threshold, offset, cos_bound, linear, fallback,
      straight_through, subcenters, momentum):  # fmt: skip
    row = x.new_empty(x.shape[0], dtype=torch.float32)
    return row, row.clone(), x.new_empty((3, x.shape[0]), dtype=torch.float32), t.new_empty(())


@torch.library.custom_op("facekernels::triton_margin_lse", mutates_args=())
def _margin_lse_op(x: torch.Tensor, w: torch.Tensor, inv_x: torch.Tensor, inv_w: torch.Tensor, target: torch.Tensor,
                   phi: torch.Tensor, tau: torch.Tensor, t: torch.Tensor | None, s: float, negatives: int,
                   mv_t: float, cos_bound: float, filter_threshold: float, subcenters: int,
                   target_cos: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    # rank: empty without target_cos (an op's output is a tensor)
    with _on_device(x):
        lse, row_max, rank = margin_lse(x, w, inv_x, inv_w, target, phi, tau, t, s, negatives, mv_t, cos_bound,
                                        filter_threshold, subcenters, target_cos)  # fmt: skip
    return lse, row_max, target.new_empty(0) if rank is None else rank


@_margin_lse_op.register_fake
def _(x, w, inv_x, inv_w, target, phi, tau, t, s, negatives, mv_t, cos_bound, filter_threshold, subcenters,
      target_cos=None):  # fmt: skip
    row = x.new_empty(x.shape[0], dtype=torch.float32)
    return row, row.clone(), target.new_empty(x.shape[0] if target_cos is not None else 0)


@torch.library.custom_op("facekernels::triton_grad_logits", mutates_args=())
def _grad_logits_op(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, inv_x: torch.Tensor, inv_w: torch.Tensor,
                    target: torch.Tensor, phi: torch.Tensor, dphi: torch.Tensor, tau: torch.Tensor,
                    t: torch.Tensor | None, lse: torch.Tensor, s: float, negatives: int, mv_t: float,
                    cos_bound: float, filter_threshold: float,
                    subcenters: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    with _on_device(x):
        return grad_logits(g, x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, s, negatives, mv_t, cos_bound,
                           filter_threshold, subcenters)  # fmt: skip


@_grad_logits_op.register_fake
def _(g, x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, s, negatives, mv_t, cos_bound, filter_threshold,
      subcenters):  # fmt: skip
    batch, columns = x.shape[0], w.shape[0]
    d = x.new_empty_strided((batch, columns), (_padded_columns(columns, subcenters), 1), dtype=_gemm_dtype(x.dtype))
    return d, w.new_empty(columns, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ interface


class TritonKernels:
    def compute_dtype(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        if _TRITON_IMPORT_ERROR is not None:
            raise BackendUnavailableError(
                f"backend='triton' needs the triton package, which does not import here ({_TRITON_IMPORT_ERROR}); "
                "install triton (`pip install triton`) or use backend='reference'"
            )
        if embeddings.device.type != "cuda" and not (_INTERPRETED and embeddings.device.type == "cpu"):
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors; got {embeddings.device.type} tensors "
                "(CPU tensors run only under TRITON_INTERPRET=1, for tests); use backend='cpu' or 'reference'"
            )
        dtype = torch.promote_types(embeddings.dtype, weight.dtype)
        if dtype not in _DTYPES:
            raise TypeError(
                f"backend='triton' takes float32, bfloat16 or float16 embeddings and weight; got "
                f"{embeddings.dtype} and {weight.dtype} (float64 is the reference's: use backend='reference')"
            )
        return dtype

    def chunk_classes(self, batch: int, classes: int, dtype: torch.dtype, features: int = CHUNK_FEATURES) -> int:
        """Classes per backward chunk: the chunk's working set between the kernel that writes D and the two
        GEMMs that read it (D in the GEMM dtype, the chunk of W and its float32 dW) within CHUNK_BYTES, whole
        128-class tiles."""
        gemm_size = _gemm_dtype(dtype).itemsize
        per_class = max(batch, 1) * gemm_size + features * (dtype.itemsize + 4)
        return max(128, CHUNK_BYTES // per_class // 128 * 128)

    def inv_norms(self, rows: torch.Tensor) -> torch.Tensor:
        return _inv_norms_op(rows)

    def target_rows(self, x, w, inv_w, target, valid, t, params: HeadParams, training: bool):
        """(inv_x, c, (phi, phi', tau), t_used) of the forward's pre-pass in one or two launches (``target_rows``),
        t updated in place when CurricularFace trains; None for a head it does not cover
        (``covers_target_rows``: the algorithm then runs the torch of _rowmath)."""
        p = params
        if not covers_target_rows(p):
            return None
        fallback = has_fallback_branch(p)
        threshold, offset, _ = fallback_branch(p, p.m2, p.m3) if fallback else (0.0, 0.0, 0.0)
        margins = (math.cos(p.m2), math.sin(p.m2), p.m3, threshold, offset, p.cos_bound, p.target_is_linear,
                   fallback, p.margin_grad == "straight_through", p.subcenters)  # fmt: skip
        if p.uses_t and training:
            return _target_rows_update_t_op(x, w, inv_w, target, valid, t, *margins, p.momentum)
        inv_x, c, rows = _target_rows_op(x, w, inv_w, target, valid, *margins)
        return inv_x, c, rows, (t.detach().clone() if p.uses_t else None)

    def lse(self, x, w, inv_x, inv_w, target, phi, tau, t, params: HeadParams, target_cos=None):
        p = params
        lse, row_max, rank = _margin_lse_op(x, w, inv_x, inv_w, target, phi, tau, t, p.s, int(p.negatives), p.mv_t,
                                            p.cos_bound, p.filter_threshold, p.subcenters, target_cos)  # fmt: skip
        return lse, row_max, (rank if target_cos is not None else None)

    def backward_pass(self, g, x, inv_x, target, phi, dphi, tau, t, lse, params: HeadParams, need_dx: bool,
                      need_dw: bool) -> TritonBackward:  # fmt: skip
        return TritonBackward(g, x, inv_x, target, phi, dphi, tau, t, lse, params, need_dx, need_dw)


def _traced(a: torch.Tensor) -> bool:
    """Whether a is a tracer's stand-in (torch.compile's fake / functional tensors, torch.func's wrappers), which
    a Triton launch cannot take: the chunk then goes through the ``triton_grad_logits`` op, whose fake kernel
    torch.compile traces. Eager tensors (the training step) skip the op's dispatch (~30 us a chunk)."""
    # is_compiling first: Dynamo traces the backward too, and short-circuits here before the functorch query
    return (torch.compiler.is_compiling() or type(a) is not torch.Tensor
            or torch._C._functorch.is_functorch_wrapped_tensor(a))


class TritonBackward:
    """One backward over w's class chunks (facekernels/_algorithm.py drives it): ``chunk`` computes a chunk's
    weight gradient and adds its part of A = d x_hat / ||x|| into one float32 accumulator, ``a`` when done.
    A chunk is three launches when both gradients are needed and the input is not float16: the dots recompute
    and the kernel (``grad_chunk``), A += D W_chunk (``torch.addmm`` into A), dW = D^T X (into the chunk's
    float32 rows of dW when there are such), and one fused correction dW + k w rounded to w's dtype. The
    embeddings' GEMM operands (float16: two bfloat16 parts) are made once per backward, not per chunk."""

    def __init__(self, g, x, inv_x, target, phi, dphi, tau, t, lse, params, need_dx, need_dw):
        self.settings = KernelSettings.of(params)
        self.rows = (g, x, inv_x, target, phi, dphi, tau, t, lse)
        self.need_dx, self.need_dw = need_dx, need_dw
        self.x_parts = _gemm_parts(x, _gemm_dtype(x.dtype)) if need_dw else None
        self.traced = _traced(g) or _traced(x)
        self.a = None

    def chunk(self, c0: int, w: torch.Tensor, inv_w: torch.Tensor, dw_out: torch.Tensor | None):
        g, x, inv_x, target, phi, dphi, tau, t, lse = self.rows
        st = self.settings
        if self.traced:
            local = target - c0 if c0 else target
            d, correction = _grad_logits_op(g, x, w, inv_x, inv_w, local, phi, dphi, tau, t, lse, st.s, st.negatives,
                                            st.mv_t, st.cos_bound, st.filter_threshold, st.subcenters)  # fmt: skip
        else:
            d, correction = grad_chunk(st, g, x, w, inv_x, inv_w, target, c0, phi, dphi, tau, t, lse)
        if self.need_dx:
            for part in _gemm_parts(w, d.dtype):
                self.a = _mm_float32(d, part) if self.a is None else _addmm_float32_(self.a, d, part)
        if not self.need_dw:
            return None
        # D^T X, then the rank-1 normalisation correction k w (kernels/triton/backward.py), both in float32 and
        # rounded once to w's dtype by the correction's one pass: for a class whose rows are nearly parallel to
        # it the correction cancels most of D^T X, and a bfloat16 D^T X would keep its 2^-8 rounding of the
        # cancelled part. The product goes straight into the chunk's rows of the weight gradient when those
        # are float32.
        into = dw_out is not None and dw_out.dtype == torch.float32
        dw = _mm_float32(d.t(), self.x_parts[0], out=dw_out if into else None)
        for part in self.x_parts[1:]:
            _addmm_float32_(dw, d.t(), part)
        out = dw if into else torch.empty_like(w) if dw_out is None else dw_out
        return dw_correction(dw, w, correction, out)


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def _aligned_rows(a: torch.Tensor) -> torch.Tensor:
    """a with unit stride along d and 16-byte aligned rows: the JIT specialises on 16-byte alignment of the
    pointers and strides, and without it takes a slower variant (no vectorised / TMA loads, issue
    "GPU heads at GEMM speed", item 6). One padded copy, with a warning once, for inputs that are not."""
    if a.stride(-1) != 1:
        a = a.contiguous()  # the kernels step along d with unit stride
    aligned = 16 // a.element_size()
    if a.device.type != "cuda" or a.shape[0] == 0 or (a.stride(0) % aligned == 0 and a.data_ptr() % 16 == 0):
        return a
    _warn_once(
        f"facekernels: a {tuple(a.shape)} {a.dtype} input is not 16-byte aligned (stride {a.stride()}, d not a "
        f"multiple of {aligned}, or an offset view); it is copied once per call into an aligned buffer"
    )
    features = a.shape[1]
    padded = torch.zeros(a.shape[0], triton.cdiv(features, aligned) * aligned, dtype=a.dtype, device=a.device)
    padded[:, :features] = a
    return padded[:, :features]


KERNELS = TritonKernels()
