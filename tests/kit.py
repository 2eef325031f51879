"""The shared test kit: one input generator per loss family, the error-ratio rule and a verbose assert_close.

Tests import it as ``import kit`` (pytest puts tests/ on sys.path, as for ``oracle``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

import facekernels as fk
from facekernels import _extension
from facekernels._rowmath import MarginState

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


class Case(NamedTuple):
    """One conformance case: a head of the registry (``head``, a name of ``fk.head_names()``) at ``margins``.

    ``spread_norms``: the heads of docs/heads.md "More heads" (per-row margins, sub-centers, filtering) take
    inputs whose rows' norms spread over [1, 14]: below, inside and above MagFace's [l_a, u_a] here, and around
    AdaFace's running mean (``state``), so that z_i clips at both ends.
    """

    head: str
    margins: dict
    spread_norms: bool = False

    @property
    def k(self) -> int:
        """Rows of the weight per class (sub-centers)."""
        return self.margins.get("k", 1)

    def params(self, **options):
        return fk.head_params(self.head, **options, **self.margins)

    def t0(self, device="cpu"):
        """CurricularFace's t before the first step (a float32 buffer, as the module's), else None."""
        return torch.tensor(0.15, device=device) if self.head == "curricular" else None

    def state(self, device="cpu"):
        """A fresh training-step state: AdaFace's statistics (mean 6, std 3, so that the norms of ``inputs``
        clip z_i at both ends), an ElasticFace generator seeded alike for every run, else None."""
        if self.head == "adaface":
            return MarginState(torch.tensor(6.0, device=device), torch.tensor(3.0, device=device))
        if self.head.startswith("elastic"):
            return MarginState(generator=torch.Generator(device).manual_seed(5))
        return None

    def inputs(self, batch, classes, features, dtype=torch.float64, **kw):
        """``head_inputs`` for this case: k rows of w per class, and the rows' norms spread if ``spread_norms``."""
        x, w, y = head_inputs(batch, classes * self.k, features, **kw)
        if self.spread_norms:
            x = x / x.norm(dim=1, keepdim=True) * torch.linspace(1.0, 14.0, batch, dtype=torch.float64)[:, None]
        y = torch.where(y >= 0, y // self.k, y)
        return x.to(dtype), w.to(dtype), y


_more = dict(spread_norms=True)
# The conformance cases, by name: every registered head at least once (test_registry checks it). The first
# nine are the independent oracle's (oracle.head_loss writes each one's published formula out).
CASES = {
    "norm_softmax": Case("norm_softmax", dict(s=64.0)),
    "arcface": Case("arcface", dict(s=64.0, m=0.5)),
    "arcface_easy": Case("arcface", dict(s=30.0, m=0.5, easy_margin=True)),
    "cosface": Case("cosface", dict(s=64.0, m=0.35)),
    "combined": Case("combined", dict(s=64.0, m1=1.0, m2=0.3, m3=0.0)),
    "combined_general": Case("combined", dict(s=32.0, m1=0.9, m2=0.4, m3=0.15)),
    "mv_am": Case("mv_softmax", dict(s=32.0, m=0.35, t=0.2, is_am=True)),
    "mv_arc": Case("mv_softmax", dict(s=32.0, m=0.5, t=0.12, is_am=False)),
    "curricular": Case("curricular", dict(s=64.0, m=0.5, momentum=0.1)),
    "adaface": Case("adaface", dict(s=64.0, m=0.4, h=0.9, t_alpha=0.5), **_more),
    "magface": Case("magface", dict(s=32.0, l_a=3.0, u_a=10.0, l_m=0.45, u_m=0.8, lambda_g=35.0), **_more),
    "magface_monotonic": Case("magface", dict(s=32.0, l_a=3.0, u_a=10.0, l_m=0.45, u_m=0.8, easy_margin=False),
                              **_more),  # fmt: skip
    "magface_cos": Case("magface", dict(s=32.0, l_a=3.0, u_a=10.0, l_m=0.35, u_m=0.8, lambda_g=150.0, kind="cos"),
                        **_more),  # fmt: skip
    "elastic_arc": Case("elastic_arcface", dict(m=0.5, std=0.1), **_more),
    "elastic_arc_plus": Case("elastic_arcface", dict(m=0.5, std=0.1, plus=True, fallback="none"), **_more),
    "elastic_cos_official": Case("elastic_cosface", dict(m=0.35, std=0.1, plus="official"), **_more),
    "subcenter": Case("subcenter_arcface", dict(k=3), **_more),
    "subcenter_easy": Case("subcenter_arcface", dict(s=30.0, k=2, easy_margin=True), **_more),
    # small s: the filtered logits 0 keep a visible share of the softmax (and so of any wrong gradient)
    "filter_arc": Case("arcface", dict(s=8.0, interclass_filtering_threshold=0.3), **_more),
    "filter_cos": Case("cosface", dict(s=4.0, interclass_filtering_threshold=0.2), **_more),
    "filter_norm": Case("norm_softmax", dict(s=2.0, interclass_filtering_threshold=0.25), **_more),
    "filter_combined": Case("combined", dict(s=8.0, m2=0.5, fallback="none", interclass_filtering_threshold=0.3),
                            **_more),  # fmt: skip
}
ORACLE_CASES = [name for name, case in CASES.items() if not case.spread_norms]  # oracle.head_loss knows these
MORE_CASES = [name for name, case in CASES.items() if case.spread_norms]


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

