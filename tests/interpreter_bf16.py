"""Test-only shim: bfloat16 arithmetic of Triton's interpreter (TRITON_INTERPRET=1) made that of the GPU, on
triton 3.6.0 and newer. Two defects, both from numpy having no bfloat16 (the interpreter keeps bfloat16 tensors
as their bit patterns in ``uint16`` arrays):

* ``tl.dot``: ``InterpreterBuilder.create_dot`` converts only 8-bit float operands before ``np.matmul``, so a
  bfloat16 dot multiplies the bit patterns as integers (values ~1e10; triton issue #11584, declined upstream).
  The interpreter's cast path already decodes bfloat16 right (``cast_impl``: bfloat16 -> float32 by moving the
  bits into the top half of a float32), so each bfloat16 operand goes through that cast and the original
  ``create_dot`` gets float32 values, which it multiplies in the accumulator's dtype (``np.matmul(...,
  dtype=acc)``) and adds to the accumulator. A product of two bfloat16 values is exact in float32 (8 + 8
  significant bits), as on the tensor cores, which accumulate in float32.
* ``x.to(tl.bfloat16)`` from float32 (``create_fp_trunc``, which Triton's semantics emit with the default
  round-to-nearest-even) drops the low 16 bits: rounding toward zero, twice the GPU's error (2^-8 instead of
  2^-9 relative) and biased. The shim rounds to nearest even (torch's float32 -> bfloat16 conversion), as
  ``cvt.rn.bf16.f32`` does on the GPU. (float16 casts go through numpy's ``astype``, already round-to-nearest.)

``install()`` is called by conftest.py when the interpreter is on, and by spawned test processes
(test_sharded.py's workers); ``disabled()`` puts the interpreter's own methods back for a while.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

_ORIGINAL = {}


def _builder():
    from triton.runtime.interpreter import InterpreterBuilder

    return InterpreterBuilder


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    import triton.language as tl

    a, b = (self.cast_impl(h, tl.float32) if h.dtype.scalar == tl.bfloat16 else h for h in (a, b))
    return _ORIGINAL["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)


def _create_fp_trunc(self, src, dst_type):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        values = torch.from_numpy(np.array(src.data, dtype=np.float32))
        return TensorHandle(values.to(torch.bfloat16).view(torch.uint16).numpy(), tl.bfloat16)
    return _ORIGINAL["create_fp_trunc"](self, src, dst_type)


_SHIM = {"create_dot": _create_dot, "create_fp_trunc": _create_fp_trunc}


def install() -> None:
    """Patch the interpreter's builder (idempotent)."""
    builder = _builder()
    for name, shim in _SHIM.items():
        if getattr(builder, name) is not shim:
            _ORIGINAL[name] = getattr(builder, name)
            setattr(builder, name, shim)


def active() -> bool:
    builder = _builder()
    return all(getattr(builder, name) is shim for name, shim in _SHIM.items())


@contextlib.contextmanager
def disabled():
    """The interpreter's own bfloat16 dot and cast inside the block; the shim again after (if it was on)."""
    builder = _builder()
    was = {name: getattr(builder, name) for name in _SHIM}
    for name, shim in _SHIM.items():
        if was[name] is shim:
            setattr(builder, name, _ORIGINAL[name])
    try:
        yield
    finally:
        for name, method in was.items():
            setattr(builder, name, method)
