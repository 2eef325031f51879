"""facekernels: fused margin-softmax heads and triplet mining for face-recognition training.

Importing the package needs only torch: the compiled extension and Triton load when a backend that uses
them first runs.
"""

from . import convert, functional, optim, reference
from ._backends import BackendUnavailableError
from ._extension import ExtensionUnavailableError
from ._params import HeadParams, TripletParams
from ._rowmath import HeadStats
from ._validate import check_labels, set_label_checks
from .heads import (
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    MagFace,
    MVSoftmax,
    NormSoftmax,
    SubCenterArcFace,
    head_params,
)
from .triplet import TripletMarginLoss

__version__ = "0.1.0"

__all__ = [
    "AdaFace",
    "ArcFace",
    "BackendUnavailableError",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "ExtensionUnavailableError",
    "HeadParams",
    "HeadStats",
    "MVSoftmax",
    "MagFace",
    "NormSoftmax",
    "SubCenterArcFace",
    "TripletMarginLoss",
    "TripletParams",
    "check_labels",
    "convert",
    "functional",
    "head_params",
    "optim",
    "reference",
    "set_label_checks",
]
