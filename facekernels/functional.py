"""Functional forms: the heads with the weight (and CurricularFace's t) passed explicitly."""

from __future__ import annotations

import torch

from . import _algorithm
from . import _validate as V
from ._backends import head_kernels, triplet_backend
from ._params import HeadParams, TripletParams
from .heads import head_params


def _check_t_buffer(t, embeddings: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 0-dim float32 tensor (CurricularFace's buffer); got {type(t).__name__}")
    if t.dim() != 0 or t.dtype != torch.float32:
        raise ValueError(f"t must be a 0-dim float32 tensor; got shape {tuple(t.shape)} and {t.dtype}")
    if t.device != embeddings.device:
        raise ValueError(f"t must be on the device of embeddings ({embeddings.device}); got {t.device}")


def _margin_cross_entropy(embeddings, weight, labels, params: HeadParams, t, training: bool, backend: str):
    labels = V.check_head_inputs(embeddings, weight, labels, params.ignore_index)
    if params.uses_t:
        _check_t_buffer(t, embeddings)
    kernels = head_kernels(backend, embeddings.device)
    if kernels is None:
        from .reference.heads import margin_cross_entropy as reference_loss

        return reference_loss(embeddings, weight, labels, params, t, training)
    return _algorithm.margin_cross_entropy(embeddings, weight, labels, params, t, training, kernels)


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    head: str = "arcface",
    *,
    t=None,
    training: bool = True,
    reduction: str = "mean",
    ignore_index: int = -100,
    margin_grad: str = "exact",
    backend: str = "auto",
    **margins,
) -> torch.Tensor:
    """Margin-softmax cross-entropy of ``head`` on (embeddings (B, d), weight (C, d), labels (B,)).

    ``head`` is one of "norm_softmax", "arcface", "cosface", "combined", "mv_softmax", "curricular";
    ``margins`` are that head's constructor arguments (s, m, easy_margin, m1, m2, m3, is_am, momentum),
    defaulting to the published values. ``t`` is the head's t: MV-Softmax's fixed float, or
    CurricularFace's 0-dim float32 buffer, updated in place when ``training``.
    """
    V.check_bool("training", training)
    V.check_choice("backend", backend, ("auto", "triton", "cpu", "reference"))
    if head == "mv_softmax" and t is not None:
        margins["t"] = t
    elif head != "curricular" and t is not None:
        raise ValueError(f"t is only an argument of the mv_softmax and curricular heads; got t for head={head!r}")
    params = head_params(head, reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, **margins)
    if params.uses_t and t is None:
        raise ValueError("t is required for head='curricular': pass its 0-dim float32 buffer")
    return _margin_cross_entropy(embeddings, weight, labels, params, t, training, backend)


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
    """Triplet loss with in-batch mining (``shared/spec/triplet.md``); with reduction="none" returns
    ``(terms, triplets)``, triplets an int64 (T, 3) tensor of (anchor, positive, negative)."""
    V.check_triplet_options(margin, mining, distance, normalize, soft, reduction, backend)
    labels = V.check_triplet_inputs(embeddings, labels)
    params = TripletParams(float(margin), mining, distance, normalize, soft, reduction)
    result = triplet_backend(backend, embeddings.device)(embeddings, labels, params)
    if reduction == "none":
        return result
    # Mining compares distances, and a comparison with NaN is false, so a NaN or Inf row could go unmined
    # and leave the loss finite. Adding 0 * sum(embeddings) (O(B d), no sync) makes any non-finite input
    # give a NaN loss, on every backend, without changing the value or the gradient otherwise.
    return result + embeddings.sum().to(result.dtype) * 0
