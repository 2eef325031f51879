"""Independent float64 oracles of the heads of heads-more.md (AdaFace, MagFace, ElasticFace, Sub-center ArcFace,
inter-class filtering), written from the spec's formulas and not from facekernels.

Each function works row by row on explicit Python loops, with torch autograd through acos / cos for the exact
margin gradient (and, for MagFace, through the norm into the margin), instead of the library's per-row
(m2, m3, fallback) parametrisation and hand-written derivatives. Everything is float64; the margins that the
spec draws in float32 (ElasticFace) are read as the exact float32 values.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _f32(v: float) -> float:
    """v rounded to float32 (the official buffers and draws are float32)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _unit(v):
    return v / v.norm().clamp_min(1e-12)


def _clamp(v, lo, hi):
    """clamp whose gradient is 0 beyond [lo, hi] (and at the ends); the identity strictly inside."""
    return torch.where((v > lo) & (v < hi), v, v.detach().clamp(lo, hi))


def _valid(y, ignore_index):
    return [int(label) != ignore_index for label in y]


def _reduce(rows, valid, reduction):
    """rows: one 0-dim tensor per row (0 for ignored rows)."""
    out = torch.stack(rows) if rows else torch.zeros(0, dtype=F64)
    if reduction == "none":
        return out
    if reduction == "sum":
        return out.sum()
    return out.sum() / max(sum(valid), 1)


# insightface's DistCrossEntropy takes log(clamp_min(p_target, 1e-30)): a row's loss never exceeds 30 ln 10
INSIGHTFACE_ROW_CAP = 30 * math.log(10)


def _cross_entropy(logits, target):
    z = torch.stack(logits)
    return torch.logsumexp(z, 0) - z[target]


def _straight_through(phi_fn, c, margin_grad):
    """phi_fn(c); with "straight_through" d phi / d c := 1 while every other input of phi_fn (MagFace's margin)
    keeps its gradient: phi evaluated at a detached c, plus (c - c.detach())."""
    if margin_grad == "exact":
        return phi_fn(c)
    return phi_fn(c.detach()) + (c - c.detach())


def arc_target(c, m, fallback="monotonic"):
    """ArcFace's target logit with a named fallback where theta + m > pi (heads.md):
    "none": cos(theta + m) everywhere; "easy_margin": cos(theta + m) if c > 0 else c; "monotonic":
    c - sin(pi - m) m where c <= cos(pi - m); "facexzoo": c there; a number a: c - a there.
    ``m`` may be a float or a 0-dim tensor (MagFace's margin, differentiated)."""
    m = torch.as_tensor(m, dtype=F64)
    raw = torch.cos(torch.acos(c) + m)
    if fallback == "none":
        return raw
    if fallback == "easy_margin":
        return raw if c > 0 else c
    if fallback == "monotonic":
        offset = torch.sin(math.pi - m) * m
    elif fallback == "facexzoo":
        offset = 0.0
    else:
        offset = float(fallback)
    # the fallback replaces cos(theta + m) where theta + m > pi: never for a negative margin (an ElasticFace draw
    # may be one), where the spec's threshold c <= cos(pi - m) would also take rows with theta + m < pi
    return raw if m <= 0 or c > torch.cos(math.pi - m) else c - offset


# ---------------------------------------------------------------------------------------------------- AdaFace


def adaface_stats(norms_valid, batch_mean, batch_std, t_alpha, buffer_dtype=F64):
    """The EMA update of heads-more §1a.2 on the clipped norms of the valid rows: (new mean, new std).

    std unbiased; mean not updated with no valid row, std with fewer than 2 (spec c2); a non-finite statistic
    leaves its buffer as is. With float32 buffers the EMA is float32 arithmetic (float32(a mean) +
    float32(1 - a) mu, each product and the sum rounded), the statistic itself rounded to float32 first.
    """
    n = len(norms_valid)
    mean = sum(norms_valid) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in norms_valid) / (n - 1)) if n >= 2 else math.nan

    def ema(stat, old):
        if not math.isfinite(stat):
            return old
        if buffer_dtype == F64:
            return stat * t_alpha + (1 - t_alpha) * old
        a, b = _f32(t_alpha), _f32(1 - t_alpha)
        return _f32(_f32(_f32(stat) * a) + _f32(b * old))

    return ema(mean, batch_mean), ema(std, batch_std)


def adaface_loss(x, w, y, *, s=64.0, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3, batch_mean=20.0, batch_std=100.0,
                 training=True, buffer_dtype=F64, margin_grad="exact", reduction="mean",
                 ignore_index=-100):  # fmt: skip
    """AdaFace (heads-more §1) on raw x (B, d), w (C, d): returns (loss, mean, std) where (mean, std) are the
    buffers after this step (unchanged in eval). ``batch_mean``/``batch_std`` are the buffer values (floats)."""
    x, w = x.to(F64), w.to(F64)
    valid = _valid(y, ignore_index)
    # 1. clipped norms, detached (the official head receives them as a separate, non-differentiated input)
    norms = [min(max(float(x[i].detach().norm()), 0.001), 100.0) for i in range(len(y))]
    # 2. the EMA first, over the non-ignored rows, training only
    mu, sigma = float(batch_mean), float(batch_std)
    if training:
        mu, sigma = adaface_stats([n for n, v in zip(norms, valid) if v], mu, sigma, t_alpha, buffer_dtype)
    # 3. sigma + eps is formed in the buffer's dtype
    denom = sigma + eps if buffer_dtype == F64 else _f32(sigma + _f32(eps))
    w_hat = [_unit(w[j]) for j in range(w.shape[0])]
    rows = []
    for i in range(len(y)):
        if not valid[i]:
            rows.append(torch.zeros((), dtype=F64))
            continue
        yi = int(y[i])
        # official order: (n - mu) / (sigma + eps), times h, then clip
        z_hat = min(max((norms[i] - mu) / denom * h, -1.0), 1.0)
        g_angle, g_add = -m * z_hat, m * (1 + z_hat)
        x_hat = _unit(x[i])
        # 5. every cosine clamped to [-1 + eps, 1 - eps], zero gradient beyond
        cos = [_clamp(x_hat @ wj, -1 + eps, 1 - eps) for wj in w_hat]

        def phi_fn(c, g_angle=g_angle, g_add=g_add):
            # 6. theta + g_angle clipped to [eps, pi - eps], flat beyond
            return torch.cos(_clamp(torch.acos(c) + g_angle, eps, math.pi - eps)) - g_add

        phi = _straight_through(phi_fn, cos[yi], margin_grad)
        logits = [s * phi if j == yi else s * cos[j] for j in range(len(cos))]
        rows.append(_cross_entropy(logits, yi))
    return _reduce(rows, valid, reduction), mu, sigma


# ---------------------------------------------------------------------------------------------------- MagFace


def magface_margin(a, *, l_a, u_a, l_m, u_m):
    """m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_g(a, *, u_a):
    """The regulariser g(a) = a / u_a^2 + 1 / a."""
    return a / u_a**2 + 1 / a


def magface_loss(x, w, y, *, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True,
                 kind="arc", margin_grad="exact", reduction="mean", ignore_index=-100):  # fmt: skip
    """MagFace (heads-more §2): CE with the norm-dependent margin (differentiated through a = clamp(||x||,
    l_a, u_a)) plus lambda_g g(a) on each valid row."""
    x, w = x.to(F64), w.to(F64)
    valid = _valid(y, ignore_index)
    w_hat = [_unit(w[j]) for j in range(w.shape[0])]
    rows = []
    for i in range(len(y)):
        if not valid[i]:
            rows.append(torch.zeros((), dtype=F64))
            continue
        yi = int(y[i])
        norm = x[i].norm()
        a = norm.clamp(l_a, u_a)  # gradient 1 for l_a <= ||x|| <= u_a, else 0 (spec b)
        m_i = magface_margin(a, l_a=l_a, u_a=u_a, l_m=l_m, u_m=u_m)
        x_hat = x[i] / norm
        cos = [_clamp(x_hat @ wj, -1.0, 1.0) for wj in w_hat]
        if kind == "cos":
            phi_fn = lambda c, m_i=m_i: c - m_i
        else:
            phi_fn = lambda c, m_i=m_i: arc_target(c, m_i, "easy_margin" if easy_margin else "monotonic")
        phi = _straight_through(phi_fn, cos[yi], margin_grad)
        logits = [s * phi if j == yi else s * cos[j] for j in range(len(cos))]
        rows.append(_cross_entropy(logits, yi) + lambda_g * magface_g(a, u_a=u_a))
    return _reduce(rows, valid, reduction)


# ------------------------------------------------------------------------------------------------ ElasticFace


def elastic_draws(n_valid, m, std, generator=None):
    """The official draw (heads-more §3a.1, c7): n_v float32 normals, one per valid row in row order."""
    return torch.normal(mean=m, std=std, size=(n_valid, 1), dtype=torch.float32, generator=generator).reshape(-1)


def elastic_assign(target_cos_valid, draws, plus):
    """The margin of each valid row (list of floats, valid-row order) from the draws (heads-more §3a.2-3).

    plus False: row r gets draws[r]. True (rank-matched, spec): the k-th largest target cosine gets the k-th
    smallest draw, ties to the lower row index. "official": order = argsort(cosines, descending) and row r gets
    sorted(draws)[order[r]] (the published gather).
    """
    c = [float(v) for v in target_cos_valid]
    d = [float(v) for v in draws]
    n = len(c)
    if plus is False:
        return d
    ascending = sorted(d)
    order = sorted(range(n), key=lambda r: (-c[r], r))  # rows by cosine descending, lower index first on ties
    out = [0.0] * n
    for r in range(n):
        if plus == "official":
            out[r] = ascending[order[r]]
        else:
            out[order[r]] = ascending[r]  # the r-th ranked row gets the r-th smallest margin
    return out


def target_cosines(x, w, y, ignore_index=-100):
    """Clamped target cosines of the valid rows, in row order (floats; what ElasticFace+ sorts)."""
    out = []
    for i, v in enumerate(_valid(y, ignore_index)):
        if v:
            xi, wi = x[i].detach().to(F64), w[int(y[i])].detach().to(F64)
            out.append(min(max(float(_unit(xi) @ _unit(wi)), -1.0), 1.0))
    return out


def elastic_margins(x, w, y, *, m, std, plus=False, generator=None, training=True, ignore_index=-100):
    """The per-row margins (B,) float64 of one ElasticFace step: drawn and assigned in training, m in eval;
    ignored rows get m (unused). facekernels draws one value per row of the batch, B of them, and valid row r
    (in row order) takes draw r: no host sync to count the valid rows; the official draw of n_v values when no
    row is ignored (docs/heads.md)."""
    valid = _valid(y, ignore_index)
    out = [float(m)] * len(y)
    if training:
        draws = elastic_draws(len(y), m, std, generator)[: sum(valid)]
        used = elastic_assign(target_cosines(x, w, y, ignore_index), draws, plus)
        for i, v in zip([i for i in range(len(y)) if valid[i]], used):
            out[i] = v
    return torch.tensor(out, dtype=F64)


def elastic_loss(x, w, y, *, s=64.0, margins, kind="arc", fallback="monotonic", margin_grad="exact",
                 reduction="mean", ignore_index=-100):  # fmt: skip
    """ElasticArcFace / ElasticCosFace (heads-more §3) with the given per-row margins (B,) (constants)."""
    x, w = x.to(F64), w.to(F64)
    valid = _valid(y, ignore_index)
    w_hat = [_unit(w[j]) for j in range(w.shape[0])]
    rows = []
    for i in range(len(y)):
        if not valid[i]:
            rows.append(torch.zeros((), dtype=F64))
            continue
        yi, m_i = int(y[i]), float(margins[i])
        x_hat = _unit(x[i])
        cos = [_clamp(x_hat @ wj, -1.0, 1.0) for wj in w_hat]
        if kind == "cos":
            phi_fn = lambda c, m_i=m_i: c - m_i
        else:
            phi_fn = lambda c, m_i=m_i: arc_target(c, m_i, fallback)
        phi = _straight_through(phi_fn, cos[yi], margin_grad)
        logits = [s * phi if j == yi else s * cos[j] for j in range(len(cos))]
        rows.append(_cross_entropy(logits, yi))
    return _reduce(rows, valid, reduction)


# ----------------------------------------------------------------------------------------- Sub-center ArcFace


def subcenter_loss(x, w, y, *, s=64.0, m=0.5, k=3, fallback="monotonic", easy_margin=False, margin_grad="exact",
                   reduction="mean", ignore_index=-100, mxnet_eps=0.0):  # fmt: skip
    """Sub-center ArcFace (heads-more §4): w (C k, d) class-major; a class's cosine is the max over its k
    sub-centers (the first maximum on ties gets the gradient), then ArcFace on that cosine.

    ``mxnet_eps``: normalise by sqrt(||v||^2 + mxnet_eps) (MXNet's L2Normalization uses 1e-10; the spec drops
    it, §4c) -- only to reproduce the official MXNet digits of §4e."""
    x, w = x.to(F64), w.to(F64)
    valid = _valid(y, ignore_index)
    classes = w.shape[0] // k
    unit = _unit if mxnet_eps == 0 else (lambda v: v / ((v * v).sum() + mxnet_eps).sqrt())
    w_hat = [unit(w[r]) for r in range(w.shape[0])]
    rows = []
    for i in range(len(y)):
        if not valid[i]:
            rows.append(torch.zeros((), dtype=F64))
            continue
        yi = int(y[i])
        x_hat = unit(x[i])
        cos = []
        for j in range(classes):
            best = None
            for sub in range(k):
                c = _clamp(x_hat @ w_hat[j * k + sub], -1.0, 1.0)
                if best is None or c > best:  # strict: a later equal value does not replace the first
                    best = c
            cos.append(best)
        phi_fn = lambda c: arc_target(c, m, "easy_margin" if easy_margin else fallback)
        phi = _straight_through(phi_fn, cos[yi], margin_grad)
        logits = [s * phi if j == yi else s * cos[j] for j in range(classes)]
        rows.append(_cross_entropy(logits, yi))
    return _reduce(rows, valid, reduction)


# -------------------------------------------------------------------------------------- inter-class filtering


def filtered_loss(x, w, y, *, head, threshold, s=64.0, m=None, m1=1.0, m2=0.5, m3=0.0, easy_margin=False,
                  fallback="monotonic", margin_grad="exact", reduction="mean", ignore_index=-100):  # fmt: skip
    """NormSoftmax / ArcFace / CosFace / CombinedMargin with insightface's inter-class filtering (heads-more
    §5): a negative with c_ij > threshold (strict; threshold 0 = off) gets the constant logit 0 (it still adds
    e^0 to the row's sum, and gets no gradient); the target is never filtered.

    Targets as heads.md: ArcFace and CombinedMargin with m1 = 1, m3 = 0 take ``fallback`` (or easy_margin);
    the general combined margin cos(m1 theta + m2) - m3 has none."""
    x, w = x.to(F64), w.to(F64)
    valid = _valid(y, ignore_index)
    w_hat = [_unit(w[j]) for j in range(w.shape[0])]
    if head == "arcface":
        phi_fn = lambda c: arc_target(c, 0.5 if m is None else m, "easy_margin" if easy_margin else fallback)
    elif head == "cosface":
        phi_fn = lambda c: c - (0.35 if m is None else m)
    elif head == "combined" and m1 == 1.0 and m3 == 0.0:
        phi_fn = lambda c: arc_target(c, m2, fallback)
    elif head == "combined":
        phi_fn = lambda c: torch.cos(m1 * torch.acos(c) + m2) - m3
    else:  # norm_softmax
        phi_fn = lambda c: c
    rows = []
    for i in range(len(y)):
        if not valid[i]:
            rows.append(torch.zeros((), dtype=F64))
            continue
        yi = int(y[i])
        x_hat = _unit(x[i])
        cos = [_clamp(x_hat @ wj, -1.0, 1.0) for wj in w_hat]
        phi = _straight_through(phi_fn, cos[yi], margin_grad)
        logits = []
        for j, c in enumerate(cos):
            if j == yi:
                logits.append(s * phi)
            elif threshold > 0 and c > threshold:
                logits.append(torch.zeros((), dtype=F64))  # filtered: a constant 0, not removed
            else:
                logits.append(s * c)
        rows.append(_cross_entropy(logits, yi))
    return _reduce(rows, valid, reduction)
