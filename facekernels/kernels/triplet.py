"""The fused triplet loss on the compiled ops of facekernels._C (backends "cpu" and "cuda").

Forward: ``torch.ops.facekernels.triplet_reduce`` / ``triplet_terms`` compute the Gram matrix of the rows
and mine every anchor with the selection code of ``csrc/include/facekernels/triplet_select.h`` (shared by
the C++ and CUDA kernels), never building a (B, B, B) tensor; "all" with a reduction does not even
enumerate its triplets. Memory: the (B, B) Gram, distance and slope matrices, at most two of them at once
(2 B^2, forward and backward); with reduction="none" also the T mined terms, which are the output.

Backward: the ops return the slopes of the terms with respect to the "raw" quantity behind each distance
(r_ab = ||e_a - e_b||^2 for the euclidean kinds, r_ab = e_a . e_b of unit rows for cosine), accumulated in
a (B, B) matrix W = dL/dr. Since r is a function of the Gram matrix g = E E^T,
    euclidean kinds: dL/dg = diag(rowsum W + colsum W) - 2 W   (r_ab = g_aa + g_bb - 2 g_ab)
    cosine:          dL/dg = W
and dL/dE = (dL/dg + dL/dg^T) E. The L2 normalisation (normalize=True, and always for cosine) is applied
here with torch ops before the fused part, so autograd chains through x / max(||x||, eps).

Higher derivatives (create_graph=True): the backward is torch ops on E, so autograd differentiates it again;
that is exact when W is locally constant (the hinge of squared_euclidean or cosine distances). Where the
slopes depend on E (euclidean's 1 / 2d, soft's sigmoid) such a backward recomputes them as torch ops on the
mined triplets (``_differentiable_slopes``), so the second derivative includes their variation.
"""

from __future__ import annotations

import torch

from .. import _extension
from .._pairs import pair_distances, representatives
from .._params import TripletParams
from .._rowmath import normalize_rows

# Importing this module loads the extension (a clear ExtensionUnavailableError when it is not built) and with
# it the ops' schemas and shape functions (facekernels/_library.py); the backend dispatch imports it with an
# import statement, which torch.compile executes, so a compiled model works on its first call too.
_extension.ops()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_from_slopes(w: torch.Tensor, rows: torch.Tensor, distance: str) -> torch.Tensor:
    """dL/dE from W = dL/dr (see the module docstring), in the accumulation dtype. Only W + W^T and
    rowsum W + colsum W enter, so W^T (what the CUDA op returns, for coalesced writes) gives the same."""
    e = rows.to(w.dtype)
    # W e + W^T e rather than (W + W^T) e: no second (B, B) buffer beside W (BLAS reads W transposed in place)
    w_sym_e = w @ e + w.t() @ e
    if distance == "cosine":
        return w_sym_e
    return 2 * ((w.sum(1) + w.sum(0)).unsqueeze(1) * e - w_sym_e)


def _differentiable_slopes(rows: torch.Tensor, triplets: torch.Tensor, params: TripletParams) -> torch.Tensor:
    """The (T, 2) slopes d term / d raw(a, p), d term / d raw(a, n) that the kernels return as numbers,
    recomputed as functions of the rows (triplet_term and distance_slope of triplet_select.h). Their
    derivative is the part of the second derivative that constant slopes miss: d(1 / 2d) for euclidean,
    sigmoid'(gap) for soft. The hinge's slope and the floors are piecewise constant (0 derivative)."""
    dist = pair_distances(rows, params.distance)
    a, p, n = triplets.unbind(1)
    d_ap, d_an = dist[a, p], dist[a, n]
    gap = d_ap - d_an
    if params.soft:
        # softplus(x) = x above torch's threshold 20 (the reference): slope 1 and no curvature there
        slope = torch.where(gap > 20, 1, torch.sigmoid(gap))
    else:
        h = gap + params.margin
        slope = ((h > 0) | h.isnan()).to(rows.dtype)

    def dist_slope(d):  # d d / d raw, 0 where the distance is 0 or a floor is active
        if params.distance == "cosine":
            return torch.where(d > 0, -1.0, 0.0).to(d.dtype)
        if params.distance == "squared_euclidean":
            return (d > 0).to(d.dtype)
        return torch.where(d > 0, 0.5 / torch.where(d > 0, d, 1), 0)

    return torch.stack([slope * dist_slope(d_ap), -slope * dist_slope(d_an)], dim=1)


def _grad_from_terms(rows, triplets, grad_terms, slopes, distance):
    """dL/dE from per-term upstream gradients and slopes: W = dL/dr scattered from the (a, p), (a, n) pairs."""
    a, p, n = triplets.unbind(1)
    w = slopes.new_zeros(rows.shape[0], rows.shape[0])
    w.index_put_((a, p), grad_terms * slopes[:, 0], accumulate=True)  # in place: autograd records it too
    w.index_put_((a, n), grad_terms * slopes[:, 1], accumulate=True)
    return _grad_from_slopes(w, rows, distance)


def _slopes_are_constant(params: TripletParams) -> bool:
    """Whether the slopes are locally constant in the rows (a hinge of squared-euclidean or cosine
    distances: +-1 or 0), so that a backward with constant W is exact to every order."""
    return not params.soft and params.distance != "euclidean"


class TripletFunction(torch.autograd.Function):
    """Fused mining + loss of ``rows`` (already normalised when the loss normalises)."""

    @staticmethod
    def forward(rows, labels, params: TripletParams):
        # setup_context style (torch.func can transform it): what the backward needs is returned beside the loss
        # ((terms, triplets, slopes) or (loss, W, denominator)) and marked non-differentiable
        ops = torch.ops.facekernels  # loaded when this module was imported
        # equal rows at bitwise equal distances whatever the GEMM (facekernels/_pairs.py)
        rep = representatives(rows)
        if params.reduction == "none":
            return ops.triplet_terms(rows, labels, params.mining, params.distance, params.margin, params.soft, rep)
        stats, coef = ops.triplet_reduce(rows, labels, params.mining, params.distance, params.margin, params.soft,
                                         rep)  # fmt: skip
        # the per-anchor sums (summed in float64 by the kernel, rounded once) and counts (integers, exact in
        # float32 below 2^24 terms per anchor) are added up in float64 too: the batch can hold billions of
        # terms; no gradient flows here
        total, count, nonzero = stats.double().sum(0).unbind()
        denominator = (nonzero if params.reduction == "mean_nonzero" else count).clamp_min(1)
        if params.reduction == "sum":
            denominator = torch.ones_like(denominator)
        return (total / denominator).to(stats.dtype), coef, denominator.to(stats.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, labels, params = inputs
        ctx.params = params
        _, second, third = output
        ctx.mark_non_differentiable(second, third)
        # no zero-filled gradients for the non-differentiable outputs: W's would be another (B, B) buffer
        ctx.set_materialize_grads(False)
        if params.reduction == "none":
            ctx.save_for_backward(rows, second, third)  # rows, triplets, slopes
        else:
            ctx.save_for_backward(rows, labels, second, third)  # rows, labels, W, denominator

    @staticmethod
    def backward(ctx, *grads):
        if grads[0] is None:
            return None, None, None
        # grad mode is on inside backward exactly when the caller asked for create_graph=True
        if torch.is_grad_enabled() and not _slopes_are_constant(ctx.params):
            return TripletFunction._backward_with_graph(ctx, grads[0]), None, None
        distance = ctx.params.distance
        if ctx.params.reduction != "none":
            rows, _, coef, denominator = ctx.saved_tensors
            # the gradient is linear in W: scale the (B, d) result rather than the (B, B) matrix
            scale = grads[0].to(coef.dtype) / denominator
            return (_grad_from_slopes(coef, rows, distance) * scale).to(rows.dtype), None, None
        rows, triplets, slopes = ctx.saved_tensors
        return _grad_from_terms(rows, triplets, grads[0].to(slopes.dtype), slopes, distance).to(rows.dtype), None, None

    @staticmethod
    def _backward_with_graph(ctx, grad):
        """A gradient that is itself differentiable (create_graph=True) where the slopes depend on the rows:
        the same formula with the slopes recomputed by torch ops on the mined triplets. A reduced loss
        mines them again (the forward kept only W): O(T) memory, paid only for higher derivatives."""
        params = ctx.params
        if params.reduction == "none":
            rows, triplets, _ = ctx.saved_tensors
            grad_terms = grad
        else:
            rows, labels, _, denominator = ctx.saved_tensors
            _, triplets, _ = torch.ops.facekernels.triplet_terms(rows.detach(), labels, params.mining, params.distance,
                                                                 params.margin, params.soft,
                                                                 representatives(rows.detach()))  # fmt: skip
            # every term of a reduced loss has the same upstream gradient
            grad_terms = (grad / denominator).expand(triplets.shape[0])
        acc = rows.to(_acc_dtype(rows.dtype))
        slopes = _differentiable_slopes(acc, triplets, params)
        return _grad_from_terms(acc, triplets, grad_terms.to(acc.dtype), slopes, params.distance).to(rows.dtype)


def fused_triplet_margin_loss(embeddings: torch.Tensor, labels: torch.Tensor, params: TripletParams):
    """Same semantics and return types as ``facekernels.reference.eager_triplet_margin_loss``: the loss
    (float32; float64 for float64 inputs), or (terms, triplets) with reduction="none"."""
    rows = embeddings
    if params.normalize or params.distance == "cosine":
        # x / max(||x||, eps) in the accumulation dtype (an O(B d) copy for half inputs), the norm summed in
        # float64 as the reference does: a float32 sum of squares overflows for elements past ~1e19
        rows = normalize_rows(embeddings.to(_acc_dtype(embeddings.dtype)))
    first, second, _ = TripletFunction.apply(rows, labels, params)
    return (first, second) if params.reduction == "none" else first
