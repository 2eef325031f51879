"""The O(B) per-row math of the heads, in torch: the one definition shared by the head algorithm
(``facekernels/_algorithm.py``, every device and the sharded mode) and the eager reference.

Everything here is per row (or per class vector), never per (row, class) pair: the target cosine and its
logit phi = phi(c), phi' and the hard-negative threshold tau, CurricularFace's t, the combine of partial
log-sum-exps, and the reductions. The kernels receive these as per-row tensors and apply the per-class
math (``N(c)``: Triton ``kernels/triton/head_math.py``, C++ ``csrc/include/facekernels/head_math.h``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._params import NORM_EPS, SIN_THETA_EPS, Fallback, HeadParams


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation (and loss) dtype of inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(a: torch.Tensor) -> torch.Tensor:
    """||a_r|| per row, in float64: a float32 (or float16) sum of squares overflows for rows with norms above
    ~1.8e19 (256 for float16) and would turn such rows into zero vectors. For O(B d) tensors and the reference;
    the kernels compute the (C,) class norms themselves without a float64 copy of W."""
    return torch.linalg.vector_norm(a, dim=1, dtype=torch.float64)


def normalize_rows(a: torch.Tensor) -> torch.Tensor:
    """a / max(||a||, eps) row by row, returned in a's dtype. The norm is taken in float64 (row_norms) and the
    division in float32 at least: a float16 norm above 65504 would be inf and turn the row into zeros."""
    wide = torch.promote_types(a.dtype, torch.float32)
    return (a.to(wide) / row_norms(a).clamp_min(NORM_EPS).to(wide).unsqueeze(1)).to(a.dtype)


def clamp_cosine(raw: torch.Tensor) -> torch.Tensor:
    """clamp(raw, -1, 1) whose gradient is 1 strictly inside (-1, 1) and 0 elsewhere (spec: dc/dx_hat); NaN
    stays NaN."""
    inside = (raw > -1) & (raw < 1)
    return torch.where(inside, raw, raw.detach().clamp(-1.0, 1.0))


def target_cosine(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, inv_x: torch.Tensor,
                  inv_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(c, inside) of each row's target class in ``w``: c = clamp(x_hat . w_hat_target, -1, 1) in the dtype of
    inv_x, and whether the raw cosine lies strictly inside (-1, 1) (the clamp's derivative). Rows whose target
    is not in w (target < 0) get c = 0, inside = False. O(B d): the target rows of W are gathered, never W.

    The dot product is taken in float64 (no overflow for any finite float32 input); the kernels use c only
    through phi(c), so the target column's logit is this value on every backend and every rank.
    """
    has = target >= 0
    rows = target.clamp_min(0)
    dots = (x.double() * w.index_select(0, rows).double()).sum(dim=1)
    raw = dots * inv_x.double() * inv_w.index_select(0, rows).double()
    raw = torch.where(has, raw, 0.0)
    inside = has & (raw > -1) & (raw < 1)
    return raw.clamp(-1.0, 1.0).to(inv_x.dtype), inside


def target_logit(c: torch.Tensor, p: HeadParams, differentiable: bool = False):
    """Elementwise on target cosines: (phi, phi', tau), carrying no autograd history unless ``differentiable``
    (then they are torch expressions of c: differentiating phi' gives the second derivative).

    phi_raw(c) = cos(m1*theta + m2) - m3 with theta = acos(c), so
    d phi_raw / dc = m1 sin(m1*theta + m2) / sin(theta)        (d theta / dc = -1 / sin theta)
                   = cos m2 + c sin m2 / sin(theta)             when m1 = 1 (cos(theta + m2) = c cos m2 -
                                                                 sin(theta) sin m2: no acos needed),
    with sin(theta) floored at SIN_THETA_EPS in the derivative only. tau (the hard-negative threshold) is
    phi_raw before any fallback; the fallback branch is c - offset with derivative 1 (spec: "Which fallback").
    """
    if not differentiable:
        c = c.detach()
    if p.target_is_linear:
        phi_raw = c - p.m3
        dphi_raw = torch.ones_like(c)
    else:
        sin_theta = (1 - c * c).clamp_min(0).sqrt()
        if p.m1 == 1.0:
            phi_raw = c * math.cos(p.m2) - sin_theta * math.sin(p.m2) - p.m3
            dphi_raw = math.cos(p.m2) + c * math.sin(p.m2) / sin_theta.clamp_min(SIN_THETA_EPS)
        else:
            angle = p.m1 * torch.acos(c) + p.m2
            phi_raw = torch.cos(angle) - p.m3
            dphi_raw = p.m1 * torch.sin(angle) / sin_theta.clamp_min(SIN_THETA_EPS)
    if p.fallback == Fallback.NONE:
        phi, dphi = phi_raw, dphi_raw
    else:
        use_raw = c > p.fallback_threshold
        phi = torch.where(use_raw, phi_raw, c - p.fallback_offset)
        dphi = torch.where(use_raw, dphi_raw, torch.ones_like(c))
    if p.margin_grad == "straight_through":
        dphi = torch.ones_like(c)
    return phi, dphi, phi_raw


class _TargetLogitFunction(torch.autograd.Function):
    """phi(c) whose derivative is target_logit's phi' (sin theta floored, the fallback's 1, straight-through's 1),
    itself differentiable: the backward computes phi' with torch ops on the saved c, so a second derivative
    (create_graph=True) differentiates that expression."""

    @staticmethod
    def forward(c, p):
        return target_logit(c, p)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.params = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        return grad * target_logit(c, ctx.params, differentiable=True)[1], None


def differentiable_target_logit(c: torch.Tensor, p: HeadParams) -> torch.Tensor:
    """phi(c) with autograd through target_logit's derivatives, to every order (the eager reference's)."""
    return _TargetLogitFunction.apply(c, p)


def update_t_(t: torch.Tensor, target_cos: torch.Tensor, valid: torch.Tensor, momentum: float) -> None:
    """CurricularFace: t <- momentum * mean(target cosines of valid rows) + (1 - momentum) * t, in place.

    Stays on the device (no host sync). A batch without a valid row, or whose mean target cosine is not finite
    (a NaN / Inf embedding: AMP's GradScaler skips such a step, and t must survive it), leaves t unchanged.
    """
    with torch.no_grad():
        count = valid.sum()
        total = torch.where(valid, target_cos.detach(), 0).sum(dtype=torch.float64)
        mean = total / count.clamp_min(1)
        new_t = momentum * mean + (1 - momentum) * t.double()
        t.copy_(torch.where((count > 0) & mean.isfinite(), new_t, t.double()))


def combine_lse(lse: torch.Tensor, dim: int) -> torch.Tensor:
    """log(sum(exp(lse))) over ``dim`` of partial log-sum-exps, shifted by their max; a partial of -inf (no
    class) adds nothing, and a NaN partial makes the result NaN (torch.amax keeps NaN)."""
    top = lse.amax(dim=dim, keepdim=True)
    top = torch.where(top == -math.inf, 0.0, top)  # every partial -inf: stays -inf instead of NaN
    return (top + torch.exp(lse - top).sum(dim=dim, keepdim=True).log()).squeeze(dim)


class HeadStats(NamedTuple):
    """What trainers log from a head's logits, per row of the batch (the global batch of a sharded head),
    without the logits: detached, O(B)."""

    target_cosine: torch.Tensor  # cos(theta_y), the target class's cosine; 0 on ignored rows
    correct: torch.Tensor  # bool: the target's logit (margin included) is the row's largest (top-1); False on
    #                        ignored rows


def head_stats(target_cos, target_z, row_max, valid) -> HeadStats:
    """HeadStats from the target cosines, the target logits s*phi and the rows' largest logits. The target logit
    is one of the logits its row's max runs over, so it wins exactly when it equals the max (a tie counts)."""
    return HeadStats(torch.where(valid, target_cos, 0).detach(), (valid & (target_z >= row_max)).detach())


def reduce_row_losses(row_loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The heads' reductions: "mean" over the valid (non-ignored) rows, 0 when there is none; "sum"; "none"."""
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / valid.sum().clamp_min(1)
