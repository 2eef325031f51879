"""pytorch-metric-learning's classification losses on the fused kernels: change the import line only.

    from pytorch_metric_learning.losses import ArcFaceLoss      # before
    from facekernels.compat.pml import ArcFaceLoss              # after

    loss_func = ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)
    loss = loss_func(embeddings, labels)

``ArcFaceLoss``, ``CosFaceLoss``, ``SubCenterArcFaceLoss`` and ``NormalizedSoftmaxLoss`` take their
constructor arguments and defaults (the ArcFace margins in degrees), own a parameter ``W`` of their shape
(embedding_size, num_classes) (``num_classes * sub_centers`` columns for sub-centers, class-major: column
``j * sub_centers + i`` is sub-center i of class j), so that ``load_state_dict`` of either library's state
dict works both ways with ``strict=True``, and return the mean loss over the batch (their default reducer)
with the same value and gradients. The (B, C) logits are never formed.

``W`` is stored as the transpose of a (C, d) row-major tensor: the (d, C) view that state dicts and
optimizers see is over storage in which every class is a contiguous row, which the kernels read in place.

What the fused loss cannot honour raises an error naming the argument, never silently ignored:
``indices_tuple`` (miners), ``ref_emb`` / ``ref_labels``, a reducer other than ``MeanReducer`` /
``SumReducer``, a distance other than the loss's default, ``weight_regularizer`` and
``embedding_regularizer``. What differs from pytorch-metric-learning (docs/migration.md): labels must lie in
[0, num_classes) (theirs raises an IndexError otherwise too); ``W`` is not moved or cast to the embeddings'
device and dtype on each call (the embeddings must be on W's device; float16 / bfloat16 embeddings with a
float32 ``W`` compute in float32, theirs casts ``W`` to float16 for good); the cosines are clamped to [-1, 1]
(theirs only the target's angle); ``SubCenterArcFaceLoss.get_outliers`` (the offline second stage) is not
provided.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as V
from .._head_params import head_params
from .._backends import head_loss

# Labels outside [0, C) raise in pytorch-metric-learning (its one-hot mask indexes with them): no label value
# is an ignore label here, so the heads' ignore_index is set to one no int64 label can take by mistake.
NO_IGNORE = V.INT64_MIN


def _pml_class(obj, name: str) -> bool:
    """Whether ``obj`` is an instance of pytorch-metric-learning's class ``name`` (read from its type, so
    that this module never imports pytorch-metric-learning)."""
    kind = type(obj)
    return kind.__name__ == name and kind.__module__.startswith("pytorch_metric_learning.")


def _reduction(reducer) -> str:
    if reducer is None or _pml_class(reducer, "MeanReducer"):
        return "mean"
    if _pml_class(reducer, "SumReducer"):
        return "sum"
    raise ValueError(
        f"reducer={type(reducer).__name__}: the fused loss reduces the per-row losses itself and takes only "
        "reducer=None or MeanReducer() (the mean over the batch, the default) or SumReducer()"
    )


def _check_distance(distance, allowed: tuple[str, ...]) -> None:
    """The loss's own similarity of normalised vectors (the cosine), or nothing else."""
    if distance is None:
        return
    plain = (getattr(distance, "normalize_embeddings", None) is True and getattr(distance, "p", None) == 2
             and getattr(distance, "power", None) == 1)  # fmt: skip
    if not (any(_pml_class(distance, name) for name in allowed) and plain):
        raise ValueError(
            f"distance={type(distance).__name__}: the fused loss computes the cosine of normalised embeddings and "
            f"classes; it takes only distance=None or {' / '.join(f'{n}()' for n in allowed)} with default options"
        )


class _ClassificationLoss(nn.Module):
    """The part shared by the losses: W, the options pytorch-metric-learning's base classes take, forward."""

    head: str  # a registered head's name (facekernels/_head_params.py)
    distances: tuple[str, ...] = ("CosineSimilarity",)

    def __init__(self, num_classes, embedding_size, rows_per_class: int = 1, *, backend="auto", reducer=None,
                 distance=None, weight_init_func=None, weight_regularizer=None, weight_reg_weight=1,
                 embedding_regularizer=None, embedding_reg_weight=1, collect_stats=None):  # fmt: skip
        super().__init__()
        V.check_int("num_classes", num_classes, minimum=1)
        V.check_int("embedding_size", embedding_size, minimum=1)
        V.check_backend("heads", backend)
        self.reduction = _reduction(reducer)
        _check_distance(distance, self.distances)
        for name, value in (("weight_regularizer", weight_regularizer),
                            ("embedding_regularizer", embedding_regularizer)):  # fmt: skip
            if value is not None:
                raise ValueError(
                    f"{name} is not supported by the fused loss (it needs the loss dict of pytorch-metric-learning's "
                    f"reducers); add the regulariser's term to the loss yourself, e.g. loss + weight * reg(W.t())"
                )
        self.weight_reg_weight, self.embedding_reg_weight = weight_reg_weight, embedding_reg_weight  # unused, as theirs
        self.collect_stats = bool(collect_stats)
        self.backend = backend
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        # (d, C k) as theirs, over (C k, d) row-major storage: W.t() is contiguous, one row per class column
        self.W = nn.Parameter(torch.empty(self.num_classes * rows_per_class, self.embedding_size).t())
        self.weight_init_func = weight_init_func if weight_init_func is not None else nn.init.normal_
        self.weight_init_func(self.W)
        self.avg_angle = 0.0  # collect_stats: the mean target angle of the last batch, in degrees (theirs)
        self._cached = (None, None)

    def _margins(self) -> dict:
        """The facekernels head's margins from the loss's attributes (read at every call: a changed
        ``margin`` or ``scale`` takes effect, as in pytorch-metric-learning)."""
        raise NotImplementedError

    def _params(self):
        margins = self._margins()
        key = (tuple(sorted(margins.items())), self.reduction)
        if self._cached[0] != key:
            params = head_params(self.head, reduction=self.reduction, ignore_index=NO_IGNORE, **margins)
            self._cached = (key, params)
        return self._cached[1]

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The loss of a batch: the mean over its rows (``SumReducer``: the sum).

        Args:
            embeddings: (B, embedding_size) tensor on W's device (not normalised: the loss does it).
            labels: (B,) int64 or int32 class ids in [0, num_classes) (moved to the embeddings' device, as
                theirs).
            indices_tuple: a miner's output: not supported (raises).
            ref_emb, ref_labels: not supported (raise), as in pytorch-metric-learning for these losses.

        Returns:
            The 0-dim loss (float32; float64 for float64 inputs).
        """
        if labels is None:
            raise ValueError("labels are required: loss_func(embeddings, labels)")
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple (a miner's pairs or triplets) is not supported by the fused classification loss: it "
                "would weight the rows by their mined counts; drop the miner or use pytorch-metric-learning's loss"
            )
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb and ref_labels are not supported by this loss (nor by pytorch-metric-learning's)")
        if isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor):
            if labels.device != embeddings.device:
                labels = labels.to(embeddings.device)
        result = head_loss(embeddings, self.W.t(), labels, self._params(), t=None, training=self.training,
                           backend=self.backend, stats=self.collect_stats)  # fmt: skip
        if not self.collect_stats:
            return result
        loss, stats = result
        with torch.no_grad():  # theirs reads it on the host too (a sync, with collect_stats only)
            self.avg_angle = math.degrees(stats.target_cosine.double().clamp(-1, 1).acos().mean().item())
        return loss

    def _cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C k) cosines of the embeddings and W's columns: forms the matrix (get_logits only)."""
        w = self.W.t()
        return torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(w.to(embeddings.dtype)).t()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, backend={self.backend!r}"


class ArcFaceLoss(_ClassificationLoss):
    """pytorch-metric-learning's ArcFaceLoss on the fused kernels (module docstring).

    The target logit is ``scale * cos(theta + margin)`` where ``theta <= pi - margin``, else
    ``scale * (cos(theta) - margin * sin(margin))`` (their monotonic fallback, facekernels'
    ``fallback="monotonic"``), with the exact margin gradient; the others ``scale * cos(theta)``.

    Args:
        num_classes: number of classes C.
        embedding_size: embedding size d; ``W`` is (d, C), initialised ``normal_(0, 1)`` (theirs).
        margin: the angular margin **in degrees** (stored in radians as ``self.margin``, as theirs).
        scale: the logits' scale.
        backend: facekernels' backend ("auto", "cpu", "triton", "reference").
        reducer, distance, weight_init_func, weight_regularizer, weight_reg_weight, embedding_regularizer,
            embedding_reg_weight, collect_stats: pytorch-metric-learning's options; those the fused loss
            cannot honour raise (module docstring).
    """

    head = "arcface"

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        """Build the loss; the arguments are described in the class docstring."""
        super().__init__(num_classes, embedding_size, **kwargs)
        V.check_float("margin", margin, low=0.0, high=180.0, high_open=True)
        self.margin = math.radians(margin)
        self.scale = scale
        self._params()  # validate now

    def _margins(self) -> dict:
        return dict(s=self.scale, m=self.margin, fallback="monotonic")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``scale`` times the (B, C) cosines, without margin (theirs, for evaluation): forms the logits."""
        return self._cosine(embeddings) * self.scale


class CosFaceLoss(_ClassificationLoss):
    """pytorch-metric-learning's CosFaceLoss on the fused kernels (module docstring): the target logit
    ``scale * (cos(theta) - margin)``, the others ``scale * cos(theta)``.

    Args:
        num_classes: number of classes C.
        embedding_size: embedding size d; ``W`` is (d, C), initialised ``normal_(0, 1)``.
        margin: the cosine margin.
        scale: the logits' scale.
        backend, reducer, distance, ...: as ``ArcFaceLoss``.
    """

    head = "cosface"

    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64, **kwargs):
        """Build the loss; the arguments are described in the class docstring."""
        super().__init__(num_classes, embedding_size, **kwargs)
        self.margin = margin
        self.scale = scale
        self._params()

    def _margins(self) -> dict:
        return dict(s=self.scale, m=self.margin)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``scale`` times the (B, C) cosines, without margin: forms the logits."""
        return self._cosine(embeddings) * self.scale


class SubCenterArcFaceLoss(_ClassificationLoss):
    """pytorch-metric-learning's SubCenterArcFaceLoss on the fused kernels (module docstring): ArcFaceLoss on
    the class cosines, each the max over the class's ``sub_centers`` columns of W (the gradient goes to the
    first maximising one).

    Args:
        num_classes: number of classes C (theirs takes it by keyword only; here also positionally).
        embedding_size: embedding size d; ``W`` is (d, C * sub_centers), column ``j * sub_centers + i``
            sub-center i of class j.
        margin: the angular margin in degrees (``self.margin`` in radians).
        scale: the logits' scale.
        sub_centers: sub-centers per class, in [1, 64].
        backend, reducer, distance, ...: as ``ArcFaceLoss``.
    """

    head = "subcenter_arcface"

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, sub_centers=3, **kwargs):
        """Build the loss; the arguments are described in the class docstring."""
        V.check_int("sub_centers", sub_centers, minimum=1)
        super().__init__(num_classes, embedding_size, sub_centers, **kwargs)
        V.check_float("margin", margin, low=0.0, high=180.0, high_open=True)
        self.margin = math.radians(margin)
        self.scale = scale
        self.sub_centers = int(sub_centers)
        self._params()

    def _margins(self) -> dict:
        return dict(s=self.scale, m=self.margin, k=self.sub_centers, fallback="monotonic")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``scale`` times the (B, C) class cosines (max over the sub-centers), without margin: forms the
        logits."""
        cos = self._cosine(embeddings).view(embeddings.shape[0], self.num_classes, self.sub_centers)
        return cos.amax(dim=2) * self.scale


class NormalizedSoftmaxLoss(_ClassificationLoss):
    """pytorch-metric-learning's NormalizedSoftmaxLoss on the fused kernels (module docstring): the logits
    ``cos(theta) / temperature`` (facekernels' NormSoftmax with ``s = 1 / temperature``).

    Args:
        num_classes: number of classes C.
        embedding_size: embedding size d; ``W`` is (d, C), initialised ``normal_(0, 1)``.
        temperature: the softmax temperature, >= 1e-4 (s <= 1e4).
        backend, reducer, weight_init_func, ...: as ``ArcFaceLoss``; ``distance`` None or
            DotProductSimilarity() / CosineSimilarity() with default options (the cosine).
    """

    head = "norm_softmax"
    distances = ("DotProductSimilarity", "CosineSimilarity")

    def __init__(self, num_classes, embedding_size, temperature=0.05, **kwargs):
        """Build the loss; the arguments are described in the class docstring."""
        super().__init__(num_classes, embedding_size, **kwargs)
        V.check_float("temperature", temperature, low=1.0 / V.MAX_SCALE)
        self.temperature = temperature
        self._params()

    def _margins(self) -> dict:
        return dict(s=1.0 / self.temperature)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The (B, C) cosines divided by the temperature: forms the logits."""
        return self._cosine(embeddings) / self.temperature
