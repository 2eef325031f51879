"""Eager PyTorch implementations: the float64 test oracle and the benchmark baseline."""

from .heads import clamp_cosine, margin_cross_entropy, normalize_rows, target_logit, update_t_
from .triplet import mine_triplets, pairwise_distances, triplet_margin_loss

__all__ = [
    "clamp_cosine",
    "margin_cross_entropy",
    "mine_triplets",
    "normalize_rows",
    "pairwise_distances",
    "target_logit",
    "triplet_margin_loss",
    "update_t_",
]
