"""Eager PyTorch margin-softmax heads: the test oracle and the benchmark baseline.

They materialise the (B, C) cosine and logit matrices on purpose, the way CurricularFace's official code
and insightface compute today. Semantics: ``shared/spec/heads.md``; the parametrisation of every head by
(m1, m2, m3, fallback, negatives) is documented in ``facekernels/_params.py``.
"""

from __future__ import annotations

import math

import torch

from .._params import NORM_EPS, SIN_THETA_EPS, Fallback, HeadParams, Negatives


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, eps) row by row."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def clamp_cosine(raw: torch.Tensor) -> torch.Tensor:
    """clamp(raw, -1, 1) whose gradient is 1 strictly inside (-1, 1) and 0 elsewhere (spec: dc/dx_hat)."""
    inside = (raw > -1) & (raw < 1)
    return torch.where(inside, raw, raw.detach().clamp(-1.0, 1.0))


def target_logit(c: torch.Tensor, p: HeadParams):
    """Elementwise on target cosines: (phi, phi', tau), none of them carrying autograd history.

    phi_raw(c) = cos(m1*theta + m2) - m3 with theta = acos(c), so
    d phi_raw / dc = m1 sin(m1*theta + m2) / sin(theta)        (d theta / dc = -1 / sin theta)
                   = cos m2 + c sin m2 / sin(theta)             when m1 = 1,
    with sin(theta) floored at SIN_THETA_EPS. tau (the hard-negative threshold) is phi_raw before any
    fallback; the fallback branch is c - offset with derivative 1.
    """
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


def update_t_(t: torch.Tensor, target_cos: torch.Tensor, valid: torch.Tensor, momentum: float) -> None:
    """CurricularFace: t <- momentum * mean(target cosines of valid rows) + (1 - momentum) * t, in place.

    Stays on the device (no host sync); a batch without a valid row leaves t unchanged.
    """
    with torch.no_grad():
        count = valid.sum()
        total = torch.where(valid, target_cos.detach(), 0).sum(dtype=torch.float64)
        mean = total / count.clamp_min(1)
        new_t = momentum * mean + (1 - momentum) * t.double()
        t.copy_(torch.where(count > 0, new_t, t.double()))


def reduce_row_losses(row_loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The heads' reductions: "mean" over the valid (non-ignored) rows, 0 when there is none; "sum"; "none"."""
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / valid.sum().clamp_min(1)


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: HeadParams,
    t: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Loss of one head, computed in the promoted dtype of (embeddings, weight); returned as float32
    (float64 for float64 inputs). Updates ``t`` in place when the head uses it and ``training``."""
    p = params
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    x_hat = normalize_rows(embeddings.to(dtype))
    w_hat = normalize_rows(weight.to(dtype))
    cos = clamp_cosine(x_hat @ w_hat.t())  # (B, C): materialised on purpose

    valid = labels != p.ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    # the per-row target math runs in float32 at least: phi' reaches 1/SIN_THETA_EPS, beyond float16
    c_target = cos.gather(1, safe_labels).squeeze(1).to(torch.promote_types(dtype, torch.float32))
    phi, dphi, tau = target_logit(c_target, p)
    # value phi, gradient dphi * dc (c - c.detach() is exactly 0 in the forward)
    phi = phi + dphi * (c_target - c_target.detach())

    if p.uses_t and training:
        update_t_(t, c_target, valid, p.momentum)
    if p.negatives == Negatives.PLAIN:
        neg = cos
    else:
        hard = cos.detach() > tau.unsqueeze(1).to(dtype)  # a constant for differentiation
        if p.negatives == Negatives.MV:
            reweighted = (p.mv_t + 1) * cos + p.mv_t
        else:
            reweighted = cos * (t.to(dtype) + cos)  # t is a buffer: not differentiated
        neg = torch.where(hard, reweighted, cos)
    logits = p.s * neg.scatter(1, safe_labels, phi.to(neg.dtype).unsqueeze(1))  # bf16 under autocast
    row_loss = torch.logsumexp(logits, dim=1).to(phi.dtype) - p.s * phi
    row_loss = torch.where(valid, row_loss, 0)

    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return reduce_row_losses(row_loss.to(out_dtype), valid, p.reduction)
