"""Equal rows at equal distances: how every triplet backend reads its Gram matrix.

A GEMM rounds each entry by where it sits in the output (tile edges, vector tails), so two equal rows p and n
can come out at different distances from an anchor, and G need not be symmetric. One ulp then decides a
semi-hard choice (d_an > d_ap) or a hard-mining tie (the lowest index). Every backend therefore reads the
entry of (i, j) at (r_i, r_j), r_i the lowest index of a row equal to row i, and from the upper triangle only
(G[min, max]). Equal rows then have bitwise equal distances to every row, and distance exactly 0 to each other,
whatever the GEMM: the reference and kernels/triplet.py here, the C++ and CUDA kernels in pair_distance
(csrc/include/facekernels/triplet_select.h) from the same representatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (2^31 - 1) and the golden-ratio multiplier of Knuth's multiplicative hash (2654435761) reduced modulo it: the
# same column weights, in [1, 2^31). The literal must fit in int32: torch.compile's Triton code multiplies a
# 32-bit index by it, and triton 3.6 rejects 2654435761 there (the H200 run's compiled triplet baseline failed
# so). Should that product wrap, the weights differ, and a hash they still are: a collision is checked below.
_PRIME, _GOLDEN = 2_147_483_647, 2_654_435_761 % 2_147_483_647


def representatives(rows: torch.Tensor) -> torch.Tensor:
    """(B,) int64: per row of the (B, d) ``rows``, the lowest index of a row equal to it (elementwise ==, so
    -0.0 equals 0.0 and a row holding a NaN equals no other). No host sync: an integer hash of each row (exact,
    so equal rows hash alike whatever the summation order), a stable sort, and a check that each row equals the
    first of its hash group (a row colliding with a different one is its own representative)."""
    batch = rows.shape[0]
    index = torch.arange(batch, device=rows.device)
    if batch < 2:
        return index
    # +0 turns -0.0 into 0.0; the bits as 16-bit words fit any float dtype: |word| < 2^15, weight < 2^31, so
    # each product is below 2^46 and a row of up to 2^17 words sums without overflow
    words = (rows.detach() + 0).contiguous().view(torch.int16).to(torch.int64)
    weights = torch.arange(words.shape[1], device=rows.device) * _GOLDEN % _PRIME + 1
    key = (words * weights).sum(1)
    order = torch.sort(key, stable=True).indices  # equal keys keep their index order
    sorted_key = key[order]
    starts = torch.ones(batch, dtype=torch.bool, device=rows.device)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.where(starts, index, 0).cummax(0).values  # position of each group's first (lowest) row
    candidate = torch.empty_like(index).scatter_(0, order, order[first])
    return torch.where((rows[candidate] == rows).all(1), candidate, index)


class _CanonicalGram(torch.autograd.Function):
    """G[min(r_i, r_j), max(r_i, r_j)] forward; the identity backward: the canonical entry equals G[i, j] in
    exact arithmetic, so each entry's gradient stays its own (it is e_i's and e_j's, not the representatives')."""

    @staticmethod
    def forward(gram, rep):
        upper = torch.triu(torch.ones_like(gram, dtype=torch.bool))
        return torch.where(upper, gram, gram.t()).index_select(0, rep).index_select(1, rep)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def canonical_gram(gram: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """The (B, B) Gram matrix as every backend reads it (module docstring), differentiable; O(B^2) copies (the
    fused kernels read G through the representatives in place instead)."""
    return _CanonicalGram.apply(gram, rep)


def pair_distances(rows: torch.Tensor, distance: str) -> torch.Tensor:
    """(B, B) distances between the (B, d) ``rows`` (already normalised for "cosine"), as differentiable torch ops
    (pair_distance of triplet_select.h): read through the rows' representatives, so exactly 0 on the diagonal
    and between equal rows; floored at 0 by relu (a zero (sub)gradient where not strictly positive); the norms
    from the Gram diagonal, not a separate (e * e).sum (the same products summed the same way); euclidean's
    sqrt with a zero (sub)gradient where the distance is 0, as torch.cdist's backward (never inf, which would
    turn a second derivative into NaN). NaN stays NaN."""
    rep = representatives(rows)
    equal = rep.unsqueeze(1) == rep.unsqueeze(0)
    gram = canonical_gram(rows @ rows.t(), rep)
    if distance == "cosine":
        return torch.where(equal, 0, F.relu(1 - gram))
    sq_norm = gram.diagonal()
    sq_dist = torch.where(equal, 0, F.relu(sq_norm.unsqueeze(1) + sq_norm.unsqueeze(0) - 2 * gram))
    if distance == "squared_euclidean":
        return sq_dist
    zero = sq_dist == 0
    return torch.where(zero, 0, torch.where(zero, 1, sq_dist).sqrt())
