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
from .heads import HEAD_CLASSES, head_params
from .triplet import TripletMarginLoss

__version__ = "0.1.0"

globals().update(HEAD_CLASSES)  # one nn.Module per head of the registry (facekernels/_head_params.py)

__all__ = sorted([
    *HEAD_CLASSES,
    "BackendUnavailableError",
    "ExtensionUnavailableError",
    "HeadParams",
    "HeadStats",
    "TripletMarginLoss",
    "TripletParams",
    "check_labels",
    "convert",
    "functional",
    "head_params",
    "optim",
    "reference",
    "set_label_checks",
])
