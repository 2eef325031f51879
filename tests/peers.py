"""Float64 re-implementations of the heads of the trainers facekernels users migrate from.

Written here from each trainer's published formulas (read at the commits named below), in our own words and
vectorised: they are oracles for tests/test_peers.py and tests/test_convert.py, not copies of the trainers'
code. Each takes the class weights in that trainer's own layout and returns the mean loss over the batch
(with autograd), so a test can compare values and gradients with a facekernels head configured as
docs/migration.md says.

Sources (file, lines):
- insightface @7fadd42 recognition/arcface_torch: partial_fc_v2.py 145-166 (PartialFC_V2.forward: normalise,
  linear, clamp to [-1, 1]), 170-219 (DistCrossEntropyFunc), losses.py 5-58 (CombinedMarginLoss).
- HuangYG123/CurricularFace @68c8727: head/metrics.py 14-61 (ArcFace), 70-105 (CurricularFace); train.py
  (nn.CrossEntropyLoss on the head's first output).
- Tencent/TFace @171ec14 recognition/torchkit/head/localfc: arcface.py 43-57 and curricularface.py 41-57 are
  the CurricularFace formulas, with CurricularFace's EMA weight ``alpha`` = 0.1.
- JDAI-CV/FaceX-Zoo @16b793a: head/ArcFace.py 15-42, head/MV_Softmax.py 18-50, head/CurricularFace.py (the
  official CurricularFace); training_mode/conventional_training/train.py (torch.nn.CrossEntropyLoss).
- KevinMusgrave/pytorch-metric-learning @216a792 src/pytorch_metric_learning/losses:
  large_margin_softmax_loss.py 101-128 (compute_loss), arcface_loss.py 13-42, cosface_loss.py 12-27;
  reducers/mean_reducer.py (the mean of the per-row losses).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_FLOOR = 1e-30  # insightface's DistCrossEntropyFunc floors the target probability here


def rows_with_target_cosines(cos, classes=7, features=5, dtype=torch.float64, seed=0):
    """Inputs on chosen branches: (x (B, d), w (C, d), y) with cos(x_i, w_{y_i}) = cos[i] (float64), x and w
    not normalised, the other cosines random."""
    g = torch.Generator().manual_seed(seed)
    batch = len(cos)
    w = torch.randn(classes, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    w_hat = w / w.norm(dim=1, keepdim=True)
    u = torch.randn(batch, features, generator=g, dtype=torch.float64)
    u = u - (u * w_hat[y]).sum(1, keepdim=True) * w_hat[y]  # orthogonal to the target's class
    u = u / u.norm(dim=1, keepdim=True)
    c = torch.tensor(cos, dtype=torch.float64).unsqueeze(1)
    x = c * w_hat[y] + (1 - c * c).sqrt() * u
    x = x * (0.5 + torch.rand(batch, 1, generator=g, dtype=torch.float64) * 3)
    w = w * (0.5 + torch.rand(classes, 1, generator=g, dtype=torch.float64) * 3)
    return x.to(dtype), w.to(dtype), y


def _one_hot(cos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(cos, dtype=torch.bool)
    mask[torch.arange(len(y)), y] = True
    return mask


def insightface(x, weight, y, *, s, m1, m2, m3, reduction="mean"):
    """arcface_torch on one process (sample_rate 1): PartialFC_V2 + CombinedMarginLoss + DistCrossEntropy.

    ``weight`` is (C, d), as PartialFC_V2 stores it. The cosine matrix is clamped to [-1, 1], then
      * m1 = 1 and m3 = 0 (ArcFace mode): the target entry becomes cos(acos(c) + m2), written into the logits
        under no_grad, so the gradient reaching c is the plain one (straight-through), and nothing replaces
        it where acos(c) + m2 > pi (no fallback);
      * m3 > 0 (CosFace mode): the target entry becomes c - m3, whatever m1 and m2 are.
    The loss is the mean over the rows of -log(max(p_target, 1e-30)); its gradient is (softmax - one_hot) / B,
    the floor changing the value only. (A label -1 marks a row whose class is on another rank there; such
    rows are not modelled here.)
    """
    if bool((y < 0).any()):
        raise ValueError("rows labelled -1 (class on another rank) are not modelled")
    cos = (F.normalize(x) @ F.normalize(weight).T).clamp(-1, 1)
    target = _one_hot(cos, y)
    if m1 == 1.0 and m3 == 0.0:
        shifted = torch.cos(torch.acos(cos) + m2)
        logits = cos + torch.where(target, shifted - cos, 0).detach()  # values replaced, gradient of cos
    elif m3 > 0:
        logits = torch.where(target, cos - m3, cos)
    else:
        raise ValueError("arcface_torch's CombinedMarginLoss takes m1 = 1 and m3 = 0, or m3 > 0")
    row = F.cross_entropy(s * logits, y, reduction="none")
    floored = row.detach().clamp_max(-math.log(LOG_FLOOR))  # -log(max(p, 1e-30)) = min(-log p, 69.08)
    row = row + (floored - row.detach())
    return row.mean() if reduction == "mean" else row


def curricularface_arcface(x, kernel, y, *, s=64.0, m=0.5, reduction="mean"):
    """The official CurricularFace repository's ArcFace (also TFace's): ``kernel`` (d, C), columns
    normalised, cosine clamped to [-1, 1]; target cos(theta + m) where c > cos(pi - m), else
    c - sin(pi - m) m, differentiated exactly (through sqrt(1 - c^2)); nn.CrossEntropyLoss (mean)."""
    cos = (F.normalize(x) @ F.normalize(kernel, dim=0)).clamp(-1, 1)
    target = _one_hot(cos, y)
    c = cos[target]
    raw = c * math.cos(m) - torch.sqrt(1 - c * c) * math.sin(m)
    phi = torch.where(c > math.cos(math.pi - m), raw, c - math.sin(math.pi - m) * m)
    logits = s * cos.masked_scatter(target, phi)
    return F.cross_entropy(logits, y, reduction=reduction)


def curricularface(x, kernel, y, t, *, s=64.0, m=0.5, alpha=0.01, reduction="mean"):
    """The official CurricularFace head (alpha 0.01; TFace's alpha 0.1; FaceX-Zoo's copy): returns
    (loss, new t).

    ``t`` is a float (their buffer, float32). First t <- alpha * mean of the batch's target cosines +
    (1 - alpha) * t (no gradient; rounded to the float32 buffer); then every class whose cosine exceeds
    cos(theta + m) (before the fallback, from the target's own row) gets c (t + c) with the new t, the target
    the ArcFace target above (monotonic fallback, exact gradient); nn.CrossEntropyLoss (mean).
    """
    cos = (F.normalize(x) @ F.normalize(kernel, dim=0)).clamp(-1, 1)
    target = _one_hot(cos, y)
    c = cos[target]
    raw = c * math.cos(m) - torch.sqrt(1 - c * c) * math.sin(m)
    hard = cos.detach() > raw.detach().unsqueeze(1)
    phi = torch.where(c > math.cos(math.pi - m), raw, c - math.sin(math.pi - m) * m)
    t = float(torch.tensor(float(c.detach().mean()) * alpha + (1 - alpha) * t, dtype=torch.float32))
    logits = s * torch.where(hard, cos * (t + cos), cos).masked_scatter(target, phi)
    return F.cross_entropy(logits, y, reduction=reduction), t


def facexzoo_arcface(x, weight, y, *, margin_arc=0.35, margin_am=0.0, scale=32.0, reduction="mean"):
    """FaceX-Zoo's ArcFace: ``weight`` (d, C), columns normalised, cosine clamped to [-1, 1]; target
    cos(theta + margin_arc) where c > cos(pi - margin_arc), else c - margin_am (default 0: c), exact
    gradient; torch.nn.CrossEntropyLoss (mean)."""
    cos = (F.normalize(x) @ F.normalize(weight, dim=0)).clamp(-1, 1)
    target = _one_hot(cos, y)
    c = cos[target]
    raw = c * math.cos(margin_arc) - torch.sqrt(1 - c * c) * math.sin(margin_arc)
    phi = torch.where(c > math.cos(math.pi - margin_arc), raw, c - margin_am)
    return F.cross_entropy(scale * cos.masked_scatter(target, phi), y, reduction=reduction)


def facexzoo_mv_softmax(x, weight, y, *, is_am, margin=0.35, mv_weight=1.12, scale=32.0, reduction="mean"):
    """FaceX-Zoo's MV_Softmax: ``weight`` (d, C), columns normalised, no clamp.

    AM: hard negatives are the classes with c_j > c_y - margin; target c_y - margin where c_y > margin,
    else c_y. Arc: hard negatives c_j > cos(theta_y + margin) (from sqrt(1 - c_y^2)); target
    cos(theta_y + margin) where c_y > 0, else c_y. Hard negatives become mv_weight * c + mv_weight - 1;
    torch.nn.CrossEntropyLoss (mean).
    """
    cos = F.normalize(x) @ F.normalize(weight, dim=0)
    target = _one_hot(cos, y)
    c = cos[target]
    if is_am:
        threshold = c - margin
        phi = torch.where(c > margin, c - margin, c)
    else:
        threshold = c * math.cos(margin) - torch.sqrt(1 - c * c) * math.sin(margin)
        phi = torch.where(c > 0, threshold, c)
    hard = cos.detach() > threshold.detach().unsqueeze(1)
    neg = torch.where(hard, mv_weight * cos + mv_weight - 1, cos)
    return F.cross_entropy(scale * neg.masked_scatter(target, phi), y, reduction=reduction)


def pml_arcface(x, W, y, *, margin_degrees=28.6, scale=64.0, reduction="mean"):
    """pytorch-metric-learning's ArcFaceLoss: ``W`` (d, C); cosine similarity of the normalised embeddings
    and columns (not clamped); the target's angle theta = acos(clamp(c, -1, 1)) becomes cos(theta + m) where
    theta <= pi - m, else cos(theta) - m sin m, with m the margin in radians; cross-entropy per row, mean."""
    m = math.radians(margin_degrees)
    cos = F.normalize(x) @ F.normalize(W.T).T
    target = _one_hot(cos, y)
    theta = torch.acos(cos[target].clamp(-1, 1))
    phi = torch.where(theta <= math.pi - m, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))
    return F.cross_entropy(scale * cos.masked_scatter(target, phi), y, reduction=reduction)


def pml_cosface(x, W, y, *, margin=0.35, scale=64.0, reduction="mean"):
    """pytorch-metric-learning's CosFaceLoss: as ArcFaceLoss with the target c - margin."""
    cos = F.normalize(x) @ F.normalize(W.T).T
    target = _one_hot(cos, y)
    return F.cross_entropy(scale * cos.masked_scatter(target, cos[target] - margin), y, reduction=reduction)
