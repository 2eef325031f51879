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
def _load_ops():
    from . import _library  # noqa: F401  (the schemas the C++ implementations register against)

    try:
        module = importlib.import_module("facekernels._C")
    except ModuleNotFoundError as err:
        raise ExtensionUnavailableError(f"facekernels._C is not built: {BUILD_HINT}") from err
    except ImportError as err:  # typically an undefined symbol: built against another torch
        raise ExtensionUnavailableError(
            f"facekernels._C does not load with torch {torch.__version__} ({err}); rebuild it: {BUILD_HINT}"
        ) from err
    return module


def is_available() -> bool:
    try:
        _load_ops()
    except ExtensionUnavailableError:
        return False
    return True


def cuda_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_load_ops().cuda_built)


def ops():
    """torch.ops.facekernels, after loading the extension that registers it."""
    _load_ops()
    return torch.ops.facekernels

