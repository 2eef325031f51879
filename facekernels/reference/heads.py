"""Eager PyTorch margin-softmax heads: the test oracle and the benchmark baseline.

They materialise the (B, C) cosine and logit matrices on purpose, the way CurricularFace's official code
and insightface compute today. Semantics: ``docs/heads.md``; the parametrisation of every head by
(m1, m2, m3, fallback, negatives) is documented in ``facekernels/_params.py``; the per-row math (phi, phi',
tau, t) is ``facekernels/_rowmath.py``'s, the one definition every backend uses.
"""

from __future__ import annotations

import math

import torch

from .._params import HeadParams, Negatives
from .._validate import out_of_range_labels
from .._rowmath import (
    MarginState,
    acc_dtype,
    clamp_cosine,
    differentiable_target_logit,
    first_max,
    head_stats,
    normalize_rows,
    reduce_row_losses,
    row_margins,
    row_norms,
    target_logit,
    target_rank,
    update_t_,
)

__all__ = ["clamp_cosine", "eager_margin_cross_entropy", "normalize_rows", "target_logit", "update_t_"]


def eager_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: HeadParams,
    t: torch.Tensor | None = None,
    training: bool = True,
    stats: bool = False,
    state: MarginState | None = None,
):
    """Loss of one head, computed in the promoted dtype of (embeddings, weight); returned as float32
    (float64 for float64 inputs). Updates ``t`` (and ``state``'s AdaFace statistics) in place when the head
    uses it and ``training``. With ``stats``: (loss, HeadStats) read off the logits and cosine matrices."""
    p = params
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    valid = labels != p.ignore_index
    # ignored rows never reach the products: a NaN there would make every class's gradient NaN (NaN * 0)
    x = torch.where(valid.unsqueeze(1), embeddings.to(dtype), 0)
    x_hat = normalize_rows(x)
    w_hat = normalize_rows(weight.to(dtype))
    raw = x_hat @ w_hat.t()  # (B, C k): materialised on purpose
    if p.subcenters > 1:  # a class's cosine is the max over its k sub-centers (gradient to the first maximum)
        raw = first_max(raw.view(raw.shape[0], weight.shape[0] // p.subcenters, p.subcenters))[0]
    cos = clamp_cosine(raw, p.cos_bound)

    # a label outside [0, C) that the label check has not stopped (CUDA labels are checked on the device and
    # reported at a later call, _validate.py): its row reads column 0 (a gather out of range would be a
    # device-side assert) and its loss is NaN, as the fused path's
    out_of_range = out_of_range_labels(labels, cos.shape[1], p.ignore_index)
    safe_labels = torch.where(valid & ~out_of_range, labels, 0).unsqueeze(1)
    # the per-row target math runs in float32 at least: phi' reaches 1/SIN_THETA_EPS, beyond float16
    c_target = cos.gather(1, safe_labels).squeeze(1).to(torch.promote_types(dtype, torch.float32))
    # MagFace's margins carry autograd history through the norms: phi differentiates through them
    margins = row_margins(p, row_norms(x) if p.row_margins is not None else None, c_target.detach(), valid,
                          training, state)  # fmt: skip
    # an ignored row's margin is never used; a NaN there (a given row_margins) would reach every class's gradient
    # through the row's logits (0 * NaN), so it is replaced, as the fused path never reads it
    m2, m3 = (torch.where(valid, m, 0) if isinstance(m, torch.Tensor) else None for m in (margins.m2, margins.m3))
    tau = target_logit(c_target, p, m2, m3).tau
    phi = differentiable_target_logit(c_target, p, m2, m3)  # phi' as the spec has it, to every order

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
    if p.filter_threshold != math.inf:  # inter-class filtering: the logit 0, no gradient (the target is set below)
        neg = torch.where(cos.detach() > p.filter_threshold, 0.0, neg)
    logits = p.s * neg.scatter(1, safe_labels, phi.to(neg.dtype).unsqueeze(1))  # bf16 under autocast
    row_loss = torch.logsumexp(logits, dim=1).to(phi.dtype) - p.s * phi
    if margins.extra is not None:
        row_loss = row_loss + margins.extra
    row_loss = torch.where(valid, torch.where(out_of_range, torch.nan, row_loss), 0)

    loss = reduce_row_losses(row_loss.to(acc_dtype(dtype)), valid, p.reduction)
    if not stats:
        return loss
    # the margin-free rank from the cosine matrix itself: the clamped class cosines, before margin and reweighting
    rank = target_rank(cos.detach(), c_target.detach(), safe_labels.squeeze(1))
    return loss, head_stats(c_target, logits.gather(1, safe_labels).squeeze(1), logits.amax(dim=1), valid, rank)
