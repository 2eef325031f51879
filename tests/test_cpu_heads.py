"""The compiled CPU heads (facekernels/ops/cpu_heads.py, csrc/cpu/margin_ce.cpp) against the float64
reference: every head case x margin_grad x reduction x ignore_index, several tiles and t steps, low precision
by the error-ratio rule, the no-(B, C)-buffer contract, requires_grad combinations, errors and opcheck."""

import os
import subprocess
import sys

import oracle
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import facekernels as fk
from facekernels import _extension
from facekernels import functional as fkf
from facekernels.ops import cpu_heads
from facekernels.reference import margin_cross_entropy as ref_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not _extension.is_available(), reason="needs the compiled extension facekernels._C")


@pytest.fixture
def small_tile(monkeypatch):
    """Tiles of 8 classes, so that small shapes span many tiles with a ragged last one."""
    monkeypatch.setattr(cpu_heads, "CLASS_TILE", 8)


def _inputs(batch, classes, features, dtype=torch.float64, ignore_frac=0.0):
    x = torch.randn(batch, features, dtype=torch.float64)
    w = torch.randn(classes, features, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,))
    if ignore_frac:
        y[torch.rand(batch) < ignore_frac] = -100
    # targets near their class so that margins, fallbacks and hard negatives all occur
    near = torch.rand(batch) < 0.5
    x[near] = w[y.clamp_min(0)][near] * 3 + 0.6 * torch.randn(int(near.sum()), features, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), y


def _params(case, **options):
    head, kw = oracle.HEAD_CASES[case]
    return fk.head_params(head, **options, **kw)


def _t0(case):
    return torch.tensor(0.15, dtype=torch.float32) if case == "curricular" else None


def _loss_and_grads(fn, x, w, y, params, t, training=True, g=None):
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(xa, wa, y, params, t, training)
    if g is None:
        g = torch.randn(loss.shape, dtype=torch.float64)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss, xa.grad, wa.grad, g


def _close(got, want, rtol, atol, what):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", oracle.HEADS)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [False, True])
def test_cpu_matches_reference_float64(case, margin_grad, reduction, ignore, small_tile):
    x, w, y = _inputs(13, 37, 19, ignore_frac=0.3 if ignore else 0.0)
    if ignore:
        y[0] = -100
    params = _params(case, margin_grad=margin_grad, reduction=reduction)
    t_cpu, t_ref = _t0(case), _t0(case)
    got, dx, dw, g = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y, params, t_cpu)
    want, dx_ref, dw_ref, _ = _loss_and_grads(ref_loss, x, w, y, params, t_ref, g=g)
    assert got.dtype == torch.float64 and got.shape == want.shape
    _close(got, want, 1e-10, 1e-10, "loss")
    _close(dx, dx_ref, 1e-9, 1e-10, "d embeddings")
    _close(dw, dw_ref, 1e-9, 1e-10, "d weight")
    if t_cpu is not None:
        assert t_cpu.item() != 0.15 and t_cpu.item() == t_ref.item()
    if ignore:
        assert torch.all(dx[y == -100] == 0)
        if reduction == "none":
            assert torch.all(got[y == -100] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_curricular_t_over_several_steps_and_eval(dtype, small_tile):
    params = _params("curricular")
    t_cpu, t_ref = torch.zeros(()), torch.zeros(())
    for step in range(4):
        x, w, y = _inputs(11, 29, 9, dtype=dtype, ignore_frac=0.2)
        got, dx, dw, g = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y, params, t_cpu)
        want, dx_ref, dw_ref, _ = _loss_and_grads(ref_loss, x.double(), w.double(), y, params, t_ref, g=g)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        _close(got, want, tol, tol, f"loss at step {step}")
        _close(dx, dx_ref, tol, tol, f"d embeddings at step {step}")
        _close(dw, dw_ref, tol, tol, f"d weight at step {step}")
        assert t_cpu.item() == pytest.approx(t_ref.item(), abs=1e-7 if dtype == torch.float64 else 1e-6)
    assert t_cpu.item() > 0.0
    # eval mode reads t and leaves it; a batch without a valid row leaves it in training too
    before = t_cpu.clone()
    x, w, y = _inputs(6, 29, 9)
    got, *_ = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y, params, t_cpu, training=False)
    want, *_ = _loss_and_grads(ref_loss, x, w, y, params, before.clone(), training=False)
    assert torch.equal(t_cpu, before)
    _close(got, want, 1e-10, 1e-10, "eval loss")
    y_none = torch.full_like(y, -100)
    loss, dx, dw, _ = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y_none, params, t_cpu)
    assert torch.equal(t_cpu, before) and loss.item() == 0 and torch.all(dx == 0) and torch.all(dw == 0)


@pytest.mark.parametrize("case", ["arcface", "combined_general", "mv_arc", "curricular"])
@pytest.mark.parametrize("shape", [(7, 2500, 33), (1, 1, 5), (0, 13, 4), (5, 1025, 3), (9000, 700, 3)])
def test_float32_odd_shapes_default_tile(case, shape):
    # error-ratio rule against float64: the float32 op's error <= 4 x the eager float32 head's (+ 1e-6 relative
    # to the largest value); a large B sums many float32 terms into dW, so a fixed tolerance would not fit
    batch, classes, features = shape
    x, w, y = _inputs(batch, classes, features, dtype=torch.float32)
    params = _params(case)
    t = [_t0(case) for _ in range(3)]
    got, dx, dw, g = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y, params, t[0])
    low, dx_low, dw_low, _ = _loss_and_grads(ref_loss, x, w, y, params, t[1], g=g)
    want, dx_ref, dw_ref, _ = _loss_and_grads(ref_loss, x.double(), w.double(), y, params, t[2], g=g)
    assert got.dtype == torch.float32 and dx.dtype == torch.float32 and dw.dtype == torch.float32
    for name, a, b, c in [("loss", got, low, want), ("dx", dx, dx_low, dx_ref), ("dw", dw, dw_low, dw_ref)]:
        err, err_eager = _max_err(a, c), _max_err(b, c)
        scale = c.abs().max().item() if c.numel() else 0.0
        assert err <= 4 * err_eager + 1e-6 * max(scale, 1.0), f"{name}: error {err}, eager float32 {err_eager}"
    if t[0] is not None:
        assert t[0].item() == pytest.approx(t[2].item(), abs=1e-6)


@pytest.mark.parametrize("case", ["arcface", "curricular"])
def test_nan_embedding_row_stays_nan(case, small_tile):
    # a NaN cosine must not be clamped into +-1 (it would hide the NaN): its row's loss is NaN like the
    # reference's, the other rows are unaffected
    x, w, y = _inputs(5, 19, 6)
    x[2, 1] = float("nan")
    params = _params(case, reduction="none")
    got = cpu_heads.margin_cross_entropy(x, w, y, params, _t0(case), False)
    want = ref_loss(x, w, y, params, _t0(case), False)
    assert torch.isnan(got[2]) and torch.isnan(want[2])
    keep = torch.arange(5) != 2
    _close(got[keep], want[keep], 1e-10, 1e-10, "finite rows")


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)])
def test_mixed_dtypes_promote_like_the_reference(dtypes, small_tile):
    x, w, y = _inputs(7, 23, 6)
    x, w = x.to(dtypes[0]), w.to(dtypes[1])
    params = _params("mv_arc")
    got, dx, dw, g = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y, params, None)
    want, dx_ref, dw_ref, _ = _loss_and_grads(ref_loss, x, w, y, params, None, g=g)
    assert (got.dtype, dx.dtype, dw.dtype) == (want.dtype, dx_ref.dtype, dw_ref.dtype) == (
        torch.promote_types(*dtypes) if torch.float64 in dtypes else torch.float32, *dtypes)
    tol = 1e-5 if torch.float64 in dtypes else 2e-2
    _close(got, want, tol, tol, "loss")
    _close(dx, dx_ref, tol, tol, "d embeddings")
    _close(dw, dw_ref, tol, tol, "d weight")


def test_public_api_bad_inputs_same_errors_as_reference():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    for labels, error, words in [(torch.tensor([0, 1, 2, 9]), ValueError, "labels must lie in"),
                                 (torch.tensor([0.0, 1, 2, 3]), TypeError, "labels"),
                                 (torch.tensor([0, 1, 2]), ValueError, "labels")]:  # fmt: skip
        for backend in ("cpu", "reference"):
            with pytest.raises(error, match=words):
                fkf.margin_cross_entropy(x, w, labels, "arcface", backend=backend)
    with pytest.raises(ValueError, match="t must be a 0-dim float32"):
        fkf.margin_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), "curricular", t=torch.zeros(1), backend="cpu")


def test_missing_extension_gives_the_build_hint():
    code = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'facekernels._C':\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import facekernels as fk\n"
        "try:\n"
        "    fk.ArcFace(4, 3, backend='cpu')(torch.randn(2, 4), torch.tensor([0, 2]))\n"
        "except fk.ExtensionUnavailableError as e:\n"
        "    assert 'pip install --no-build-isolation -e .' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected ExtensionUnavailableError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("case", ["cosface", "curricular"])
def test_ignore_index_inside_the_class_range_and_strided_inputs(case, small_tile):
    # ignore_index may be a real class id (rows with that label are ignored); inputs may be views
    x, w, y = _inputs(17, 12, 7)
    y[:4] = 3
    params = _params(case, ignore_index=3, reduction="sum")
    x_view, w_view = x.t().contiguous().t(), w[::2].repeat_interleave(2, 0)  # non-contiguous, then a copy
    assert not x_view.is_contiguous()
    t_cpu, t_ref = _t0(case), _t0(case)
    got, dx, dw, g = _loss_and_grads(cpu_heads.margin_cross_entropy, x_view, w_view, y, params, t_cpu)
    want, dx_ref, dw_ref, _ = _loss_and_grads(ref_loss, x, w_view.contiguous(), y, params, t_ref, g=g)
    _close(got, want, 1e-10, 1e-10, "loss")
    _close(dx, dx_ref, 1e-9, 1e-10, "d embeddings")
    _close(dw, dw_ref, 1e-9, 1e-10, "d weight")
    assert torch.all(dx[y == 3] == 0)
    if t_cpu is not None:
        assert t_cpu.item() == t_ref.item()


def _max_err(got, want):
    return (got.double() - want.double()).abs().max().item() if got.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["arcface", "cosface", "mv_am", "curricular"])
def test_low_precision_error_ratio(dtype, case, small_tile):
    # error-ratio rule: error of the cpu op in `dtype` <= 2 x the error of the eager reference computing in
    # `dtype`, both against the float64 reference on the same rounded inputs (plus a tiny floor)
    x, w, y = _inputs(21, 45, 24, dtype=dtype, ignore_frac=0.2)
    params = _params(case, reduction="none")
    t = [_t0(case) for _ in range(3)]
    got, dx, dw, g = _loss_and_grads(cpu_heads.margin_cross_entropy, x, w, y, params, t[0])
    low, dx_low, dw_low, _ = _loss_and_grads(ref_loss, x, w, y, params, t[1], g=g)
    want, dx_ref, dw_ref, _ = _loss_and_grads(ref_loss, x.double(), w.double(), y, params, t[2], g=g)
    assert got.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == dtype
    for name, a, b, c in [("loss", got, low, want), ("dx", dx, dx_low, dx_ref), ("dw", dw, dw_low, dw_ref)]:
        err, err_eager = _max_err(a, c), _max_err(b, c)
        assert err <= 2 * err_eager + 1e-6, f"{name}: cpu error {err} vs eager {dtype} error {err_eager}"


def test_public_api_auto_and_cpu_backends_use_the_compiled_op(small_tile):
    x, w, y = _inputs(9, 20, 16, dtype=torch.float32)
    want = fkf.margin_cross_entropy(x, w, y, "arcface", backend="reference")
    for backend in ("auto", "cpu"):
        got = fkf.margin_cross_entropy(x, w, y, "arcface", backend=backend)
        _close(got, want, 1e-5, 1e-6, backend)
    head = fk.CurricularFace(16, 20, backend="cpu")
    head_ref = fk.CurricularFace(16, 20, backend="reference")
    head_ref.load_state_dict(head.state_dict())
    _close(head(x, y), head_ref(x, y), 1e-5, 1e-6, "CurricularFace module")
    assert head.t.item() == pytest.approx(head_ref.t.item(), abs=1e-7) and head.t.item() != 0
    # the autograd graph of the cpu backend holds the compiled op, not the reference's matmul
    loss = fkf.margin_cross_entropy(x.requires_grad_(), w, y, "arcface", backend="auto")
    names = _graph_names(loss)
    assert any("facekernels_margin_ce" in n for n in names), names
    assert not any("Mm" in n or "Logsumexp" in n for n in names), names
    assert any("Mm" in n for n in _graph_names(fkf.margin_cross_entropy(x, w, y, "arcface", backend="reference")))


def _graph_names(loss):
    names, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.add(fn.name())
            todo += [f for f, _ in fn.next_functions]
    return names


@pytest.mark.parametrize("need_dx, need_dw", [(True, True), (True, False), (False, True), (False, False)])
def test_requires_grad_combinations(need_dx, need_dw):
    x, w, y = _inputs(6, 11, 5, dtype=torch.float32)
    params = _params("arcface")
    xa, wa = x.clone().requires_grad_(need_dx), w.clone().requires_grad_(need_dw)
    xb, wb = x.double().requires_grad_(need_dx), w.double().requires_grad_(need_dw)
    got = cpu_heads.margin_cross_entropy(xa, wa, y, params)
    want = ref_loss(xb, wb, y, params)
    _close(got, want, 1e-5, 1e-6, "loss")
    assert got.requires_grad == (need_dx or need_dw)
    if got.requires_grad:
        got.backward()
        want.backward()
    assert (xa.grad is None) == (not need_dx) and (wa.grad is None) == (not need_dw)
    if need_dx:
        _close(xa.grad, xb.grad, 1e-4, 1e-6, "d embeddings")
    if need_dw:
        _close(wa.grad, wb.grad, 1e-4, 1e-6, "d weight")


def test_frozen_weight_skips_the_weight_gradient():
    x, w, y = _inputs(6, 11, 5, dtype=torch.float32)
    args = (x, w, y, None, 64.0, 1.0, 0.5, 0.0, 1, 0, 0.0, -100)
    _, lse = torch.ops.facekernels.margin_ce(*args, True, 0)
    grad = torch.ones(6)
    dx, dw = torch.ops.facekernels.margin_ce_backward(grad, *args[:4], lse, *args[4:], True, True, False, 0)
    assert dx.shape == x.shape and dw.numel() == 0
    dx, dw = torch.ops.facekernels.margin_ce_backward(grad, *args[:4], lse, *args[4:], True, False, True, 0)
    assert dx.numel() == 0 and dw.shape == w.shape


class _RecordSizes(TorchDispatchMode):
    """Records the shape of every tensor an op returns (the Python-visible side of the graph)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append((str(func), tuple(o.shape)))
        return out


def test_no_batch_by_classes_tensor_from_python(small_tile):
    x, w, y = _inputs(13, 97, 7, dtype=torch.float32)
    for case in ("curricular", "mv_am", "arcface"):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with _RecordSizes() as rec:
            cpu_heads.margin_cross_entropy(xa, wa, y, _params(case), _t0(case)).backward()
        big = [(f, s) for f, s in rec.shapes if len(s) == 2 and 13 in s and 97 in s]
        assert not big, big
        assert any("margin_ce" in f for f, _ in rec.shapes)
        # and the same recorder does see the reference's logits
        with _RecordSizes() as rec:
            ref_loss(xa, wa, y, _params(case), _t0(case)).backward()
        assert any(s == (13, 97) for _, s in rec.shapes)


_RSS_SCRIPT = r"""
import sys, torch
from facekernels.ops import cpu_heads
import facekernels as fk

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

torch.manual_seed(0)
backend = sys.argv[1]
batch, classes, features = 512, 100_000, 8
x = torch.randn(batch, features, requires_grad=True)
w = torch.randn(classes, features, requires_grad=True)
y = torch.randint(0, classes, (batch,))
t = torch.zeros(())
params = fk.head_params("curricular")
fn = cpu_heads.margin_cross_entropy if backend == "cpu" else fk.reference.margin_cross_entropy
fn(x[:2], w[:50], y[:2] % 50, params, t).backward()  # load the extension, warm the allocator
x.grad = w.grad = None
# VmHWM, not ru_maxrss: a child inherits its parent's ru_maxrss; clear_refs 5 resets VmHWM to VmRSS
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
fn(x, w, y, params, t).backward()
print((status_kib("VmHWM") - before) / 1024)
"""


def _peak_rss_delta_mib(backend):
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, backend], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def test_no_batch_by_classes_buffer_peak_rss():
    # (B, C) float32 here is 512 * 100000 * 4 B = 195 MiB, while everything the fused op may allocate (blocks
    # of (B, 1024) per thread, w tiles, x_hat, dW: 3 MiB) stays far below 49 MiB: any materialised
    # logits, cosines or softmax, in C++ or Python, shows in the process's RSS high-water mark.
    logits_mib = 512 * 100_000 * 4 / 2**20
    cpu = _peak_rss_delta_mib("cpu")
    assert cpu < logits_mib / 4, f"cpu backend peak RSS grew by {cpu:.0f} MiB (logits: {logits_mib:.0f} MiB)"
    eager = _peak_rss_delta_mib("reference")  # the check can fail: the eager head does trip it
    assert eager > logits_mib, eager


def _raw_args(**change):
    x, w, y = _inputs(6, 11, 5, dtype=torch.float32)
    args = dict(embeddings=x, weight=w, labels=y, t=None, s=64.0, m1=1.0, m2=0.5, m3=0.0, fallback=1, negatives=0,
                mv_t=0.0, ignore_index=-100, exact_margin_grad=True)  # fmt: skip
    args.update(change)
    return args


BAD_RAW = [
    (dict(weight=torch.randn(11, 5, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(weight=torch.randn(11, 4)), ValueError, "same number of features"),
    (dict(labels=torch.zeros(6, dtype=torch.int32)), TypeError, "int64"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
    (dict(labels=torch.full((6,), 11)), ValueError, "labels must lie in"),
    (dict(labels=torch.full((6,), -1)), ValueError, "labels must lie in"),
    (dict(embeddings=torch.randn(6)), ValueError, "2-D"),
    (dict(embeddings=torch.zeros(6, 5, dtype=torch.long), weight=torch.zeros(11, 5, dtype=torch.long)), TypeError,
     "floating-point"),
    (dict(negatives=2), ValueError, "t is required"),
    (dict(negatives=2, t=torch.zeros((), dtype=torch.float64)), TypeError, "t must be float32"),
    (dict(negatives=2, t=torch.zeros(1)), ValueError, "0-dim"),
    (dict(fallback=7), ValueError, "fallback"),
    (dict(negatives=-1), ValueError, "negatives"),
    (dict(s=0.0), ValueError, "s must"),
    (dict(weight=torch.randn(0, 5)), ValueError, "at least one class"),
    (dict(target_cos=torch.zeros(6, dtype=torch.float64)), TypeError, "target_cos must be Float"),
    (dict(target_cos=torch.zeros(5)), ValueError, "target_cos must be a CPU tensor of shape"),
]


@pytest.mark.parametrize("change, error, words", BAD_RAW)
def test_raw_ops_reject_bad_arguments(change, error, words):
    cpu_heads.ops()
    args = _raw_args(**change)
    with pytest.raises(error, match=words):
        torch.ops.facekernels.margin_ce(**args)
    lse = torch.zeros(args["embeddings"].shape[0] if args["embeddings"].dim() else 0)
    with pytest.raises(error, match=words):
        torch.ops.facekernels.margin_ce_backward(torch.ones_like(lse), lse=lse, need_embeddings_grad=True,
                                                 need_weight_grad=True, **args)  # fmt: skip


def test_raw_update_t_rejects_bad_arguments():
    x, w, y = _inputs(6, 11, 5, dtype=torch.float32)
    with pytest.raises(TypeError, match="t must be float32"):
        torch.ops.facekernels.curricular_update_t_(torch.zeros((), dtype=torch.float64), x, w, y, -100, 0.1)
    with pytest.raises(ValueError, match="momentum"):
        torch.ops.facekernels.curricular_update_t_(torch.zeros(()), x, w, y, -100, 1.5)
    with pytest.raises(ValueError, match="labels must lie in"):
        torch.ops.facekernels.curricular_update_t_(torch.zeros(()), x, w, y + 11, -100, 0.1)


@pytest.mark.parametrize("case", ["arcface", "mv_am", "curricular"])
def test_opcheck(case):
    fko = cpu_heads.ops()
    x, w, y = _inputs(9, 21, 6, dtype=torch.float32, ignore_frac=0.2)
    p = _params(case)
    t = _t0(case)
    head = (p.s, p.m1, p.m2, p.m3, int(p.fallback), int(p.negatives), p.mv_t, p.ignore_index)
    fwd_args = (x.requires_grad_(), w.requires_grad_(), y, t, *head, True, 8)
    torch.library.opcheck(fko.margin_ce.default, fwd_args)
    _, lse = fko.margin_ce(*fwd_args)
    bwd_args = (torch.randn(9), x.detach(), w.detach(), y, t, lse.detach(), *head, True, True, True, 8)
    torch.library.opcheck(fko.margin_ce_backward.default, bwd_args)
    torch.library.opcheck(fko.curricular_update_t_.default, (torch.zeros(()), x.detach(), w.detach(), y, -100, 0.1))
    # the class-sharded mode (facekernels/sharded.py): global target cosines given, labels >= 21 (not ignored)
    # mark rows whose target lives on another shard
    y_sharded = torch.where(torch.rand(9) < 0.4, 21 + torch.randint(0, 5, (9,)), y)
    target_cos = torch.rand(9) * 2 - 1
    fwd_args = (x, w, y_sharded, t, *head, True, 8, target_cos)
    torch.library.opcheck(fko.margin_ce.default, fwd_args)
    _, lse = fko.margin_ce(*fwd_args)
    bwd_args = (torch.randn(9), x.detach(), w.detach(), y_sharded, t, lse.detach(), *head, True, True, True, 8,
                target_cos)  # fmt: skip
    torch.library.opcheck(fko.margin_ce_backward.default, bwd_args)


def test_torch_compile_fullgraph_traces_the_ops(small_tile):
    x, w, y = _inputs(7, 19, 6, dtype=torch.float32)
    params = _params("curricular")
    t_compiled, t_eager = torch.zeros(()), torch.zeros(())

    def step(a, b, t):
        return cpu_heads.margin_cross_entropy(a, b, y, params, t, True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    got, want = compiled(xa, wa, t_compiled), step(xb, wb, t_eager)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)
    assert torch.equal(t_compiled, t_eager) and t_compiled.item() != 0


_HEAD_MATH_CU = r"""
#include "facekernels/head_math.h"
__global__ void head_math_kernel(const float* c, float* out, facekernels::HeadMath p, float t) {
  const int i = threadIdx.x;
  const auto target = facekernels::target_logit(c[i], p);
  const auto negative = facekernels::negative_logit(c[i], target.tau, t, p);
  out[i] = target.phi + target.dphi + negative.value + negative.derivative + facekernels::clamp_unit(c[i]) +
           facekernels::inside_unit(c[i]);
}
double host_side() {
  const auto p = facekernels::make_head_math(64.0, 1.0, 0.5, 0.0, 1, 2, 0.0, true);
  return facekernels::curricular_t_update(0.1, 1.0, 2, 0.01) + p.fallback_threshold;
}
"""


def test_head_math_header_compiles_with_plain_nvcc(tmp_path):
    # the header is for CUDA kernels too: no torch include, every function __host__ __device__
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the plain-nvcc compile check needs the CUDA toolkit")
    src = tmp_path / "head_math_check.cu"
    src.write_text(_HEAD_MATH_CU)
    cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc", "include"), str(src),
           "-o", str(tmp_path / "head_math_check.o")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(ROOT, "csrc", "include", "facekernels", "head_math.h")) as f:
        text = f.read()
    assert "torch/" not in text and "ATen/" not in text
