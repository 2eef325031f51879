"""The Triton heads in their production dtypes, bfloat16 and float16, under Triton's interpreter (any CPU
machine; on CUDA when there is a GPU), against the float64 reference on the same rounded inputs.

The interpreter computes bfloat16 wrongly without tests/interpreter_bf16.py (installed by conftest.py): the
first tests show that the shim is on, and that without it a bfloat16 tl.dot and a float32 -> bfloat16 cast are
wrong, on the newest triton here and on triton 3.6.0 (the GPU machine's) in a subprocess.

The bound (tests/kit.py, the error-ratio rule) comes from the kernels' own arithmetic model, run eagerly: the
reference in float32 on the rounded inputs, with the gradient of its cosine matrix rounded to bfloat16 (the
kernels' D, bfloat16 for both input dtypes: kernels/triton/__init__.py) and its dx, dW rounded to the input
dtype (``_model``, ``kit.RoundCosineGrad``). The kernel's error must be at most K times that model's error,
plus a floor of one rounding of D at the largest value: bfloat16's unit roundoff u = 2^-8 (D's relative
rounding is at most u, 2^-9 on average). A float16 or bfloat16 eager reference would not do: it rounds the
cosines themselves (s = 64 times 2^-9 in a logit), and its bound would hide the kernels' defects.

The default run covers every case of kit.CASES (kit.ORACLE_CASES and kit.MORE_CASES) in each dtype once, the
options rotating over the cases (every margin_grad, reduction, ignore_index value in each dtype);
``FACEKERNELS_FULL_GRID=1`` runs every head x every option combination (README, Backends).
"""

import itertools
import os
import subprocess
import sys

import interpreter_bf16
import kit
import pytest
import torch
from test_heads import DEVICE, _loss_and_grads
from test_heads import small_tiles  # noqa: F401  (the fixture: small chunks, poisoned outputs)

import facekernels as fk

pytestmark = pytest.mark.slow  # every head in bfloat16 / float16 under the Triton interpreter

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the test extra installs triton
    pytest.skip("needs triton", allow_module_level=True)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]
FULL_GRID = os.environ.get("FACEKERNELS_FULL_GRID") == "1"
SHAPE = (37, 203, 40)  # B, C, d: multiples of no tile (32 / 64 / 128 rows, 64 / 128 classes, K = 64)
K = 4.0
U_D = 2.0**-8  # unit roundoff of bfloat16, the dtype of D
U_F32 = 2.0**-24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ the shim


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    acc = tl.full((N, N), 0.5, tl.float32)
    tl.store(c_ptr + i[:, None] * N + i[None, :], tl.dot(a, b, acc))


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))


def _known_operands(dtype, n=16):
    """Small integers over 4: exact in bfloat16 and float16, and so is their float32 product."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(-12, 13, (n, n), generator=g).to(torch.float64) / 4 for _ in range(2))
    return a.to(dtype), b.to(dtype), a @ b + 0.5


@pytest.mark.skipif(not INTERPRETED, reason="the shim is for Triton's interpreter")
def test_interpreter_shim_is_on():
    assert interpreter_bf16.active()


@pytest.mark.skipif(not INTERPRETED, reason="the shim is for Triton's interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
def test_shim_makes_a_bfloat16_dot_exact(dtype):
    a, b, want = _known_operands(dtype)
    c = torch.full((16, 16), float("nan"))
    _dot_kernel[(1,)](a, b, c, 16)
    assert torch.equal(c.double(), want), (c.double() - want).abs().max()
    with interpreter_bf16.disabled():
        assert not interpreter_bf16.active()
        _dot_kernel[(1,)](a, b, c, 16)
    assert interpreter_bf16.active()
    err = (c.double() - want).abs().max().item()
    if dtype == torch.bfloat16:
        assert err > 1e3, f"the interpreter's own bfloat16 dot was right ({err}): is the shim still needed?"
    else:
        assert err == 0  # float16 was never affected


@pytest.mark.skipif(not INTERPRETED, reason="the shim is for Triton's interpreter")
def test_shim_rounds_float32_to_bfloat16_to_nearest():
    # values just below a bfloat16 midpoint and above it, ties, both signs, tiny, huge, inf and NaN
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, generator=g) * 10.0 ** torch.randint(-30, 30, (256,), generator=g)
    x[:6] = torch.tensor([1 + 2**-8 + 2**-20, 1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-7 - 2**-20), float("inf"),
                          float("nan")])  # fmt: skip
    y = torch.empty(256, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, 256)
    want = x.to(torch.bfloat16)  # round to nearest even, as cvt.rn.bf16.f32
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    with interpreter_bf16.disabled():
        _cast_kernel[(1,)](x, y, 256)
    assert not torch.equal(y.view(torch.int16), want.view(torch.int16))  # the interpreter truncates


def test_shim_on_triton_360():
    # the same three tests, in a process that imports triton 3.6.0 (.ci/run installs it beside the newest)
    path = os.environ.get("FACEKERNELS_TRITON_360", os.path.join(ROOT, ".ci-cache", "triton-3.6.0"))
    if not os.path.isdir(os.path.join(path, "triton")):
        pytest.skip(f"triton 3.6.0 is not installed at {path} (.ci/run installs it there)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([path, ROOT]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "shim and not 360", "-W", "ignore::DeprecationWarning"], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "4 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert version == "3.6.0", version


# ------------------------------------------------------------------------------------------ the model


def _model(x, w, y, params, t, training, g, state):
    """(loss, dx, dW) of the kernels' arithmetic model, eagerly (module docstring)."""
    with kit.RoundCosineGrad() as mode:
        loss, dx, dw, _ = _loss_and_grads("reference", x.float(), w.float(), y, params, t, training, g=g,
                                          state=state)  # fmt: skip
    assert mode.hooks == 1, f"the reference made {mode.hooks} matmuls: where is its cosine matrix?"
    return loss, dx.to(x.dtype), dw.to(w.dtype)


def _check_lowp(x, w, y, case, *, training=True, what="", **options):
    """The triton backend in x's dtype against the float64 reference on the same (rounded) inputs, bounded by
    the model's error, for ``case`` (a name of kit.CASES) with head ``options``."""
    case_, what = kit.CASES[case], what or case
    params = case_.params(**options)
    ts, states = [case_.t0(x.device) for _ in range(3)], [case_.state(x.device) for _ in range(3)]
    loss, dx, dw, g = _loss_and_grads("triton", x, w, y, params, ts[0], training, state=states[0])
    want = _loss_and_grads("reference", x.double(), w.double(), y, params, ts[1], training, g=g, state=states[1])
    low = _model(x, w, y, params, ts[2], training, g, states[2])
    assert loss.dtype == torch.float32 and dx.dtype == x.dtype and dw.dtype == w.dtype
    # the loss: float32 arithmetic on exact products of the rounded inputs (float32 unit roundoff)
    kit.assert_error_ratio(loss, low[0], want[0], k=K, floor=8 * U_F32, what=f"{what} loss")
    for name, got, model, exact in (("dx", dx, low[1], want[1]), ("dw", dw, low[2], want[2])):
        kit.assert_error_ratio(got, model, exact, k=K, floor=U_D, min_scale=0.0, what=f"{what} {name}")
    if ts[0] is not None:
        assert ts[0].item() == pytest.approx(ts[1].item(), abs=1e-6)
    if states[0] is not None and states[0].batch_mean is not None:  # AdaFace's statistics
        for a, b in zip(states[0][:2], states[1][:2]):
            assert a.item() == pytest.approx(b.item(), rel=1e-6)
    return loss, dx, dw


# ------------------------------------------------------------------------------------------ the grid

OPTIONS = list(itertools.product(["exact", "straight_through"], ["mean", "sum", "none"], [None, -100, 3]))
MORE_OPTIONS = list(itertools.product(["mean", "none"], [None, 3]))


def _grid(cases, options, spread):
    """(dtype, case, option) triples: the whole product with FACEKERNELS_FULL_GRID=1, else each case once per
    dtype with the options rotating (``spread(i)`` picks the option of case i so that every value occurs)."""
    out = []
    for j, dtype in enumerate(DTYPES):
        for i, case in enumerate(cases):
            chosen = options if FULL_GRID else [options[spread(i + j) % len(options)]]
            out += [pytest.param(dtype.values[0], case, opt, id=f"{dtype.id}-{case}-{opt}") for opt in chosen]
    return out


# case i takes margin_grad i % 2, reduction i % 3, ignore_index (i // 3) % 3 (OPTIONS is their product)
HEADS_GRID = _grid(kit.ORACLE_CASES, OPTIONS, lambda i: 9 * (i % 2) + 3 * (i % 3) + (i // 3) % 3)
MORE_GRID = _grid(kit.MORE_CASES, MORE_OPTIONS, lambda i: 2 * (i % 2) + (i // 2) % 2)


@pytest.mark.parametrize("dtype, case, option", HEADS_GRID)
def test_heads_low_precision(dtype, case, option, small_tiles):
    # C = 203: two Triton backward chunks (the last ragged) and two forward splits
    margin_grad, reduction, ignore_index = option
    options = dict(margin_grad=margin_grad, reduction=reduction)
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    x, w, y = kit.head_inputs(*SHAPE, dtype=dtype, ignore_frac=0.3 if ignore_index else 0.0,
                              ignore_index=ignore_index or -100)  # fmt: skip
    if ignore_index is not None:
        y[0] = ignore_index
    x, w, y = x.to(DEVICE), w.to(DEVICE), y.to(DEVICE)
    _, dx, _ = _check_lowp(x, w, y, case, **options)
    if ignore_index is not None:
        assert torch.all(dx[y == ignore_index] == 0)


@pytest.mark.parametrize("dtype, case, option", MORE_GRID)
def test_more_heads_low_precision(dtype, case, option, small_tiles):
    # sub-centers, per-row margins (AdaFace, MagFace, ElasticFace), inter-class filtering
    reduction, ignore_index = option
    options = dict(reduction=reduction, margin_grad="exact" if reduction == "mean" else "straight_through")
    kw = dict(ignore_frac=0.3, ignore_index=ignore_index) if ignore_index is not None else {}
    x, w, y = kit.CASES[case].inputs(*SHAPE, dtype, **kw)
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
        y[0] = ignore_index
    _check_lowp(x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), case, **options)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["curricular", "adaface", "elastic_cos_official"])
def test_heads_low_precision_in_eval_mode(dtype, case, small_tiles):
    # eval: CurricularFace reads t, AdaFace its statistics, ElasticFace gives every row m
    x, w, y = kit.CASES[case].inputs(*SHAPE, dtype)
    _check_lowp(x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), case, training=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["arcface", "mv_arc", "subcenter"])
def test_low_precision_default_tiles(dtype, case):
    # default chunks and tiles: B = 70 takes the forward's 128-row tiles, C = 1031 the paired class steps and
    # a ragged tail; d = 72 two K steps, the second partial
    x, w, y = kit.CASES[case].inputs(70, 1031 // kit.CASES[case].k, 72, dtype)
    _check_lowp(x.to(DEVICE), w.to(DEVICE), y.to(DEVICE), case)


def test_float16_keeps_gradients_below_float16s_range(small_tiles):
    # upstream gradients ~1e-5 and C = 2003: p * g ~ 5e-9 per negative, below float16's smallest subnormal
    # (6e-8). The weight gradient must still be right to bfloat16 accuracy, not flushed to zero (the eager
    # float16 head flushes them: the error-ratio rule alone would not see it). (Was GPU-only in test_heads.py.)
    x, w, y = (a.to(DEVICE) for a in kit.head_inputs(64, 2003, 48, dtype=torch.float16, ignore_frac=0.2))
    params = kit.CASES["arcface"].params(reduction="none")
    g = 1e-5 * torch.rand(64, dtype=torch.float64, device=DEVICE)
    _, _, dw, _ = _loss_and_grads("triton", x, w, y, params, None, g=g)
    _, _, dw_ref, _ = _loss_and_grads("reference", x.double(), w.double(), y, params, None, g=g)
    assert (dw_ref.abs() < 6e-8).float().mean() > 0.5  # the case does exercise the flush
    rel = (dw.double() - dw_ref).norm() / dw_ref.norm()
    assert rel < 4 * U_D, f"relative error of d weight {rel:.3e}"  # measured 1.7 u


# ------------------------------------------------------------------------------------------ near-parallel


def _near_parallel_inputs(dtype, case, batch=37, classes=203, features=40):
    """Rows nearly parallel to their class (every class with rows: its target cosines near 1), so that the
    weight gradient's normalisation projection cancels most of D^T X: target cosines 0.9995-0.9998 in float16
    (angles ~0.02-0.03), 0.96-0.9999 in bfloat16. One class row of w per class (sub-centers: k rows, the first
    the one the rows are near)."""
    gen = torch.Generator().manual_seed(11)
    k = kit.CASES[case].k
    w = torch.randn(classes * k, features, dtype=torch.float64, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    w_hat = w / w.norm(dim=1, keepdim=True)
    lo, hi = (0.025, 0.03) if dtype == torch.float16 else (0.014, 0.29)
    spread = lo + (hi - lo) * torch.rand(batch, 1, dtype=torch.float64, generator=gen)
    noise = torch.randn(batch, features, dtype=torch.float64, generator=gen) / features**0.5
    x = 3 * (w_hat[y * k] + spread * noise)
    return x.to(dtype), w.to(dtype), y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["arcface", "subcenter"])
def test_near_parallel_classes_weight_gradient(dtype, case, small_tiles):
    # s = 16: the targets keep a visible share of the softmax, and ArcFace's phi' ~ sin(theta + m) / sin(theta)
    # (~18 here) makes their term dominate the class's gradient. Per class, the rank-1 correction must remove
    # w_j's direction from the D^T X that the GEMM computed (stored D, float32 sums); otherwise the error is
    # ~ u / sin(theta) of the result (17 % median per class in float16 before issue 20 item 6).
    x, w, y = _near_parallel_inputs(dtype, case)
    params = fk.head_params(kit.CASES[case].head, reduction="none", **dict(kit.CASES[case].margins, s=16.0))
    cos = torch.nn.functional.cosine_similarity(x.double(), w.double()[y * params.subcenters], dim=1)
    assert cos.min() > (0.9994 if dtype == torch.float16 else 0.95), cos.min()
    x, w, y = x.to(DEVICE), w.to(DEVICE), y.to(DEVICE)
    _, _, dw, g = _loss_and_grads("triton", x, w, y, params, None)
    _, _, want, _ = _loss_and_grads("reference", x.double(), w.double(), y, params, None, g=g)
    _, _, low = _model(x, w, y, params, None, True, g, None)
    rows = torch.unique(y) * params.subcenters  # the classes with rows (their first sub-center)
    # per class: each row of dW over the norm of the exact one, so that the max error is a per-class relative one
    scale = want[rows].norm(dim=1, keepdim=True)
    assert scale.min() > 0
    per_class = [(a[rows].double() - want[rows]).norm(dim=1) / scale[:, 0] for a in (dw, low)]
    what = (f"near-parallel dW, median per-class relative error: kernel {per_class[0].median():.2e}, model "
            f"{per_class[1].median():.2e}")  # fmt: skip
    kit.assert_error_ratio(dw[rows].double() / scale, low[rows].double() / scale, want[rows] / scale, k=K,
                           floor=U_D, min_scale=0.0, what=what)  # fmt: skip
