"""Eager PyTorch triplet loss with in-batch mining: the test oracle and the benchmark baseline.

Semantics: ``docs/triplet.md``. The (B, B) distance matrix is materialised on purpose; the mining
works on chunks of anchors so that memory stays O(B^2 + chunk * B) rather than the (B, B, B) mask that
pytorch-metric-learning and TF-Addons build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._pairs import pair_distances
from .._params import TripletParams
from .heads import normalize_rows

# anchors (or positive pairs) mined at once: bounds the chunk * B (and chunk * B * B for "all") masks
_CHUNK_ELEMENTS = 1 << 24


def pairwise_distances(embeddings: torch.Tensor, distance: str, normalize: bool) -> torch.Tensor:
    """(B, B) distances, exactly 0 on the diagonal and between equal rows, floored at 0, in float32 (float64 for
    float64 inputs); differentiable (``facekernels._pairs.pair_distances``).
    """
    # float32 at least: a float16 row of norm 256 has a squared norm past float16's 65504 (NaN distances),
    # and normalising in float16 overflows at norm 65504 (zero rows)
    e = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    e = normalize_rows(e) if normalize else e
    if distance == "cosine" and not normalize:
        e = normalize_rows(e)
    return pair_distances(e, distance)


def _masked_argmin(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest index among the smallest masked values (torch.argmin returns the first)."""
    return torch.where(mask, values, torch.inf).argmin(dim=1)


def _masked_argmax(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, -torch.inf).argmax(dim=1)


def mine_triplets(dist: torch.Tensor, labels: torch.Tensor, mining: str) -> torch.Tensor:
    """The (T, 3) int64 (a, p, n) triplets of a mining mode, ordered by (a, p, n)."""
    dist = dist.detach()
    n = labels.shape[0]
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    if mining == "hard":
        if n == 0:  # argmax over an empty row raises
            return torch.empty(0, 3, dtype=torch.long, device=labels.device)
        anchors = torch.nonzero(positive.any(1) & negative.any(1)).squeeze(1)
        p = _masked_argmax(dist[anchors], positive[anchors])
        q = _masked_argmin(dist[anchors], negative[anchors])
        return torch.stack([anchors, p, q], dim=1)
    if mining == "all":
        chunk = max(1, _CHUNK_ELEMENTS // max(1, n * n))
        parts = []
        for start in range(0, n, chunk):
            a = slice(start, start + chunk)
            valid = positive[a].unsqueeze(2) & negative[a].unsqueeze(1)  # (chunk, B, B)
            idx = torch.nonzero(valid)
            idx[:, 0] += start
            parts.append(idx)
        return torch.cat(parts) if parts else torch.empty(0, 3, dtype=torch.long, device=labels.device)
    # semihard: for every positive pair (a, p) whose anchor has a negative, the closest negative that is
    # farther than p; if there is none, the farthest negative.
    pairs = torch.nonzero(positive & negative.any(1, keepdim=True))
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n))
    parts = []
    for start in range(0, pairs.shape[0], chunk):
        a, p = pairs[start : start + chunk].unbind(1)
        d_an = dist[a]
        neg = negative[a]
        farther = neg & (d_an > dist[a, p].unsqueeze(1))
        q = torch.where(farther.any(1), _masked_argmin(d_an, farther), _masked_argmax(d_an, neg))
        parts.append(torch.stack([a, p, q], dim=1))
    return torch.cat(parts) if parts else torch.empty(0, 3, dtype=torch.long, device=labels.device)


def eager_triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, params: TripletParams):
    """Loss (float32; float64 for float64 inputs), or (terms, triplets) with reduction="none"."""
    p = params
    dist = pairwise_distances(embeddings, p.distance, p.normalize)
    triplets = mine_triplets(dist, labels, p.mining)
    a, pos, neg = triplets.unbind(1)
    gap = dist[a, pos] - dist[a, neg]
    terms = F.softplus(gap) if p.soft else F.relu(gap + p.margin)
    terms = terms.to(torch.float64 if embeddings.dtype == torch.float64 else torch.float32)
    if p.reduction == "none":
        return terms, triplets
    total = terms.sum()  # 0, still attached to the graph, when there is no term
    if p.reduction == "sum":
        return total
    if p.reduction == "mean_nonzero":
        return total / (terms > 0).sum().clamp_min(1)
    return total / max(terms.shape[0], 1)
