"""Backend selection: which implementation computes a head or a triplet loss.

Each backend lives in its own module and exposes one function with the reference's signature; it is
imported only when first asked for, so ``import facekernels`` needs neither the compiled extension nor
Triton. There is no silent fallback: a backend that cannot run raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import importlib
import sys

import torch


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run in this installation or on these tensors."""


# backend name -> (module, function); each function has the signature of the reference one:
#   heads:   fn(embeddings, weight, labels, params: HeadParams, t, training) -> loss
#   triplet: fn(embeddings, labels, params: TripletParams) -> loss | (terms, triplets)
_HEAD_IMPLS = {
    "reference": ("facekernels.reference.heads", "margin_cross_entropy"),
    "cpu": ("facekernels.ops.cpu_heads", "margin_cross_entropy"),
    "triton": ("facekernels.triton.heads", "margin_cross_entropy"),
}
_TRIPLET_IMPLS = {
    "reference": ("facekernels.reference.triplet", "triplet_margin_loss"),
    "cpu": ("facekernels.ops.triplet", "triplet_margin_loss"),
    "cuda": ("facekernels.ops.triplet", "triplet_margin_loss"),
}
_AUTO_HEAD = {"cuda": "triton", "cpu": "cpu"}
_AUTO_TRIPLET = {"cuda": "cuda", "cpu": "cpu"}


def _load(table: dict, kind: str, backend: str):
    module_name, fn_name = table[backend]
    # an already imported backend is taken from sys.modules: torch.compile (Dynamo) traces that lookup but
    # not importlib, so a compiled module works once its backend module has been imported
    module = sys.modules.get(module_name)
    if module is not None:
        return getattr(module, fn_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise
        raise BackendUnavailableError(
            f"backend={backend!r} for {kind} is not available yet in this version of facekernels; "
            f"use backend='reference'"
        ) from None
    return getattr(module, fn_name)


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
