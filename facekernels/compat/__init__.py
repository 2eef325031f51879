"""Drop-in replacements of other libraries' head APIs, on the fused kernels: change one import line.

- :mod:`facekernels.compat.pml`: pytorch-metric-learning's ``ArcFaceLoss``, ``CosFaceLoss``,
  ``SubCenterArcFaceLoss`` and ``NormalizedSoftmaxLoss`` (their constructor calls, their ``W`` (d, C) state
  dicts, ``loss_fn(embeddings, labels)``).
- :mod:`facekernels.compat.insightface`: arcface_torch's ``PartialFC_V2`` with ``CombinedMarginLoss``,
  ``ArcFace`` and ``CosFace`` (class-sharded over the default process group, their per-rank ``weight``
  shards).

Both peers' heads return a loss, never logits, so the fused path reproduces them exactly; what it cannot
honour (miners, regularisers, a custom reducer, ...) raises an error naming the argument. docs/migration.md
lists what differs.
"""

from . import insightface, pml

__all__ = ["insightface", "pml"]
