"""Lazy loading of the compiled extension ``facekernels._C``.

``import facekernels`` never imports it (flash-attention 2 did, and broke every import when the build
was missing); the compiled backends call :func:`ops` when they first run, and get an error that says how
to build it when it is missing or was built against another torch.
"""

from __future__ import annotations

import functools
import importlib

import torch

from ._errors import ExtensionUnavailableError

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`), against the torch you run"
)


@functools.cache
def _load():
    try:
        module = importlib.import_module("facekernels._C")
    except ModuleNotFoundError as err:
        raise ExtensionUnavailableError(f"facekernels._C is not built: {BUILD_HINT}") from err
    except ImportError as err:  # typically an undefined symbol: built against another torch
        raise ExtensionUnavailableError(
            f"facekernels._C does not load with torch {torch.__version__} ({err}); rebuild it: {BUILD_HINT}"
        ) from err
    _register_fakes()
    return module


def is_available() -> bool:
    try:
        _load()
    except ExtensionUnavailableError:
        return False
    return True


def cuda_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_load().cuda_built)


def ops():
    """torch.ops.facekernels, after loading the extension that registers it."""
    _load()
    return torch.ops.facekernels


def _register_fakes() -> None:
    """Shape functions of every C++ op (the one place they are registered), so that torch.compile can trace the
    ops without running them."""

    def acc(t):
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @torch.library.register_fake("facekernels::target_cosine")
    def _(embeddings, weight, labels, class_start):
        return embeddings.new_empty(embeddings.shape[0], dtype=acc(embeddings))

    @torch.library.register_fake("facekernels::inv_norms")
    def _(rows):
        return rows.new_empty(rows.shape[0], dtype=acc(rows))

    @torch.library.register_fake("facekernels::margin_lse")
    def _(embeddings, weight, inv_x, inv_w, target, phi, tau, t, s, negatives, mv_t, class_tile=0):
        return embeddings.new_empty(embeddings.shape[0], dtype=acc(embeddings))

    @torch.library.register_fake("facekernels::margin_backward")
    def _(grad_rows, embeddings, weight, inv_x, inv_w, target, phi, dphi, tau, t, lse, s, negatives, mv_t,
          need_embeddings_grad, need_weight_grad, class_tile=0):  # fmt: skip
        a = embeddings.new_empty(embeddings.shape, dtype=acc(embeddings)) if need_embeddings_grad else None
        return (a if a is not None else embeddings.new_empty(0, dtype=acc(embeddings)),
                torch.empty_like(weight) if need_weight_grad else weight.new_empty(0))  # fmt: skip


def target_cosine(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, class_start: int = 0):
    """c_i = clamp(x_hat_i . w_hat_(labels_i - class_start), -1, 1) for rows whose class lies in
    [class_start, class_start + weight.shape[0]), 0 for the others (ignored rows, other shards).

    Float32 result (float64 for float64 inputs), accumulated in float32 at least; not differentiable.
    """
    return ops().target_cosine(embeddings, weight, labels, class_start)
