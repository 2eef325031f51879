"""facekernels: fused margin-softmax heads and triplet mining for face-recognition training.

Importing the package needs only torch: the compiled extension and Triton load when a backend that uses
them first runs.
"""

from . import convert, functional, reference
from ._backends import BackendUnavailableError
from ._extension import ExtensionUnavailableError
from ._params import HeadParams, TripletParams
from ._rowmath import HeadStats
from ._validate import set_label_checks
from .heads import ArcFace, CombinedMargin, CosFace, CurricularFace, MVSoftmax, NormSoftmax, head_params
from .triplet import TripletMarginLoss

__version__ = "0.1.0"

__all__ = [
    "ArcFace",
    "BackendUnavailableError",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ExtensionUnavailableError",
    "HeadParams",
    "HeadStats",
    "MVSoftmax",
    "NormSoftmax",
    "TripletMarginLoss",
    "TripletParams",
    "convert",
    "functional",
    "head_params",
    "reference",
    "set_label_checks",
]
