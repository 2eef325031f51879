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
SubCenterArcFace(m, k)         1    m    0    MONOTONIC               PLAIN  (subcenters = k)
AdaFace                        1    m2_i m3_i CLIP                    PLAIN  (cos_bound = 1 - eps)
MagFace arc / cos              1    m_i  0    POSITIVE / MONOTONIC    PLAIN
                               1    0    m_i  NONE                    PLAIN
ElasticArcFace / CosFace       1    m_i  0    MONOTONIC               PLAIN
                               1    0    m_i  NONE                    PLAIN
=============================  ===  ===  ===  ======================  ============

Per-row margins (m2_i, m3_i: ``row_margins``, one of AdaFaceMargins, MagFaceMargins, ElasticMargins) are formed
per step in an O(B) pre-pass (``facekernels._rowmath.row_margins``) and replace m2 or m3 row by row; MagFace's
depend on ||x_i|| with a gradient. Three options act on every class: ``cos_bound`` (every cosine clamped to
[-cos_bound, cos_bound]: AdaFace), ``filter_threshold`` (insightface's inter-class filtering: a negative whose
cosine exceeds it gets the logit 0 and no gradient) and ``subcenters`` (k rows of the weight per class, the
class cosine their max: Sub-center ArcFace).

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
    CLIP = 5  # phi = cos(clip(theta + m2, clip_eps, pi - clip_eps)) - m3, flat where clipped (AdaFace)


class Negatives(enum.IntEnum):
    """N(c) for hard negatives (c_ij > tau_i); other negatives keep N(c) = c."""

    PLAIN = 0  # no reweighting, no mask
    MV = 1  # (t + 1) c + t, t fixed
    CURRICULAR = 2  # c (t + c), t the running buffer (not differentiated)


ELASTIC_PLUS = (False, True, "official")


@dataclass(frozen=True)
class AdaFaceMargins:
    """AdaFace: from the clipped norm n_i of x_i (detached) and the running mean / std of n,
    z_i = clip(h (n_i - mean) / (std + eps), -1, 1), m2_i = -m z_i, m3_i = m (1 + z_i)."""

    m: float
    h: float
    t_alpha: float  # EMA weight of the batch statistics
    eps: float  # the cosine clamp 1 - eps, the angle clip [eps, pi - eps] and std + eps


@dataclass(frozen=True)
class MagFaceMargins:
    """MagFace: a_i = clamp(||x_i||, l_a, u_a) (differentiated), m_i = l_m + (u_m - l_m)(a_i - l_a)/(u_a - l_a)
    as m2_i (arc) or m3_i (cos), and the row's loss gains lambda_g g(a_i), g(a) = a / u_a^2 + 1 / a."""

    l_a: float
    u_a: float
    l_m: float
    u_m: float
    lambda_g: float
    angular: bool  # kind "arc" (m2_i) or "cos" (m3_i)

    @property
    def slope(self) -> float:
        return (self.u_m - self.l_m) / (self.u_a - self.l_a)


@dataclass(frozen=True)
class ElasticMargins:
    """ElasticFace: in training each row's margin is drawn from N(m, std^2) (``plus``: paired by rank with the
    target cosines); in eval it is m. m2_i (ElasticArcFace) or m3_i (ElasticCosFace)."""

    m: float
    std: float
    plus: bool | str  # False, True (rank-matched) or "official" (the published assignment)
    angular: bool
REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "straight_through")
# The one vocabulary of backends: each name is one implementation, and each loss offers the ones it has. The
# heads' GPU kernels are Triton ("triton", which also runs CPU tensors under TRITON_INTERPRET=1), the triplet
# loss's are compiled CUDA ("cuda"); a name of the other loss is refused with a message naming the right one
# (_validate.check_backend).
BACKENDS = {
    "auto": ("heads", "triplet"),  # the fused backend of the inputs' device (facekernels/_backends.py)
    "triton": ("heads",),
    "cuda": ("triplet",),
    "cpu": ("heads", "triplet"),  # the compiled C++ ops on CPU tensors
    "reference": ("heads", "triplet"),  # eager PyTorch (facekernels/reference/): the oracle
}
HEAD_BACKENDS = tuple(name for name, losses in BACKENDS.items() if "heads" in losses)


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
    clip_eps: float = 0.0  # Fallback.CLIP: theta + m2 is clipped to [clip_eps, pi - clip_eps]
    row_margins: AdaFaceMargins | MagFaceMargins | ElasticMargins | None = None  # per-row m2_i / m3_i
    cos_bound: float = 1.0  # every cosine is clamped to [-cos_bound, cos_bound] (gradient 0 outside)
    filter_threshold: float = math.inf  # negatives with a cosine above it: logit 0, no gradient (inf: off)
    subcenters: int = 1  # rows of the weight per class (class j: rows j k .. j k + k - 1); its cosine their max
    reduction: str = "mean"
    ignore_index: int = -100
    margin_grad: str = "exact"

    @property
    def target_is_linear(self) -> bool:
        """phi_raw = c - m3 exactly (no acos): NormSoftmax, CosFace, MV-AM, MagFace cos, ElasticCosFace."""
        return self.m1 == 1.0 and self.m2 == 0.0 and not self.row_m2

    @property
    def uses_t(self) -> bool:
        return self.negatives == Negatives.CURRICULAR

    @property
    def row_m2(self) -> bool:
        """Whether the angular margin m2 is per row (replaced by row_margins' m2_i)."""
        return isinstance(self.row_margins, AdaFaceMargins) or bool(self.row_margins and self.row_margins.angular)


MINING_MODES = ("semihard", "hard", "all")
DISTANCES = ("squared_euclidean", "euclidean", "cosine")
TRIPLET_REDUCTIONS = ("mean", "mean_nonzero", "sum", "none")
TRIPLET_BACKENDS = tuple(name for name, losses in BACKENDS.items() if "triplet" in losses)


@dataclass(frozen=True)
class TripletParams:
    margin: float = 0.2
    mining: str = "semihard"
    distance: str = "squared_euclidean"
    normalize: bool = True
    soft: bool = False
    reduction: str = "mean"
