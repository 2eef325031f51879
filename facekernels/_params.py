"""Hyper-parameters of the heads and the triplet loss, as frozen dataclasses.

Every head of docs/heads.md is one point of a single parametrisation, so that each backend
implements one formula (Python reference, Triton helpers, C++ header) instead of one per head:

* target before fallback    ``phi_raw(c) = cos(m1 * theta + m2) - m3``          (theta = acos c)
  (exactly ``c - m3`` when m1 = 1 and m2 = 0, and ``c cos m2 - sqrt(1 - c^2) sin m2 - m3`` when m1 = 1);
* a fallback that replaces ``phi_raw`` by a cheaper branch outside its valid range (``Fallback``);
* hard-negative threshold   ``tau = phi_raw`` (spec: the margin-modified cosine *before* any fallback);
* negative logit function   ``N(c)`` (``Negatives``), applied to classes j != y with ``c_j > tau``.

=============================  ===  ===  ===  ======================  ============
head                           m1   m2   m3   fallback                negatives
=============================  ===  ===  ===  ======================  ============
NormSoftmax                    1    0    0    NONE                    PLAIN
CosFace(m)                     1    0    m    NONE                    PLAIN
ArcFace(m)                     1    m    0    MONOTONIC               PLAIN
ArcFace(m, easy_margin)        1    m    0    POSITIVE                PLAIN
CombinedMargin(m1,m2,m3)       m1   m2   m3   MONOTONIC if m1 = 1     PLAIN
                                              and m3 = 0, else NONE
MVSoftmax(m, t, is_am)         1    0    m    ABOVE_M3                MV
MVSoftmax(m, t, arc)           1    m    0    POSITIVE                MV
CurricularFace(m)              1    m    0    MONOTONIC               CURRICULAR
=============================  ===  ===  ===  ======================  ============

Where theta + m > pi the heads with an angular margin (ArcFace, CombinedMargin with m1 = 1 and m3 = 0,
MVSoftmax's Arc variant, CurricularFace) take ``fallback=`` to replace the default of the table
(facekernels._head_params.with_fallback): "monotonic" -> MONOTONIC, "none" -> NONE, "easy_margin" -> POSITIVE,
"facexzoo" or a number a >= 0 -> OFFSET with margin_am = a ("facexzoo" is a = 0, FaceX-Zoo's default).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

# x_hat = x / max(||x||, NORM_EPS) (the eps of torch.nn.functional.normalize).
NORM_EPS = 1e-12
# The exact ArcFace / combined-margin derivative divides by sin(theta) = sqrt(1 - c^2); it is floored
# here so that the gradient stays finite as c -> +-1 (spec: "floored at a small documented epsilon").
SIN_THETA_EPS = 1e-6


class Fallback(enum.IntEnum):
    """Which branch replaces phi_raw(c); the fallback branch has derivative 1."""

    NONE = 0  # phi = phi_raw everywhere
    MONOTONIC = 1  # phi = phi_raw if c > cos(pi - m2) else c - sin(pi - m2) * m2  (ArcFace official)
    POSITIVE = 2  # phi = phi_raw if c > 0 else c  (easy_margin, MV-Arc)
    ABOVE_M3 = 3  # phi = phi_raw if c > m3 else c  (MV-AM: c - m if c > m else c)
    OFFSET = 4  # phi = phi_raw if c > cos(pi - m2) else c - margin_am  (FaceX-Zoo's ArcFace)


class Negatives(enum.IntEnum):
    """N(c) for hard negatives (c_ij > tau_i); other negatives keep N(c) = c."""

    PLAIN = 0  # no reweighting, no mask
    MV = 1  # (t + 1) c + t, t fixed
    CURRICULAR = 2  # c (t + c), t the running buffer (not differentiated)


HEAD_NAMES = ("norm_softmax", "arcface", "cosface", "combined", "mv_softmax", "curricular")
REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "straight_through")
HEAD_BACKENDS = ("auto", "triton", "cpu", "reference")


@dataclass(frozen=True)
class HeadParams:
    """Everything a backend needs to compute one head's loss (besides tensors and the t buffer)."""

    s: float
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    fallback: Fallback = Fallback.NONE
    negatives: Negatives = Negatives.PLAIN
    mv_t: float = 0.0  # MV-Softmax's fixed t
    momentum: float = 0.0  # CurricularFace's EMA weight alpha
    margin_am: float = 0.0  # Fallback.OFFSET: phi = c - margin_am where theta + m2 > pi (FaceX-Zoo's name)
    reduction: str = "mean"
    ignore_index: int = -100
    margin_grad: str = "exact"

    @property
    def target_is_linear(self) -> bool:
        """phi_raw = c - m3 exactly (no acos): NormSoftmax, CosFace, MV-AM."""
        return self.m1 == 1.0 and self.m2 == 0.0

    @property
    def uses_t(self) -> bool:
        return self.negatives == Negatives.CURRICULAR

    @property
    def fallback_threshold(self) -> float:
        """The cosine above which phi_raw is used (ignored for Fallback.NONE)."""
        if self.fallback in (Fallback.MONOTONIC, Fallback.OFFSET):
            return math.cos(math.pi - self.m2)  # theta + m2 > pi  <=>  c < cos(pi - m2)
        if self.fallback == Fallback.ABOVE_M3:
            return self.m3
        return 0.0

    @property
    def fallback_offset(self) -> float:
        """phi = c - fallback_offset on the fallback branch."""
        if self.fallback == Fallback.MONOTONIC:
            return math.sin(math.pi - self.m2) * self.m2
        if self.fallback == Fallback.OFFSET:
            return self.margin_am
        return 0.0


MINING_MODES = ("semihard", "hard", "all")
DISTANCES = ("squared_euclidean", "euclidean", "cosine")
TRIPLET_REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")
TRIPLET_BACKENDS = ("auto", "cuda", "cpu", "reference")


@dataclass(frozen=True)
class TripletParams:
    margin: float = 0.2
    mining: str = "semihard"
    distance: str = "squared_euclidean"
    normalize: bool = True
    soft: bool = False
    reduction: str = "mean"
