"""Eager PyTorch implementations: the float64 test oracle and the benchmark baseline."""

from .heads import clamp_cosine, eager_margin_cross_entropy, normalize_rows, target_logit, update_t_
from .triplet import eager_triplet_margin_loss, mine_triplets, pairwise_distances

__all__ = [
    "clamp_cosine",
    "eager_margin_cross_entropy",
    "eager_triplet_margin_loss",
    "mine_triplets",
    "normalize_rows",
    "pairwise_distances",
    "target_logit",
    "update_t_",
]
