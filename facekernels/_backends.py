"""Backend selection: which implementation computes a head or a triplet loss.

Each backend lives in its own module and exposes one function with the reference's signature; it is
imported only when first asked for, so ``import facekernels`` needs neither the compiled extension nor
Triton. There is no silent fallback: a backend that cannot run raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import torch


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run in this installation or on these tensors."""


# Each loader imports one backend with an import statement (which torch.compile can trace, unlike
# importlib) and returns its function, whose signature is the reference one:
#   heads:   fn(embeddings, weight, labels, params: HeadParams, t, training) -> loss
#   triplet: fn(embeddings, labels, params: TripletParams) -> loss | (terms, triplets)
def _reference_heads():
    from .reference.heads import margin_cross_entropy

    return margin_cross_entropy


def _cpu_heads():
    from .ops.cpu_heads import margin_cross_entropy

    return margin_cross_entropy


def _triton_heads():
    from .triton.heads import margin_cross_entropy

    return margin_cross_entropy


def _reference_triplet():
    from .reference.triplet import triplet_margin_loss

    return triplet_margin_loss


def _compiled_triplet():
    from .ops.triplet import triplet_margin_loss

    return triplet_margin_loss


_HEAD_IMPLS = {"reference": _reference_heads, "cpu": _cpu_heads, "triton": _triton_heads}
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


def head_backend(backend: str, device: torch.device):
    """The head implementation for ``backend`` ("auto" resolved by the device of the inputs)."""
    return _load(_HEAD_IMPLS, "margin-softmax heads", _resolve(backend, device, _AUTO_HEAD, "head"))


def triplet_backend(backend: str, device: torch.device):
    name = _resolve(backend, device, _AUTO_TRIPLET, "triplet")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend='cuda' needs CUDA tensors; got {device.type} tensors")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend='cpu' needs CPU tensors; got {device.type} tensors")
    return _load(_TRIPLET_IMPLS, "the triplet loss", name)
