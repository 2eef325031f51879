"""The fused triplet loss on the compiled ops of facekernels._C (backends "cpu" and "cuda").

Forward: ``torch.ops.facekernels.triplet_reduce`` / ``triplet_terms`` compute the Gram matrix of the rows
and mine every anchor with the selection code of ``csrc/include/facekernels/triplet_select.h`` (shared by
the C++ and CUDA kernels), never building a (B, B, B) tensor; "all" with a reduction does not even
enumerate its triplets. Memory: the (B, B) Gram, distance and slope matrices, O(B^2); with
reduction="none" also the T mined terms, which are the output.

Backward: the ops return the slopes of the terms with respect to the "raw" quantity behind each distance
(r_ab = ||e_a - e_b||^2 for the euclidean kinds, r_ab = e_a . e_b of unit rows for cosine), accumulated in
a (B, B) matrix W = dL/dr. Since r is a function of the Gram matrix g = E E^T,
    euclidean kinds: dL/dg = diag(rowsum W + colsum W) - 2 W   (r_ab = g_aa + g_bb - 2 g_ab)
    cosine:          dL/dg = W
and dL/dE = (dL/dg + dL/dg^T) E. The L2 normalisation (normalize=True, and always for cosine) is applied
here with torch ops before the fused part, so autograd chains through x / max(||x||, eps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _extension
from .._params import NORM_EPS, TripletParams

# Importing this module loads the extension (a clear ExtensionUnavailableError when it is not built) and
# registers the shape functions torch.compile needs; the backend dispatch imports it with an import
# statement, which torch.compile executes, so a compiled model works on its first call too.
_extension.ops()


@torch.library.register_fake("facekernels::triplet_reduce")
def _(embeddings, labels, mining, distance, margin, soft):
    acc = _acc_dtype(embeddings.dtype)
    batch = embeddings.shape[0]
    return embeddings.new_empty(batch, 3, dtype=acc), embeddings.new_empty(batch, batch, dtype=acc)


@torch.library.register_fake("facekernels::triplet_terms")
def _(embeddings, labels, mining, distance, margin, soft):
    acc = _acc_dtype(embeddings.dtype)
    count = torch.library.get_ctx().new_dynamic_size()
    return (embeddings.new_empty(count, dtype=acc), labels.new_empty(count, 3),
            embeddings.new_empty(count, 2, dtype=acc))  # fmt: skip


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_from_slopes(w: torch.Tensor, rows: torch.Tensor, distance: str) -> torch.Tensor:
    """dL/dE from W = dL/dr (see the module docstring), in the accumulation dtype. Only W + W^T and
    rowsum W + colsum W enter, so W^T (what the CUDA op returns, for coalesced writes) gives the same."""
    e = rows.to(w.dtype)
    w_sym = w + w.t()
    if distance == "cosine":
        return w_sym @ e
    return 2 * ((w.sum(1) + w.sum(0)).unsqueeze(1) * e - w_sym @ e)


class TripletFunction(torch.autograd.Function):
    """Fused mining + loss of ``rows`` (already normalised when the loss normalises)."""

    @staticmethod
    def forward(ctx, rows, labels, params: TripletParams):
        ops = torch.ops.facekernels  # loaded when this module was imported
        ctx.distance = params.distance
        ctx.reduction = params.reduction
        if params.reduction == "none":
            terms, triplets, slopes = ops.triplet_terms(rows, labels, params.mining, params.distance,
                                                        params.margin, params.soft)  # fmt: skip
            ctx.save_for_backward(rows, triplets, slopes)
            ctx.mark_non_differentiable(triplets)
            return terms, triplets
        stats, coef = ops.triplet_reduce(rows, labels, params.mining, params.distance, params.margin, params.soft)
        # the per-anchor sums (summed in float64 by the kernel, rounded once) and counts (integers, exact in
        # float32 below 2^24 terms per anchor) are added up in float64 too: the batch can hold billions of
        # terms; no gradient flows here
        total, count, nonzero = stats.double().sum(0).unbind()
        denominator = (nonzero if params.reduction == "mean_nonzero" else count).clamp_min(1)
        if params.reduction == "sum":
            denominator = torch.ones_like(denominator)
        ctx.save_for_backward(rows, coef, denominator.to(stats.dtype))
        return (total / denominator).to(stats.dtype)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.reduction != "none":
            rows, coef, denominator = ctx.saved_tensors
            # the gradient is linear in W: scale the (B, d) result rather than the (B, B) matrix
            scale = grads[0].to(coef.dtype) / denominator
            return (_grad_from_slopes(coef, rows, ctx.distance) * scale).to(rows.dtype), None, None
        rows, triplets, slopes = ctx.saved_tensors
        grad_terms = grads[0].to(slopes.dtype)
        a, p, n = triplets.unbind(1)
        w = slopes.new_zeros(rows.shape[0], rows.shape[0])
        w.index_put_((a, p), grad_terms * slopes[:, 0], accumulate=True)
        w.index_put_((a, n), grad_terms * slopes[:, 1], accumulate=True)
        return _grad_from_slopes(w, rows, ctx.distance).to(rows.dtype), None, None


def triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, params: TripletParams):
    """Same semantics and return types as ``facekernels.reference.triplet.triplet_margin_loss``: the loss
    (float32; float64 for float64 inputs), or (terms, triplets) with reduction="none"."""
    rows = embeddings
    if params.normalize or params.distance == "cosine":
        # x / max(||x||, eps) in the accumulation dtype (an O(B d) copy for half inputs)
        rows = F.normalize(embeddings.to(_acc_dtype(embeddings.dtype)), dim=1, eps=NORM_EPS)
    return TripletFunction.apply(rows, labels, params)
