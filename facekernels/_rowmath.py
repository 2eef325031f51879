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

from ._params import NORM_EPS, SIN_THETA_EPS, AdaFaceMargins, ElasticMargins, Fallback, HeadParams, MagFaceMargins


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


def clamp_cosine(raw: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """clamp(raw, -bound, bound) whose gradient is 1 strictly inside (-bound, bound) and 0 elsewhere (spec:
    dc/dx_hat; AdaFace's bound is 1 - eps); NaN stays NaN."""
    inside = (raw > -bound) & (raw < bound)
    return torch.where(inside, raw, raw.detach().clamp(-bound, bound))


def target_cosine(x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, inv_x: torch.Tensor,
                  inv_w: torch.Tensor, p: HeadParams) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(c, inside) of each row's target class in ``w``: c = clamp(x_hat . w_hat_target, -b, b) in the dtype of
    inv_x (b = p.cos_bound; with sub-centers the max over the class's k rows of w, first), and whether the raw
    cosine lies strictly inside (-b, b) (the clamp's derivative). Rows whose target is not in w (target < 0) get
    c = 0, inside = False. O(B d k): the target rows of W are gathered, never W.

    The dot product is taken in float64 (no overflow for any finite float32 input); the kernels use c only
    through phi(c), so the target column's logit is this value on every backend and every rank.
    """
    k, bound = p.subcenters, p.cos_bound
    has = target >= 0
    rows = target.clamp_min(0)
    x64, inv_x64 = x.double(), inv_x.double()
    if k > 1:  # the k rows of each target class, each x row and its inverse norm k times (5 launches fewer without)
        rows = (rows.unsqueeze(1) * k + torch.arange(k, device=target.device)).view(-1)
        x64, inv_x64 = x64.repeat_interleave(k, dim=0), inv_x64.repeat_interleave(k)
    dots = (x64 * w.index_select(0, rows).double()).sum(dim=1)
    raw = dots * inv_x64 * inv_w.index_select(0, rows).double()
    if k > 1:
        raw = first_max(raw.view(-1, k))[0]
    raw = torch.where(has, raw, 0.0)
    inside = has & (raw > -bound) & (raw < bound)
    return raw.clamp(-bound, bound).to(inv_x.dtype), inside


def first_max(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, index of the first maximum) over the last dim; a NaN wins (NaN in, NaN out). Sub-centers: the
    gradient goes to the first maximising one (spec), which torch.max does not promise."""
    best, index = values[..., 0], torch.zeros(values.shape[:-1], dtype=torch.long, device=values.device)
    for j in range(1, values.shape[-1]):
        v = values[..., j]
        better = (v > best) | (v.isnan() & ~best.isnan())
        best, index = torch.where(better, v, best), torch.where(better, j, index)
    return best, index


def _cos(a):
    return torch.cos(a) if isinstance(a, torch.Tensor) else math.cos(a)


def _sin(a):
    return torch.sin(a) if isinstance(a, torch.Tensor) else math.sin(a)


class TargetLogit(NamedTuple):
    phi: torch.Tensor  # the target logit / s
    dphi: torch.Tensor  # d phi / d c (SIN_THETA_EPS-floored; 1 on a fallback branch; 1 for straight-through)
    tau: torch.Tensor  # phi_raw, the hard-negative threshold
    # d phi / d m2 and d phi / d m3, for per-row margins (tensors m2 / m3; MagFace's depend on ||x||); None for
    # the head's own (scalar) margins, which nothing differentiates: not computed (9 launches a step on a GPU)
    dphi_dm2: torch.Tensor | None
    dphi_dm3: torch.Tensor | None


def target_logit(c: torch.Tensor, p: HeadParams, m2=None, m3=None, differentiable: bool = False) -> TargetLogit:
    """Elementwise on target cosines: phi, its derivatives and tau, with the margins m2, m3 of ``p`` or per row
    (tensors like c), carrying no autograd history unless ``differentiable`` (then they are torch expressions
    of c and the margins: differentiating phi' gives the second derivative).

    phi_raw(c) = cos(m1*theta + m2) - m3 with theta = acos(c), so
    d phi_raw / dc  = m1 sin(m1*theta + m2) / sin(theta)       (d theta / dc = -1 / sin theta)
                    = cos m2 + c sin m2 / sin(theta)            when m1 = 1 (cos(theta + m2) = c cos m2 -
                                                                 sin(theta) sin m2: no acos needed),
    d phi_raw / dm2 = -sin(m1*theta + m2),  d phi_raw / dm3 = -1,
    with sin(theta) floored at SIN_THETA_EPS in the derivative only. Fallback.CLIP clips m1*theta + m2 to
    [clip_eps, pi - clip_eps], every derivative 0 where clipped. tau (the hard-negative threshold) is phi_raw
    before any fallback; a fallback branch is c - offset(m2) with d/dc = 1 (spec: "Which fallback").
    """
    m2 = p.m2 if m2 is None else m2
    m3 = p.m3 if m3 is None else m3
    if not differentiable:
        c, m2, m3 = (a.detach() if isinstance(a, torch.Tensor) else a for a in (c, m2, m3))
    per_row = isinstance(m2, torch.Tensor) or isinstance(m3, torch.Tensor)  # d / dm2, d / dm3 wanted
    ones = torch.ones_like(c)
    dm2_raw = None
    if p.target_is_linear:
        phi_raw, dphi_raw = c - m3, ones
        if per_row:
            dm2_raw = torch.zeros_like(c)
    else:
        sin_theta = (1 - c * c).clamp_min(0).sqrt()
        if p.m1 == 1.0 and p.fallback != Fallback.CLIP:
            phi_raw = c * _cos(m2) - sin_theta * _sin(m2) - m3
            dphi_raw = _cos(m2) + c * _sin(m2) / sin_theta.clamp_min(SIN_THETA_EPS)
            if per_row:
                dm2_raw = -(c * _sin(m2) + sin_theta * _cos(m2))
        else:
            angle = p.m1 * torch.acos(c) + m2
            inside = ones
            if p.fallback == Fallback.CLIP:
                inside = ((angle >= p.clip_eps) & (angle <= math.pi - p.clip_eps)).to(c.dtype)
                angle = angle.clamp(p.clip_eps, math.pi - p.clip_eps)
            phi_raw = torch.cos(angle) - m3
            dphi_raw = inside * p.m1 * torch.sin(angle) / sin_theta.clamp_min(SIN_THETA_EPS)
            if per_row:
                dm2_raw = -inside * torch.sin(angle)
    phi, dphi, dm2, dm3 = phi_raw, dphi_raw, dm2_raw, (-ones if per_row else None)
    if has_fallback_branch(p):
        threshold, offset, d_offset = fallback_branch(p, m2, m3)
        use_raw = c > threshold
        phi = torch.where(use_raw, phi_raw, c - offset)
        dphi = torch.where(use_raw, dphi_raw, ones)
        if per_row:
            dm2 = torch.where(use_raw, dm2_raw, -d_offset * ones)
            dm3 = torch.where(use_raw, dm3, 0.0)
    if p.margin_grad == "straight_through":
        dphi = ones
    return TargetLogit(phi, dphi, phi_raw, dm2, dm3)


def has_fallback_branch(p: HeadParams) -> bool:
    """Whether phi takes a fallback branch c - offset (every fallback but NONE and CLIP, which clips instead)."""
    return p.fallback not in (Fallback.NONE, Fallback.CLIP)


def fallback_branch(p: HeadParams, m2, m3):
    """(threshold, offset, d offset / d m2) of the fallback branch (``has_fallback_branch``): phi = phi_raw where
    c > threshold, else c - offset. m2, m3: the head's own (floats) or per row (tensors)."""
    if p.fallback in (Fallback.MONOTONIC, Fallback.OFFSET):
        # theta + m2 > pi  <=>  c < cos(pi - m2), for m2 > 0; never for m2 <= 0 (an ElasticFace draw may be
        # negative: the cosine test alone would take rows with theta > pi - |m2|, theta + m2 < pi)
        if isinstance(m2, torch.Tensor):
            threshold = torch.where(m2 > 0, torch.cos(math.pi - m2), -math.inf)
        else:
            threshold = math.cos(math.pi - m2) if m2 > 0 else -math.inf
    else:  # POSITIVE: c > 0; ABOVE_M3: c > m3
        threshold = m3 if p.fallback == Fallback.ABOVE_M3 else 0.0
    if p.fallback == Fallback.MONOTONIC:  # c - sin(pi - m2) m2
        return threshold, _sin(math.pi - m2) * m2, _sin(m2) + m2 * _cos(m2)
    return threshold, (p.margin_am if p.fallback == Fallback.OFFSET else 0.0), 0.0


class _TargetLogitFunction(torch.autograd.Function):
    """phi(c, m2, m3) whose derivatives are target_logit's (sin theta floored, the fallback's 1,
    straight-through's 1), themselves differentiable: the backward computes them with torch ops on the saved
    inputs, so a second derivative (create_graph=True) differentiates those expressions. m2, m3: per-row tensors
    or None (the head's own)."""

    @staticmethod
    def forward(c, m2, m3, p):
        return target_logit(c, p, m2, m3).phi

    @staticmethod
    def setup_context(ctx, inputs, output):
        c, m2, m3, ctx.params = inputs
        ctx.margins = (m2 is not None, m3 is not None)
        ctx.save_for_backward(c, *(m for m in (m2, m3) if m is not None))

    @staticmethod
    def backward(ctx, grad):
        c, *given = ctx.saved_tensors
        m2 = given.pop(0) if ctx.margins[0] else None
        m3 = given.pop(0) if ctx.margins[1] else None
        d = target_logit(c, ctx.params, m2, m3, differentiable=True)
        return (grad * d.dphi, None if m2 is None else grad * d.dphi_dm2, None if m3 is None else grad * d.dphi_dm3,
                None)  # fmt: skip


def differentiable_target_logit(c: torch.Tensor, p: HeadParams, m2=None, m3=None) -> torch.Tensor:
    """phi(c, m2, m3) with autograd through target_logit's derivatives, to every order (the eager reference's);
    m2, m3: per-row tensors (differentiated) or None."""
    return _TargetLogitFunction.apply(c, m2, m3, p)


class RowMargins(NamedTuple):
    """A step's margins: the head's own (floats) or per row (tensors); for margins that depend on n_i = ||x_i||
    (MagFace) the derivatives by n_i, and the extra per-row loss term and its derivative (None otherwise)."""

    m2: torch.Tensor | float
    m3: torch.Tensor | float
    dm2_dn: torch.Tensor | None = None
    dm3_dn: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    dextra_dn: torch.Tensor | None = None


class MarginState(NamedTuple):
    """The state a head with per-row margins reads (and AdaFace updates) besides the weight."""

    batch_mean: torch.Tensor | None = None  # AdaFace's running statistics of the norms (0-dim, float32 / float64)
    batch_std: torch.Tensor | None = None
    generator: torch.Generator | None = None  # ElasticFace's draws (None: the device's default generator)
    row_margins: torch.Tensor | None = None  # ElasticFace: (B,) margins given by the caller (no draw)


def row_margins(p: HeadParams, norms, c, valid, training: bool, state: MarginState | None) -> RowMargins:
    """The O(B) pre-pass of the heads with per-row margins (``p.row_margins``), over the (global) batch:

    * AdaFace: updates batch_mean / batch_std in place when ``training`` (update_batch_stats_), then
      z_i = clip(h (n_i - mean) / (std + eps), -1, 1) with n_i = clip(||x_i||, 0.001, 100) (``norms``, float64,
      no gradient), m2_i = -m z_i, m3_i = m (1 + z_i). std + eps is formed in the buffers' dtype (as official).
    * MagFace: a_i = clamp(n_i, l_a, u_a), m_i = l_m + slope (a_i - l_a), the row term lambda_g (a_i / u_a^2 +
      1 / a_i) on valid rows; ``norms`` may carry autograd history (the reference differentiates through it);
      dm/dn = slope and d(term)/dn = lambda_g (1 / u_a^2 - 1 / a_i^2) inside [l_a, u_a], 0 outside (the clamp).
    * ElasticFace: ``state.row_margins`` when given; else in training draws (elastic_margins), in eval m.
    Returned in c's dtype.
    """
    r = p.row_margins
    if r is None:
        return RowMargins(p.m2, p.m3)
    if isinstance(r, AdaFaceMargins):
        n = norms.detach().clamp(0.001, 100.0)
        mean, std = state.batch_mean, state.batch_std
        if training:
            # the statistics see an Inf norm (a float16 overflow) as NaN, not as its clip 100: such a batch is
            # skipped (GradScaler) and must update nothing
            update_batch_stats_(mean, std, torch.where(norms.detach().isinf(), math.nan, n), valid, r.t_alpha)
        z = (r.h * (n - mean.double()) / (std + r.eps).double()).clamp(-1.0, 1.0).to(c.dtype)
        return RowMargins(-r.m * z, r.m * (1 + z))
    if isinstance(r, MagFaceMargins):
        a = norms.clamp(r.l_a, r.u_a)
        inside = ((norms >= r.l_a) & (norms <= r.u_a)).to(c.dtype)
        m = (r.l_m + r.slope * (a - r.l_a)).to(c.dtype)
        extra = torch.where(valid, r.lambda_g * (a / r.u_a**2 + 1 / a), 0).to(c.dtype)
        dm_dn = (r.slope * inside).detach()
        dextra_dn = (r.lambda_g * (1 / r.u_a**2 - 1 / a.detach() ** 2)).to(c.dtype) * inside
        if r.angular:
            return RowMargins(m, p.m3, dm_dn, None, extra, dextra_dn)
        return RowMargins(p.m2, m, None, dm_dn, extra, dextra_dn)
    if state is not None and state.row_margins is not None:
        m = state.row_margins.to(c.dtype)
    elif training:
        m = elastic_margins(r, c, valid, None if state is None else state.generator)
    else:
        m = torch.full_like(c, r.m)
    return RowMargins(m, p.m3) if r.angular else RowMargins(p.m2, m)


def elastic_margins(r: ElasticMargins, c: torch.Tensor, valid: torch.Tensor, generator=None) -> torch.Tensor:
    """ElasticFace's per-row margins of a training step (c: the target cosines, used by ``plus``).

    One float32 draw N(r.m, r.std^2) per row of the batch, ``generator``'s (the default one of c's device when
    None), on the generator's device; valid row r-th in row order takes draw r. Without ignored rows this is the
    official ``torch.normal(mean=m, std=std, size=(B, 1))`` draw, and it needs no host sync to count the valid rows.
    plus=True pairs them by rank: the k-th largest target cosine (ties: the lower row) gets the k-th smallest
    margin. plus="official" reproduces the published code: valid row r gets sorted_margins[order[r]], order the
    valid rows' descending sort by target cosine (a gather where pairing by rank needs a scatter).
    """
    device = generator.device if generator is not None else c.device
    draws = torch.normal(r.m, r.std, size=(c.shape[0],), dtype=torch.float32, generator=generator, device=device)
    if draws.device != c.device:
        # a CPU generator with CUDA embeddings: a copy from pinned memory does not wait for the GPU's queued work
        # (one from pageable memory would, every step)
        draws = draws.pin_memory().to(c.device, non_blocking=True) if c.is_cuda else draws.to(c.device)
    rank = (valid.cumsum(0) - 1).clamp_min(0)  # the row's position among the valid rows
    m = torch.where(valid, draws[rank], math.inf)
    if r.plus is not False:
        ascending = m.sort().values  # the valid rows' margins, then +inf for the others
        order = torch.sort(torch.where(valid, c.float(), -math.inf), descending=True, stable=True).indices
        if r.plus is True:
            m = torch.empty_like(ascending).scatter_(0, order, ascending)
        else:
            m = ascending[rank[order[rank]]]
    return torch.where(valid, m, r.m).to(c.dtype)


def update_batch_stats_(batch_mean, batch_std, norms, valid, alpha: float) -> None:
    """AdaFace: mean <- alpha mean(n) + (1 - alpha) mean, std <- alpha std(n) + (1 - alpha) std (unbiased) over
    the valid rows, in place, in float64 rounded once to the buffers' dtype. std needs 2 valid rows (one row's
    unbiased std is NaN and would poison every later margin); a non-finite statistic (a NaN embedding) leaves
    its buffer as it is, as update_t_ does. No host sync."""
    with torch.no_grad():
        count = valid.sum()
        n = torch.where(valid, norms.detach().double(), 0)
        mean = n.sum() / count.clamp_min(1)
        std = (torch.where(valid, (n - mean) ** 2, 0).sum() / (count - 1).clamp_min(1)).sqrt()
        new_mean = alpha * mean + (1 - alpha) * batch_mean.double()
        new_std = alpha * std + (1 - alpha) * batch_std.double()
        batch_std.copy_(torch.where((count > 1) & std.isfinite(), new_std, batch_std.double()))
        batch_mean.copy_(torch.where((count > 0) & mean.isfinite(), new_mean, batch_mean.double()))


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


class HeadStats(NamedTuple):
    """What trainers log from a head's logits, per row of the batch (the global batch of a sharded head),
    without the logits: detached, O(B)."""

    target_cosine: torch.Tensor  # cos(theta_y), the target class's cosine; 0 on ignored rows
    correct: torch.Tensor  # bool: the target's logit (margin included) is the row's largest (top-1); False on
    #                        ignored rows
    rank: torch.Tensor  # int64: how many other classes have a margin-free cosine above the target's; -1 on
    #                     ignored rows (target_rank says which cosines and how ties and NaN count)

    def topk(self, k: int) -> torch.Tensor:
        """bool per row: the target is among the k classes of highest margin-free cosine (rank < k), as the
        official CurricularFace trainer's Prec@k (``accuracy(original_logits, labels, topk=(1, 5))``, its
        logits s cos theta before the margin) counts it, ties in the target's favour; False on ignored rows.
        ``topk(1).float().mean()`` is Prec@1 over all rows (divide by the valid rows' count to leave ignored
        rows out)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1; got {k!r}")
        return (self.rank >= 0) & (self.rank < k)


def beats_target(cos: torch.Tensor, target_cos: torch.Tensor) -> torch.Tensor:
    """bool, elementwise: a class of cosine ``cos`` outranks a target of cosine ``target_cos`` (broadcast):
    strictly greater (a tie does not beat the target), or NaN on either side (torch.topk ranks NaN above every
    number, so a NaN row is never top-k). ``not (cos <= target_cos)``: the one rule of every backend's rank
    (the kernels write the same comparison)."""
    return ~(cos <= target_cos)


def target_rank(cos: torch.Tensor, target_cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) int64: how many classes of the (B, C) margin-free cosines ``cos`` (clamped, each class's max over
    its sub-centers: the cosines the logits are built from, before any margin or reweighting) beat_target the
    row's target cosine; the target column (``target``, -1: not in cos) is left out by index, not by value (its
    recomputed cosine may differ from target_cos by a rounding). The eager reference's; the fused kernels count
    the same per tile and never hold ``cos``."""
    beats = beats_target(cos, target_cos.to(cos.dtype).unsqueeze(1))
    own = torch.arange(cos.shape[1], device=cos.device) == target.unsqueeze(1)
    return (beats & ~own).sum(dim=1)


def head_stats(target_cos, target_z, row_max, valid, rank) -> HeadStats:
    """HeadStats from the target cosines, the target logits s*phi, the rows' largest logits and the targets'
    margin-free ranks. The target logit is one of the logits its row's max runs over, so it wins exactly when it
    equals the max (a tie counts)."""
    return HeadStats(torch.where(valid, target_cos, 0).detach(), (valid & (target_z >= row_max)).detach(),
                     torch.where(valid, rank, -1).detach())  # fmt: skip


def reduce_row_losses(row_loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """The heads' reductions: "mean" over the valid (non-ignored) rows, 0 when there is none; "sum"; "none"."""
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / valid.sum().clamp_min(1)
