"""Backend selection: which implementation computes a head or a triplet loss, and ``head_loss``, one head's
loss on the backend selected (the eager reference or the one fused algorithm on that backend's kernels).

Each backend lives in its own module and is imported only when first asked for, so ``import facekernels``
needs neither the compiled extension nor Triton. There is no silent fallback: a backend that cannot run
raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import torch

from . import _algorithm
from . import _validate as V
from ._errors import BackendUnavailableError
from ._params import HeadParams
from ._rowmath import MarginState


# The loaders import a backend with an import statement (which torch.compile can trace, unlike importlib):
#   heads:   the kernel back-end of the one head algorithm (facekernels/_algorithm.py), None for the reference
#   triplet: fn(embeddings, labels, params: TripletParams) -> loss | (terms, triplets)
def _cpu_kernels():
    from .kernels.cpu import KERNELS

    return KERNELS


def _triton_kernels():
    from .kernels.triton import KERNELS

    return KERNELS


def _reference_triplet():
    from .reference.triplet import eager_triplet_margin_loss

    return eager_triplet_margin_loss


def _compiled_triplet():
    from .kernels.triplet import fused_triplet_margin_loss

    return fused_triplet_margin_loss


_HEAD_KERNELS = {"reference": lambda: None, "cpu": _cpu_kernels, "triton": _triton_kernels}
_TRIPLET_IMPLS = {"reference": _reference_triplet, "cpu": _compiled_triplet, "cuda": _compiled_triplet}
_AUTO_HEAD = {"cuda": "triton", "cpu": "cpu"}
_AUTO_TRIPLET = {"cuda": "cuda", "cpu": "cpu"}


def _load(table: dict, kind: str, backend: str):
    try:
        return table[backend]()
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("facekernels."):
            raise  # a missing third-party dependency: let its own message through
        raise BackendUnavailableError(
            f"backend={backend!r} for {kind} is not available yet in this version of facekernels; "
            f"use backend='reference'"
        ) from None


def _resolve(backend: str, device: torch.device, auto: dict, kind: str) -> str:
    if backend != "auto":
        return backend
    if device.type not in auto:
        raise BackendUnavailableError(
            f"backend='auto' has no {kind} backend for {device.type} tensors; use backend='reference'"
        )
    return auto[device.type]


def head_kernels(backend: str, device: torch.device):
    """The kernel back-end for ``backend`` ("auto" resolved by the device of the inputs); None for
    "reference" (the eager implementation, which materialises the logits)."""
    return _load(_HEAD_KERNELS, "margin-softmax heads", _resolve(backend, device, _AUTO_HEAD, "head"))


def triplet_backend(backend: str, device: torch.device):
    name = _resolve(backend, device, _AUTO_TRIPLET, "triplet")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors; got {device.type} tensors")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend='cpu' needs CPU tensors; got {device.type} tensors")
    return _load(_TRIPLET_IMPLS, "the triplet loss", name)


def head_loss(embeddings, weight, labels, params: HeadParams, t, training: bool, backend: str, stats: bool = False,
              state: MarginState | None = None, update=None):  # fmt: skip
    """The loss of one head on one device, on ``backend``: the inputs checked, then the eager reference
    (reference/heads.py) or the one fused algorithm (_algorithm.py) on the backend's kernels. What the modules,
    the functional form and the compat layers call; the class-sharded mode is sharded.py's."""
    error, labels = V.head_call_error(embeddings, weight, labels, params, t, state)
    if error is not None:
        raise error
    V.check_label_values(labels, weight.shape[0] // params.subcenters, params.ignore_index)
    kernels = head_kernels(backend, embeddings.device)
    if kernels is None:
        if update is not None:
            raise ValueError("a fused optimizer (facekernels.optim) needs a fused backend: the head's backend is "
                             "'reference' here; use backend='auto', 'cpu' or 'triton'")  # fmt: skip
        from .reference.heads import eager_margin_cross_entropy

        return eager_margin_cross_entropy(embeddings, weight, labels, params, t, training, stats, state)
    return _algorithm.fused_head_loss(embeddings, weight, labels, params, t, training, kernels, stats=stats,
                                     state=state, update=update)  # fmt: skip
