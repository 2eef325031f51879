"""The Triton backend of the margin-softmax heads: ``margin_cross_entropy`` with the reference's
signature and semantics (``facekernels/reference/heads.py``), never forming a (B, C) tensor.

Three ops are registered through ``torch.library.custom_op`` (so ``torch.compile(fullgraph=True)`` traces a
module that uses them, the backward included):

* ``facekernels::triton_head_prepass``   (x, W, target) -> inv_x, inv_w, c, phi, phi', tau   O(B + C)
* ``facekernels::triton_margin_ce``      -> per-row loss (B,), lse (B,); autograd registered
* ``facekernels::triton_margin_ce_backward`` -> d(embeddings), d(weight)

CurricularFace's t is updated between the pre-pass and the main forward with torch ops on the device
(``facekernels.reference.heads.update_t_``: the one definition of that EMA), and read by the kernels from
its pointer, so a new t neither syncs nor recompiles.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch

from .._backends import BackendUnavailableError
from .._params import NORM_EPS, SIN_THETA_EPS, HeadParams, Negatives
from ..reference.heads import reduce_row_losses, update_t_

try:
    import triton
except ImportError as err:  # the backend raises BackendUnavailableError when it is asked for
    triton = None
    _TRITON_IMPORT_ERROR: ImportError | None = err
else:
    _TRITON_IMPORT_ERROR = None
    from .head_math import TARGET_ARC, TARGET_GENERAL, TARGET_LINEAR
    from .margin_ce_bwd import _dw_kernel, _dx_partial_kernel
    from .margin_ce_fwd import _inv_norm_kernel, _lse_partial_kernel, _target_kernel, _target_logit_kernel

# Triton decides at decoration time whether its kernels run under the interpreter (CPU tensors).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Tests set this to fill every buffer a kernel writes with NaN first, so an unwritten element shows.
POISON_OUTPUTS = False


@dataclass(frozen=True)
class KernelConfig:
    block_b: int  # rows per forward tile
    block_c: int  # classes per forward tile (and the unit of the class splits)
    block_k: int  # reduction step over d when recomputing cosines
    dx_block_b: int  # rows per dX tile
    dx_block_c: int  # classes per dX tile
    dx_block_d: int  # feature slice a dX program owns
    dw_block_b: int  # rows per dW tile
    dw_block_c: int  # classes a dW program owns
    dw_block_d: int  # feature slice a dW program owns
    n_splits: int  # class splits of the forward and of dX
    num_warps: int = 8
    num_stages: int = 2


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def select_config(batch: int, classes: int, features: int, device: torch.device) -> KernelConfig:
    """Tiles for B <= ~1024 and C up to millions. NOT yet timed on a GPU (the tuning run is owed).

    Chosen from the ptxas resource usage of AOT builds for sm_90 (8 warps, triton 3.6 and 3.9, bfloat16,
    float16 and float32): a backward program that owns a feature slice narrower than d recomputes its
    cosine tiles once per slice, so the backward tiles hold the whole of d <= 512 in one slice, at widths
    that build with at most ~128 bytes of register spill: dX 32 rows x 32 classes x 512 features, dW
    32 x 32 x 512 (32 x 64 x 256 and 64 x 32 x 256 for d <= 256), forward 64 x 128 x 64. Wider d takes
    several slices.

    The class splits are sized so that (row blocks x splits) fills the SMs a few times over, and capped so
    the float32 dX partial buffer (n_splits, B, d) stays small next to W.
    """
    def rows(cap):
        return min(cap, max(16, triton.next_power_of_2(batch)))

    slice_d = min(512, max(16, triton.next_power_of_2(features)))
    wide = slice_d > 256
    block_b, block_c = rows(64), 128
    block_k = min(64, max(16, triton.next_power_of_2(features)))
    class_tiles = triton.cdiv(classes, block_c)
    if device.type == "cuda":
        programs = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        n_splits = min(class_tiles, max(1, triton.cdiv(programs, triton.cdiv(batch, block_b))), 64)
    else:  # the interpreter: a couple of splits, to exercise the combine step
        n_splits = min(class_tiles, 2)
    return KernelConfig(
        block_b, block_c, block_k,
        dx_block_b=rows(32), dx_block_c=32 if wide else 64, dx_block_d=slice_d,
        dw_block_b=rows(32 if wide else 64), dw_block_c=32, dw_block_d=slice_d,
        n_splits=n_splits,
    )  # fmt: skip


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _on_input_device(op):
    """Run op with the device of its first tensor argument current: Triton launches on the current
    device, which need not be the inputs' one."""

    @functools.wraps(op)
    def run(x, *args):
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return op(x, *args)

    return run


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs follow torch's matmul setting (the reference's x_hat @ w_hat.T does the same)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _split_classes(classes: int, cfg: KernelConfig) -> tuple[int, int]:
    """(classes per split, number of splits), every split non-empty and a whole number of class tiles."""
    tiles_per_split = triton.cdiv(triton.cdiv(classes, cfg.block_c), cfg.n_splits)
    per_split = tiles_per_split * cfg.block_c
    return per_split, triton.cdiv(classes, per_split)


# ------------------------------------------------------------------------------------------ the ops


@torch.library.custom_op("facekernels::triton_head_prepass", mutates_args=())
@_on_input_device
def _prepass(
    x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, m1: float, m2: float, m3: float,
    target_form: int, fallback: int, threshold: float, offset: float, straight_through: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    (batch, features), classes = x.shape, w.shape[0]
    inv_x = _empty(batch, torch.float32, x.device)
    inv_w = _empty(classes, torch.float32, x.device)
    c, phi, dphi, tau = (_empty(batch, torch.float32, x.device) for _ in range(4))
    block_k = min(128, max(16, triton.next_power_of_2(features)))
    rows_per_program = 32
    if batch > 0:
        _inv_norm_kernel[(triton.cdiv(batch, rows_per_program),)](
            x, inv_x, batch, features, x.stride(0), BLOCK_R=rows_per_program, BLOCK_K=block_k, eps=NORM_EPS
        )
    _inv_norm_kernel[(triton.cdiv(classes, rows_per_program),)](
        w, inv_w, classes, features, w.stride(0), BLOCK_R=rows_per_program, BLOCK_K=block_k, eps=NORM_EPS
    )
    if batch > 0:
        _target_kernel[(triton.cdiv(batch, rows_per_program),)](
            x, w, target, inv_x, inv_w, c, phi, dphi, tau, batch, features, x.stride(0), w.stride(0),
            m1, math.cos(m2), math.sin(m2), m2, m3, threshold, offset, SIN_THETA_EPS,
            TARGET_FORM=target_form, FALLBACK=fallback, STRAIGHT_THROUGH=straight_through,
            BLOCK_R=rows_per_program, BLOCK_K=block_k,
        )  # fmt: skip
    return inv_x, inv_w, c, phi, dphi, tau


@_prepass.register_fake
def _(x, w, target, m1, m2, m3, target_form, fallback, threshold, offset, straight_through):
    row = x.new_empty(x.shape[0], dtype=torch.float32)
    return row, w.new_empty(w.shape[0], dtype=torch.float32), row.clone(), row.clone(), row.clone(), row.clone()


@torch.library.custom_op("facekernels::triton_margin_ce", mutates_args=())
@_on_input_device
def _margin_ce(
    x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, inv_x: torch.Tensor, inv_w: torch.Tensor,
    phi: torch.Tensor, dphi: torch.Tensor, tau: torch.Tensor, t: torch.Tensor, s: float, negatives: int,
    mv_t: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(per-row loss, lse): loss_i = lse_i - s phi_i for rows with target >= 0, else 0."""
    (batch, features), classes = x.shape, w.shape[0]
    cfg = select_config(batch, classes, features, x.device)
    per_split, n_splits = _split_classes(classes, cfg)
    if batch == 0:
        empty = x.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    part_max = _empty((batch, n_splits), torch.float32, x.device)
    part_sum = _empty((batch, n_splits), torch.float32, x.device)
    grid = (triton.cdiv(batch, cfg.block_b), n_splits)
    _lse_partial_kernel[grid](
        x, w, inv_x, inv_w, target, phi, tau, t, part_max, part_sum,
        batch, classes, features, x.stride(0), w.stride(0), per_split, n_splits, s, mv_t,
        NEGATIVES=negatives, BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, BLOCK_K=cfg.block_k,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    # combine the splits' (max, sum exp(z - max)) into lse: O(B * n_splits)
    row_max = part_max.amax(dim=1)
    lse = row_max + torch.log((part_sum * torch.exp(part_max - row_max[:, None])).sum(dim=1))
    row_loss = torch.where(target >= 0, lse - s * phi, 0.0)
    return row_loss, lse


@_margin_ce.register_fake
def _(x, w, target, inv_x, inv_w, phi, dphi, tau, t, s, negatives, mv_t):
    row = x.new_empty(x.shape[0], dtype=torch.float32)
    return row, row.clone()


@torch.library.custom_op("facekernels::triton_margin_ce_backward", mutates_args=())
@_on_input_device
def _margin_ce_backward(
    grad_rows: torch.Tensor, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, inv_x: torch.Tensor,
    inv_w: torch.Tensor, phi: torch.Tensor, dphi: torch.Tensor, tau: torch.Tensor, t: torch.Tensor,
    lse: torch.Tensor, s: float, negatives: int, mv_t: float, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(d embeddings, d weight) of sum_i grad_rows_i loss_i; d weight is an empty tensor if not need_dw."""
    (batch, features), classes = x.shape, w.shape[0]
    cfg = select_config(batch, classes, features, x.device)
    per_split, n_splits = _split_classes(classes, cfg)
    precision = _dot_precision(x.dtype)
    g = torch.where(target >= 0, grad_rows.float(), 0.0).contiguous()  # ignored rows get no gradient
    common = dict(NEGATIVES=negatives, BLOCK_K=cfg.block_k, DOT_PRECISION=precision, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)  # fmt: skip
    if batch > 0:
        dx_part = _empty((n_splits, batch, features), torch.float32, x.device)
        grid = (triton.cdiv(batch, cfg.dx_block_b), n_splits, triton.cdiv(features, cfg.dx_block_d))
        _dx_partial_kernel[grid](
            x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, g, dx_part,
            batch, classes, features, x.stride(0), w.stride(0), per_split, s, mv_t,
            BLOCK_B=cfg.dx_block_b, BLOCK_C=cfg.dx_block_c, BLOCK_D=cfg.dx_block_d, **common,
        )  # fmt: skip
        dx = dx_part.sum(dim=0).to(x.dtype)
    else:
        dx = torch.zeros_like(x)
    if not need_dw:
        return dx, w.new_empty(0)
    dw = _empty(w.shape, w.dtype, w.device)
    _dw_kernel[(triton.cdiv(classes, cfg.dw_block_c), triton.cdiv(features, cfg.dw_block_d))](
        x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, g, dw,
        batch, classes, features, x.stride(0), w.stride(0), dw.stride(0), s, mv_t,
        BLOCK_B=cfg.dw_block_b, BLOCK_C=cfg.dw_block_c, BLOCK_D=cfg.dw_block_d, **common,
    )  # fmt: skip
    return dx, dw


@_margin_ce_backward.register_fake
def _(grad_rows, x, w, target, inv_x, inv_w, phi, dphi, tau, t, lse, s, negatives, mv_t, need_dw):
    return torch.empty_like(x), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, target, inv_x, inv_w, phi, dphi, tau, t, s, negatives, mv_t = inputs
    # t is cloned: a later training step updates the buffer in place before this backward may run
    ctx.save_for_backward(x, w, target, inv_x, inv_w, phi, dphi, tau, t.clone(), output[1])
    ctx.scalars = (s, negatives, mv_t)


def _backward(ctx, grad_rows, grad_lse):
    # lse is an auxiliary output (saved for the backward); only the per-row loss is differentiated
    x, w, target, inv_x, inv_w, phi, dphi, tau, t, lse = ctx.saved_tensors
    s, negatives, mv_t = ctx.scalars
    need_dw = ctx.needs_input_grad[1]
    dx, dw = _margin_ce_backward(grad_rows, x, w, target, inv_x, inv_w, phi, dphi, tau, t, lse, s, negatives,
                                 mv_t, need_dw)  # fmt: skip
    return dx, (dw if need_dw else None), None, None, None, None, None, None, None, None, None, None


if triton is not None:
    _margin_ce.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ entry point


def _target_form(p: HeadParams) -> int:
    if p.target_is_linear:
        return TARGET_LINEAR
    return TARGET_ARC if p.m1 == 1.0 else TARGET_GENERAL


def target_logit_of_cosine(c: torch.Tensor, p: HeadParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phi, phi', tau) in float32 of given target cosines c (float32, (B,)): the class-sharded mode's rows
    take them from the all-reduced global target cosine, not from a local target column."""
    phi, dphi, tau = (_empty(c.shape[0], torch.float32, c.device) for _ in range(3))
    rows_per_program = 32
    if c.shape[0] > 0:
        with torch.cuda.device(c.device) if c.is_cuda else contextlib.nullcontext():
            _target_logit_kernel[(triton.cdiv(c.shape[0], rows_per_program),)](
                c, phi, dphi, tau, c.shape[0], p.m1, math.cos(p.m2), math.sin(p.m2), p.m2, p.m3,
                p.fallback_threshold, p.fallback_offset, SIN_THETA_EPS, TARGET_FORM=_target_form(p),
                FALLBACK=int(p.fallback), STRAIGHT_THROUGH=p.margin_grad == "straight_through",
                BLOCK_R=rows_per_program,
            )  # fmt: skip
    return phi, dphi, tau


def _check_backend(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
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
            f"backend='triton' takes float32, bfloat16 or float16 embeddings and weight; got {embeddings.dtype} "
            f"and {weight.dtype} (float64 is the reference's: use backend='reference')"
        )
    return dtype


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: HeadParams,
    t: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Fused loss of one head: float32; reduction mean over non-ignored rows (0 when none), sum or none.
    Updates ``t`` in place (CurricularFace, training) before the negatives are formed, on the device."""
    p = params
    dtype = _check_backend(embeddings, weight)
    x = embeddings.to(dtype).contiguous()
    w = weight.to(dtype).contiguous()
    valid = labels != p.ignore_index
    target = torch.where(valid, labels, -1)  # ignore_index may be a class id: -1 matches no column
    with torch.no_grad():
        inv_x, inv_w, c, phi, dphi, tau = _prepass(
            x.detach(), w.detach(), target, p.m1, p.m2, p.m3, _target_form(p), int(p.fallback),
            p.fallback_threshold, p.fallback_offset, p.margin_grad == "straight_through",
        )  # fmt: skip
    if p.negatives == Negatives.CURRICULAR:
        if training:
            update_t_(t, c, valid, p.momentum)
        # the value this step used, saved for the backward: the caller's buffer moves on at the next
        # forward, which may run before this backward (gradient accumulation)
        t_arg = t.detach().clone()
    else:
        t_arg = phi  # not read by the kernels (their NEGATIVES constexpr skips the load)
    row_loss, _ = _margin_ce(x, w, target, inv_x, inv_w, phi, dphi, tau, t_arg, p.s, int(p.negatives), p.mv_t)
    return reduce_row_losses(row_loss, valid, p.reduction)
