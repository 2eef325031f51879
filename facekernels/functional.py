"""Functional forms: the heads with the weight (and CurricularFace's t) passed explicitly, and the triplet loss.

Semantics: docs/heads.md and docs/triplet.md.
"""

from __future__ import annotations

import textwrap

import torch

from . import _validate as V
from ._backends import head_loss, triplet_backend
from ._head_params import SPECS, head_params
from ._params import TripletParams
from ._rowmath import MarginState


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    head: str = "arcface",
    *,
    t=None,
    batch_mean: torch.Tensor | None = None,
    batch_std: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    row_margins: torch.Tensor | None = None,
    training: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    margin_grad: str = "exact",
    backend: str = "auto",
    return_stats: bool = False,
    **margins,
):
    """Margin-softmax cross-entropy of ``head`` on (embeddings (B, d), weight (C, d), labels (B,)).

    The same loss as the head's module (docs/heads.md), with the class weights (and CurricularFace's t) passed
    in, e.g. ``margin_cross_entropy(x, W, y, "arcface", s=64.0, m=0.5)``.

    Args:
        embeddings: (B, d) float16, bfloat16, float32 or float64 tensor, not normalised.
        weight: (C, d) class weights, one row per class, on the device of ``embeddings`` ("subcenter_arcface":
            (C k, d), row j k + i the sub-center i of class j).
        labels: (B,) int64 (or int32) class ids in [0, C), or ignore_index.
        head: one of HEADS.
        t: MV-Softmax's fixed t (a float, instead of the ``t`` margin argument), or CurricularFace's buffer (a
            0-dim float32 tensor on the device of ``embeddings``; required), updated in place when
            ``training``. Other heads: None.
        batch_mean: AdaFace's running mean of the norms (0-dim float32 or float64 tensor on the device of
            ``embeddings``; required, updated in place when ``training``; the module's starts at 20).
        batch_std: AdaFace's running std of the norms (as batch_mean; the module's starts at 100).
        generator: ElasticFace's random generator for the margins drawn in training (None: the default
            generator of its device).
        row_margins: ElasticFace: a (B,) tensor of the rows' margins, used as they are instead of a draw.
        training: update CurricularFace's ``t`` before the negatives are formed (the modules pass
            ``head.training and head.update_t``), AdaFace's batch statistics before the margins, and draw
            ElasticFace's margins (in eval every row gets m); no effect on the other heads.
        reduction: "mean" (over the rows not labelled ignore_index; 0 when there is none), "sum" or "none"
            (the (B,) row losses).
        ignore_index: the label of rows that add no loss and get no gradient.
        margin_grad: "exact" (the true derivative of the target logit) or "straight_through" (d phi / d cos := 1).
        backend: "auto" (compiled CPU kernels for CPU tensors, Triton for CUDA tensors), "cpu", "triton" or
            "reference".
        return_stats: also return a ``HeadStats`` of detached per-row tensors, from the fused pass at O(B)
            memory: ``target_cosine`` (the target class's cosine), ``correct`` (the target's logit, margin
            included, is the row's largest) and ``rank`` (int64: the classes whose margin-free cosine beats the
            target's; ``topk(k)`` = rank < k, the official trainers' Prec@k); ignored rows 0, False and -1.
        **margins: the head's constructor arguments (s, m, easy_margin, fallback, m1, m2, m3, is_am, momentum, h,
            t_alpha, eps, l_a, u_a, l_m, u_m, lambda_g, kind, std, plus, k, interclass_filtering_threshold), each
            defaulting to the published value.

    Returns:
        The loss: 0-dim, or (B,) with reduction="none"; float32 (float64 for float64 inputs). With
        return_stats: (loss, HeadStats).
    """
    V.check_bool("training", training)
    V.check_bool("return_stats", return_stats)
    V.check_backend("heads", backend)
    if head == "mv_softmax" and t is not None:
        margins["t"] = t
    elif head != "curricular" and t is not None:
        raise ValueError(f"t is only an argument of the mv_softmax and curricular heads; got t for head={head!r}")
    params = head_params(head, reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, **margins)
    if params.uses_t and t is None:
        raise ValueError("t is required for head='curricular': pass its 0-dim float32 buffer")
    state = None
    if any(a is not None for a in (batch_mean, batch_std, generator, row_margins)):
        state = MarginState(batch_mean, batch_std, generator, row_margins)
    return head_loss(embeddings, weight, labels, params, t, training, backend, return_stats, state)


# the names of the registry's heads, written into the docstring (a head registered later is taken too)
margin_cross_entropy.__doc__ = margin_cross_entropy.__doc__.replace("one of HEADS.", textwrap.fill(
    f"the head's registered name: {', '.join(map(repr, SPECS))} (facekernels/_head_params.py).",
    width=108, subsequent_indent=" " * 12).lstrip())  # fmt: skip


# the triplet loss's options, documented once: here and in facekernels.TripletMarginLoss (triplet.py)
TRIPLET_OPTION_DOCS = """\
        margin: the hinge margin, >= 0 (unused with soft=True).
        mining: "semihard" (FaceNet / TF-Addons: per positive pair, the closest negative farther than the
            positive, else the farthest negative), "hard" (batch-hard: per anchor, the farthest positive and the
            closest negative) or "all" (every valid triplet).
        distance: "squared_euclidean", "euclidean" or "cosine" (1 - cosine similarity).
        normalize: L2-normalise the embeddings first (FaceNet).
        soft: softplus(d_ap - d_an) instead of the hinge max(d_ap - d_an + margin, 0).
        reduction: "mean" (over the mined terms), "mean_nonzero" (over the terms > 0), "sum", or "none".
        backend: "auto" (compiled kernels for the tensors' device), "cpu", "cuda" or "reference".
"""


def triplet_margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    margin: float = 0.2,
    mining: str = "semihard",
    distance: str = "squared_euclidean",
    normalize: bool = True,
    soft: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
):
    """Triplet loss with triplets mined inside the batch (docs/triplet.md).

    Args:
        embeddings: (B, d) float16, bfloat16, float32 or float64 tensor.
        labels: (B,) int64 (or int32) labels; rows with equal labels are positives of each other.
        OPTIONS

    Returns:
        The loss (0-dim; 0 with a zero gradient when the batch has no triplet), or with reduction="none"
        ``(terms, triplets)``: the (T,) terms and an int64 (T, 3) tensor of their (anchor, positive, negative)
        row indices.
    """
    V.check_triplet_options(margin, mining, distance, normalize, soft, reduction, backend)
    labels = V.check_triplet_inputs(embeddings, labels)
    params = TripletParams(float(margin), mining, distance, normalize, soft, reduction)
    result = triplet_backend(backend, embeddings.device)(embeddings, labels, params)
    if reduction == "none":
        return result
    # Mining compares distances, and a comparison with NaN is false, so a NaN or Inf row could go unmined
    # and leave the loss finite. sum(0 * embeddings) is 0 for finite rows and NaN for a NaN or Inf (O(B d), no
    # sync): added, it makes any non-finite input give a NaN loss on every backend without changing the value or
    # the gradient otherwise. The product comes first: 0 * sum(embeddings) would overflow for finite rows (a
    # float16 sum passes 65504 at B d ~ 1e5, a float32 one near 1e37 per element) and turn inf * 0 into NaN.
    return result + (embeddings * 0).sum(dtype=result.dtype)


triplet_margin_loss.__doc__ = triplet_margin_loss.__doc__.replace("        OPTIONS\n", TRIPLET_OPTION_DOCS)
