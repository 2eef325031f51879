"""The triplet loss with in-batch mining as an ``nn.Module`` (semantics: docs/triplet.md)."""

from __future__ import annotations

from torch import nn

from . import _validate as V
from .functional import TRIPLET_OPTION_DOCS, triplet_margin_loss


class TripletMarginLoss(nn.Module):
    """FaceNet / TF-Addons semi-hard, batch-hard and batch-all triplet loss, mined inside the batch.

    Args:
        OPTIONS

    ``forward(embeddings, labels)`` returns the loss, or ``(terms, triplets)`` with reduction="none"
    (docs/triplet.md).
    """

    def __init__(self, margin=0.2, mining="semihard", distance="squared_euclidean", normalize=True,
                 soft=False, reduction="mean", backend="auto"):  # fmt: skip
        """Build the loss; the arguments are described in the class docstring."""
        super().__init__()
        V.check_triplet_options(margin, mining, distance, normalize, soft, reduction, backend)
        self.margin = float(margin)
        self.mining = mining
        self.distance = distance
        self.normalize = normalize
        self.soft = soft
        self.reduction = reduction
        self.backend = backend

    def forward(self, embeddings, labels):
        """The loss of a batch.

        Args:
            embeddings: (B, d) float16, bfloat16, float32 or float64 tensor.
            labels: (B,) int64 (or int32) labels.

        Returns:
            The loss (0-dim), or ``(terms, triplets)`` with reduction="none".
        """
        return triplet_margin_loss(embeddings, labels, self.margin, self.mining, self.distance, self.normalize,
                                   self.soft, self.reduction, self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, mining={self.mining!r}, distance={self.distance!r}, "
            f"normalize={self.normalize}, soft={self.soft}, reduction={self.reduction!r}, backend={self.backend!r}"
        )


TripletMarginLoss.__doc__ = TripletMarginLoss.__doc__.replace("        OPTIONS\n", TRIPLET_OPTION_DOCS)
