"""The shared test kit: one input generator per loss family, the error-ratio rule and a verbose assert_close.

Tests import it as ``import kit`` (pytest puts tests/ on sys.path, as for ``oracle``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from facekernels import _extension

# ---------------------------------------------------------------------------------------------- backends

# The triton backend's tensors: CUDA ones where there is a GPU, else CPU ones, which it takes only under
# Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_ext = pytest.mark.skipif(not _extension.is_available(), reason="needs the compiled extension facekernels._C")
needs_triton = pytest.mark.skipif(not triton_importable(), reason="needs triton")
# for the tests written on CPU tensors (edge cases, properties, the sharded mode on gloo): the triton backend
# takes CPU tensors under Triton's interpreter only; where there is a GPU, the tests that run it on CUDA
# tensors are facekernels.benchmark.gpu_suite.GPU_TESTS
TRITON_ON_CPU = triton_importable() and not torch.cuda.is_available()
triton_on_cpu = pytest.mark.skipif(not TRITON_ON_CPU,
                                   reason="gives the triton backend CPU tensors: needs triton, under its interpreter "
                                          "(a machine without CUDA)")  # fmt: skip
# the heads' backends as pytest parameters: the fused ones, those that compute in float64, and all of them;
# CPU_TENSOR_BACKENDS for the files that keep every input on the CPU
FUSED_BACKENDS = [pytest.param("cpu", marks=needs_ext), pytest.param("triton", marks=needs_triton)]
FLOAT64_BACKENDS = ["reference", FUSED_BACKENDS[0]]
HEAD_BACKENDS = ["reference", *FUSED_BACKENDS]
CPU_TENSOR_BACKENDS = [*FLOAT64_BACKENDS, pytest.param("triton", marks=triton_on_cpu)]


def device(backend: str) -> str:
    """Where a backend's inputs live in the tests: TRITON_DEVICE for triton, the CPU for the others."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def precise_dtype(backend: str) -> torch.dtype:
    """The most precise dtype a backend computes in: float32 for triton (it takes no float64), else float64."""
    return torch.float32 if backend == "triton" else torch.float64


def to_backend(backend: str, *tensors):
    """The tensors on the backend's device (``device``); differentiable, so a CPU leaf still gets its .grad."""
    return tuple(t if t is None else t.to(device(backend)) for t in tensors)

# ------------------------------------------------------------------------------------------------ inputs


def head_inputs(batch, classes, features, *, dtype=torch.float64, near_frac=0.5, ignore_frac=0.0,
                ignore_index=-100, generator=None):  # fmt: skip
    """Embeddings x (B, d), class weights w (C, d) and labels y (B,) for a margin-softmax head.

    A fraction ``near_frac`` of the rows is placed near 3x its class weight, so that target cosines spread
    over (-1, 1): margins, the theta + m > pi fallback and hard negatives (MV, CurricularFace) all occur
    on small shapes, where purely random rows would all sit near cosine 0. A fraction ``ignore_frac`` of
    the labels is ``ignore_index``. Drawn in float64 then rounded, so that a float64 oracle can read the
    very same rounded values.
    """
    g = generator
    x = torch.randn(batch, features, generator=g, dtype=torch.float64)
    w = torch.randn(classes, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    near = torch.rand(batch, generator=g) < near_frac
    noise = 0.6 * torch.randn(int(near.sum()), features, generator=g, dtype=torch.float64)
    x[near] = 3 * w[y][near] + noise
    if ignore_frac:
        y[torch.rand(batch, generator=g) < ignore_frac] = ignore_index
    return x.to(dtype), w.to(dtype), y


def triplet_inputs(batch, classes, features=5, *, dtype=torch.float64, spread=None, generator=None):
    """Embeddings e (B, d) and labels y (B,) in [0, classes) for the triplet loss.

    With ``spread=None`` the rows are independent standard normals (every pair at a similar distance, so the
    semi-hard rule takes both its branches). With a number, each row is its class centre plus noise of
    that scale: clustered classes, where positives are near and most negatives far.
    """
    g = generator
    y = torch.randint(0, classes, (batch,), generator=g)
    e = torch.randn(batch, features, generator=g, dtype=torch.float64)
    if spread is not None:
        centres = torch.randn(classes, features, generator=g, dtype=torch.float64)
        e = centres[y] + spread * e
    return e.to(dtype), y


# ------------------------------------------------------------------------------------------- comparisons


class RoundCosineGrad(TorchFunctionMode):
    """The Triton heads' arithmetic model for the reference backend: rounds the gradient of its cosine matrix
    (its one matmul, ``x_hat @ w_hat.t()``) to bfloat16, as the kernels store D = dc inv_x inv_w in bfloat16 (the
    same relative rounding of the same values). ``hooks`` counts the matmuls it rounded."""

    def __init__(self):
        super().__init__()
        self.hooks = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("matmul", "__matmul__") and out.requires_grad:
            out.register_hook(lambda grad: grad.to(torch.bfloat16).to(grad.dtype))
            self.hooks += 1
        return out


def max_error(got, want) -> float:
    """Largest absolute difference (NaN if either side has a NaN where the other has not), 0 when empty."""
    if got.numel() == 0:
        return 0.0
    return (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item()


def logit_floor(s: float, dtype: torch.dtype) -> float:
    """The error-ratio rule's floor for a head of scale ``s`` computed in ``dtype``: a logit s c carries about
    s u absolute rounding (u the dtype's unit roundoff), and so do softmax(z) and the gradients relative to their
    largest value; 16 covers the few roundings along the way. Without it the bound is k x the eager error, which
    one BLAS (its blocking, its thread count under load) can make small by luck: CurricularFace's dx came out
    1.6e-6 eager against 1.3e-5 fused on one machine, within float32's reach either way."""
    return 16 * s * torch.finfo(dtype).eps / 2


def assert_error_ratio(got, low, want, *, k=4.0, floor=1e-6, what="value", min_scale=1.0):
    """The error-ratio rule (flash-attention, Cut Cross-Entropy) for a low-precision kernel.

    ``want`` is the float64 oracle on the same rounded inputs, ``low`` the same eager math computed in the
    kernel's dtype. The kernel's error must be at most ``k`` times the eager one, plus ``floor`` times the
    largest magnitude of ``want`` (at least ``min_scale``): the eager error can be 0 by luck on a small case,
    and a few ulps of the largest value are noise, not a defect.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, oracle {tuple(want.shape)}"
    err, err_low = max_error(got, want), max_error(low, want)
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    bound = k * err_low + floor * max(scale, min_scale)
    assert math.isfinite(err) and err <= bound, (
        f"{what}: kernel error {err:.3e} > {k} x eager error {err_low:.3e} + {floor:g} x {max(scale, min_scale):.3g}"
    )


def assert_close(got, want, *, rtol, atol, what="value", equal_nan=False, show=5):
    """Elementwise |got - want| <= atol + rtol |want| (as torch.testing.assert_close) with a report that says
    how many elements differ, the largest error and where, and the first ``show`` offenders."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
    diff = (g - w).abs()
    # equal values pass even when they are infinite (inf - inf is NaN); a NaN differs unless equal_nan
    bad = ~((diff <= atol + rtol * w.abs()) | (g == w))
    if equal_nan:
        bad &= ~(g.isnan() & w.isnan())
    count = int(bad.sum())
    if count == 0:
        return
    where = bad.nonzero()
    worst = torch.where(bad, diff.nan_to_num(math.inf), -1.0).flatten().argmax()
    worst_at = tuple(torch.unravel_index(worst, g.shape)) if g.dim() else ()
    lines = [
        f"{what}: {count} of {g.numel()} elements differ (rtol={rtol:g}, atol={atol:g}); "
        f"largest error {diff[worst_at].item():.3e} at {tuple(int(i) for i in worst_at)}"
    ]
    for idx in where[:show].tolist():
        i = tuple(idx)
        lines.append(f"  at {i}: got {g[i].item():.10g}, expected {w[i].item():.10g}")
    if count > show:
        lines.append(f"  ... and {count - show} more")
    raise AssertionError("\n".join(lines))


def fast_first(*values) -> list:
    """Parametrize values of which the first runs in the fast lane (``pytest -m "not slow"``) and the others are
    marked slow: a large grid keeps one point per test in the edit-test loop and runs whole in the full suite."""
    return [values[0], *(pytest.param(v, marks=pytest.mark.slow) for v in values[1:])]

