"""The Triton heads backend (facekernels/triton) against the reference heads in float64.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), float32, small
odd shapes; the gpu-marked tests add bfloat16 / float16 (error-ratio rule) and C = 1M on CUDA.
"""

import math
import os
import subprocess
import sys

import oracle
import pytest
import torch

import facekernels as fk
from facekernels import functional as fkf
from facekernels.reference import margin_cross_entropy as ref_loss

triton = pytest.importorskip("triton")
heads = pytest.importorskip("facekernels.triton.heads")
tri_loss = heads.margin_cross_entropy
tl = triton.language
acos_f32 = pytest.importorskip("facekernels.triton.head_math").acos_f32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, C, d): B in {1, 7, 33}, C in {1, 5, 130, 257 (odd, above the 128-class tile)}, d in {3, 64, 130}
SHAPES = [(7, 130, 64), (33, 257, 3), (1, 5, 130), (7, 1, 3), (33, 130, 130), (1, 257, 64), (7, 5, 3),
          (33, 5, 64), (7, 257, 130), (1, 1, 64), (33, 1, 130), (1, 130, 3)]  # fmt: skip


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every buffer the kernels write starts as NaN: an element they forget shows in the results
    monkeypatch.setattr(heads, "POISON_OUTPUTS", True)


def _inputs(batch, classes, features, dtype=torch.float32, ignore_frac=0.0, ignore_index=-100):
    x = torch.randn(batch, features, dtype=torch.float64)
    w = torch.randn(classes, features, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,))
    # put some targets near their class so that margins, fallbacks and hard negatives all occur
    near = torch.rand(batch) < 0.5
    x[near] = w[y][near] * 3 + 0.6 * torch.randn(int(near.sum()), features, dtype=torch.float64)
    if ignore_frac:
        drop = torch.rand(batch) < ignore_frac
        drop[0] = True
        y[drop] = ignore_index
    return x.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), y.to(DEVICE)


def _params(case, **options):
    head, kw = oracle.HEAD_CASES[case]
    return fk.head_params(head, **options, **kw)


def assert_close(got, want, rtol, name, atol=1e-12):
    """|got - want| <= rtol * (|want| + max|want|) + atol elementwise, with a report of where it fails."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs()
    bad = ~(err <= rtol * (want.abs() + scale) + atol)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} differ (max err {err.max().item():.3e}, "
                             f"scale {scale:.3e}), first at {where}")  # fmt: skip


def _run_both(case, x, w, y, t0=0.15, training=True, **options):
    """(triton loss, grads, t) and (float64 reference loss, grads, t) on the same inputs."""
    p = _params(case, **options)
    t_tri = torch.tensor(t0, device=DEVICE) if p.uses_t else None
    t_ref = torch.tensor(t0, device=DEVICE) if p.uses_t else None
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.double().requires_grad_(), w.double().requires_grad_()
    got = tri_loss(x1, w1, y, p, t_tri, training)
    want = ref_loss(x2, w2, y, p, t_ref, training)
    g = torch.randn(want.shape, dtype=torch.float64, device=DEVICE)
    (got * g.float()).sum().backward()
    (want * g).sum().backward()
    return (got, x1.grad, w1.grad, t_tri), (want, x2.grad, w2.grad, t_ref)


def _grad_atol(x, w, y, case, reduction):
    """Absolute float32 error floor of the gradients: softmax - onehot is exact to ~2^-24 per term, times
    s, the upstream gradient (<= ~3 here; 1 / #rows for mean) and 1 / ||row|| of the normalisation, summed
    over the B rows that meet in a dW row. Saturated rows (gradients ~1e-10) are judged by it."""
    s = oracle.HEAD_CASES[case][1]["s"]
    inv_norm = max(1 / x.double().norm(dim=1).min().item(), 1 / w.double().norm(dim=1).min().item()) if len(y) else 1
    return 1e-6 * s * 4 * inv_norm * max(len(y), 1)


@pytest.mark.parametrize("case", oracle.HEADS)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [None, -100, 3])
def test_matches_reference(case, margin_grad, reduction, ignore_index):
    # a covering set of shapes: each combination takes one, cycling through SHAPES
    key = (oracle.HEADS.index(case), margin_grad == "exact", ("mean", "sum", "none").index(reduction),
           (None, -100, 3).index(ignore_index))  # fmt: skip
    batch, classes, features = SHAPES[(key[0] * 7 + key[1] * 5 + key[2] * 3 + key[3]) % len(SHAPES)]
    ignore = ignore_index is not None
    x, w, y = _inputs(batch, classes, features, ignore_frac=0.3 if ignore else 0.0,
                      ignore_index=ignore_index if ignore else -100)  # fmt: skip
    options = dict(margin_grad=margin_grad, reduction=reduction, ignore_index=-100 if not ignore else ignore_index)
    (got, dx, dw, t), (want, dx_ref, dw_ref, t_ref) = _run_both(case, x, w, y, **options)
    assert got.dtype == torch.float32
    # a float32 loss is a difference of logits up to s = 64: about 64 * 2^-24 absolute per row
    assert_close(got, want, 1e-5, "loss", atol=1e-5 * (batch if reduction == "sum" else 1))
    atol = _grad_atol(x, w, y, case, reduction)
    assert_close(dx, dx_ref, 1e-4, "d(embeddings)", atol)
    assert_close(dw, dw_ref, 1e-4, "d(weight)", atol)
    if t is not None:
        assert t.item() == pytest.approx(t_ref.item(), abs=1e-6)
    if ignore:
        assert torch.all(dx[y == ignore_index] == 0)


@pytest.mark.parametrize("case", ["arcface", "combined_general", "mv_am", "curricular"])
def test_small_tiles_many_splits_and_feature_slices(case, monkeypatch):
    # tiles far smaller than the shapes: several row blocks, class splits of several tiles, feature slices
    tiny = heads.KernelConfig(block_b=16, block_c=32, block_k=16, dx_block_b=32, dx_block_c=16, dx_block_d=16,
                              dw_block_b=16, dw_block_c=16, dw_block_d=32, n_splits=3)
    monkeypatch.setattr(heads, "select_config", lambda *args: tiny)
    x, w, y = _inputs(37, 131, 67, ignore_frac=0.2)
    (got, dx, dw, t), (want, dx_ref, dw_ref, t_ref) = _run_both(case, x, w, y, reduction="none")
    assert_close(got, want, 1e-5, "loss")
    assert_close(dx, dx_ref, 1e-4, "d(embeddings)")
    assert_close(dw, dw_ref, 1e-4, "d(weight)")


def test_curricular_t_over_training_steps_and_eval():
    p = _params("curricular", reduction="mean")
    t_tri = torch.zeros((), device=DEVICE)
    t_ref = torch.zeros((), device=DEVICE)
    w = _inputs(1, 130, 64)[1]
    for step in range(4):
        x, _, y = _inputs(33, 130, 64, ignore_frac=0.2)
        y = torch.where(y == -100, y, torch.randint(0, 130, y.shape, device=DEVICE))
        got = tri_loss(x, w, y, p, t_tri, True)
        want = ref_loss(x.double(), w.double(), y, p, t_ref, True)
        assert t_tri.item() == pytest.approx(t_ref.item(), abs=1e-6), step
        assert t_tri.item() != 0.0
        assert_close(got, want, 1e-5, f"loss at step {step}")
    # eval: t is read, not updated
    before = t_tri.clone()
    got = tri_loss(x, w, y, p, t_tri, False)
    want = ref_loss(x.double(), w.double(), y, p, t_ref.clone(), False)
    assert torch.equal(t_tri, before)
    assert_close(got, want, 1e-5, "eval loss")
    # a batch without a valid row leaves t unchanged, gives 0 and zero gradients
    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    loss = tri_loss(xg, wg, torch.full_like(y, -100), p, t_tri, True)
    loss.backward()
    assert torch.equal(t_tri, before) and loss.item() == 0.0
    assert torch.all(xg.grad == 0) and torch.all(wg.grad == 0)


def test_empty_batch():
    w = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 4, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = tri_loss(x, w, y, _params("arcface"), None, True)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(w.grad == 0)
    assert tri_loss(x, w, y, _params("arcface", reduction="none"), None, True).shape == (0,)


def test_weight_without_grad_gets_no_dw(monkeypatch):
    def dw_must_not_run(*args, **kwargs):
        raise AssertionError("the dW kernel ran for a weight that does not require grad")

    x, w, y = _inputs(7, 130, 64)
    x1 = x.clone().requires_grad_()
    x2 = x.double().requires_grad_()
    p = _params("cosface")
    monkeypatch.setattr(heads, "_dw_kernel", type("Guard", (), {"__getitem__": dw_must_not_run})())
    tri_loss(x1, w, y, p, None, True).backward()
    ref_loss(x2, w.double(), y, p, None, True).backward()
    assert w.grad is None
    assert_close(x1.grad, x2.grad, 1e-4, "d(embeddings)")


def test_exact_margin_grad_at_the_poles_is_finite():
    w = torch.randn(4, 6, device=DEVICE)
    x = w[:2].clone().requires_grad_()
    loss = tri_loss(x, w, torch.tensor([0, 1], device=DEVICE), _params("combined_general"), None, True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU profiler sees the allocations of the interpreter path")
def test_never_allocates_a_batch_by_classes_buffer():
    # B * C bytes exceeds every legitimate buffer here (C * d * 4 = 12000 < B * C = 33000), so any tensor
    # of B * C elements, even of bools, is caught among the allocations of forward + backward
    from torch.profiler import ProfilerActivity, profile

    batch, classes, features = 33, 1000, 3

    def largest_allocation(fn):
        x, w, y = _inputs(batch, classes, features)
        x.requires_grad_()
        w.requires_grad_()
        t = torch.zeros(())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(x, w, y, _params("curricular"), t, True).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    assert largest_allocation(tri_loss) < batch * classes
    # the check can fail: the reference materialises (B, C) and is caught
    assert largest_allocation(ref_loss) >= batch * classes * 4


@triton.jit
def _acos_kernel(c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, acos_f32(tl.load(c_ptr + offs, mask=offs < n)), mask=offs < n)


def test_acos_polynomial():
    c = torch.cat([torch.linspace(-1, 1, 4001), torch.tensor([-1 + 1e-7, 1 - 1e-7, 0.0])]).float().to(DEVICE)
    out = torch.full_like(c, float("nan"))
    _acos_kernel[(triton.cdiv(c.numel(), 1024),)](c, out, c.numel(), BLOCK=1024)
    want = torch.acos(c.double())
    assert (out.double() - want).abs().max().item() < 5e-7


def test_modules_and_functional_use_the_backend():
    x, w, y = _inputs(7, 130, 64)
    head = fk.CombinedMargin(64, 130, m1=0.9, m2=0.4, m3=0.15, backend="triton").to(DEVICE)
    with torch.no_grad():
        head.weight.copy_(w)
    want = fkf.margin_cross_entropy(x, w, y, "combined", m1=0.9, m2=0.4, m3=0.15, backend="reference")
    assert_close(head(x, y), want, 1e-5, "module loss")
    cf = fk.CurricularFace(64, 130, momentum=0.1, backend="triton").to(DEVICE)
    cf(x, y).backward()
    assert cf.t.item() != 0.0 and cf.weight.grad is not None


def test_bad_inputs_raise():
    x, w, y = _inputs(3, 5, 4)
    with pytest.raises(TypeError, match="float64 is the reference's"):
        tri_loss(x.double(), w.double(), y, _params("arcface"), None, True)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        fkf.margin_cross_entropy(x, w.double(), y, "arcface", backend="triton")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(heads, "_INTERPRETED", False)
    x, w, y = _inputs(3, 5, 4)
    with pytest.raises(fk.BackendUnavailableError, match="needs CUDA tensors"):
        tri_loss(x.cpu(), w.cpu(), y.cpu(), _params("arcface"), None, True)


def test_missing_triton_raises_backend_unavailable():
    code = (
        "import sys, torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import facekernels as fk\n"
        "try:\n"
        "    fk.ArcFace(4, 3, backend='triton')(torch.randn(2, 4), torch.tensor([0, 2]))\n"
        "except fk.BackendUnavailableError as e:\n"
        "    assert 'install triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected BackendUnavailableError')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _op_args(case="curricular", batch=7, classes=130, features=64):
    x, w, y = _inputs(batch, classes, features, ignore_frac=0.3)
    p = _params(case)
    target = torch.where(y == p.ignore_index, -1, y)
    inv_x, inv_w, c, phi, dphi, tau = heads._prepass(
        x, w, target, p.m1, p.m2, p.m3, heads._target_form(p), int(p.fallback), p.fallback_threshold,
        p.fallback_offset, False,
    )  # fmt: skip
    t = torch.tensor(0.2, device=DEVICE)
    return (x.requires_grad_(), w.requires_grad_(), target, inv_x, inv_w, phi, dphi, tau, t, p.s,
            int(p.negatives), p.mv_t)  # fmt: skip


def test_opcheck():
    # fake (meta) kernels, schema, autograd registration and torch.compile-ability of the three ops
    args = _op_args()
    ops = torch.ops.facekernels
    torch.library.opcheck(ops.triton_margin_ce.default, args)
    x, w, target = args[0].detach(), args[1].detach(), args[2]
    torch.library.opcheck(ops.triton_head_prepass.default, (x, w, target, 0.9, 0.4, 0.15, 2, 0, 0.0, 0.0, False))
    grad = torch.randn(x.shape[0], device=DEVICE)
    lse = heads._margin_ce(*args)[1].detach()
    bwd_args = (grad, x, w, *args[2:9], lse, *args[9:], True)
    torch.library.opcheck(ops.triton_margin_ce_backward.default, bwd_args)


def test_torch_compile_fullgraph_traces_the_module():
    # default settings: dispatch uses import statements and the label range check is skipped when compiling
    # aot_eager: Dynamo + AOTAutograd trace forward and backward with fullgraph=True, no C++ codegen
    head = fk.CurricularFace(64, 130, momentum=0.1, backend="triton").to(DEVICE)
    eager = fk.CurricularFace(64, 130, momentum=0.1, backend="triton").to(DEVICE)
    eager.load_state_dict(head.state_dict())
    x, _, y = _inputs(7, 130, 64)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    got = compiled(x, y)
    got.backward()
    want = eager(x, y)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.t, eager.t)


def _compile_for_sm90(kernel, constexprs, dtype="bf16"):
    """Compile ``kernel`` for an H100 (sm_90) with the real Triton compiler, no GPU needed (AOT)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = {"s", "mv_t", "eps", "m1", "cos_m2", "sin_m2", "m2", "m3", "threshold", "offset", "sin_theta_eps"}
    signature, consts = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name], consts[(i,)] = "constexpr", constexprs[name]
        elif name in ("X", "W", "dw_ptr"):
            signature[name] = "*" + dtype
        elif name == "target_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    src = ASTSource(kernel, signature, consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})


def compile_big_kernels_for_h100():
    """Build the big kernels for sm_90 (bf16, CurricularFace negatives, the general acos target)."""
    from facekernels.triton import margin_ce_bwd, margin_ce_fwd

    cfg = dict(NEGATIVES=2, BLOCK_K=64, DOT_PRECISION="ieee")
    kernels = [
        (margin_ce_fwd._lse_partial_kernel, dict(cfg, BLOCK_B=64, BLOCK_C=128)),
        (margin_ce_bwd._dx_partial_kernel, dict(cfg, BLOCK_B=32, BLOCK_C=32, BLOCK_D=512)),
        (margin_ce_bwd._dw_kernel, dict(cfg, BLOCK_B=32, BLOCK_C=32, BLOCK_D=512)),
        (margin_ce_fwd._target_kernel, dict(TARGET_FORM=2, FALLBACK=0, STRAIGHT_THROUGH=False, BLOCK_R=32,
                                            BLOCK_K=128)),  # fmt: skip
    ]
    for kernel, constexprs in kernels:
        assert _compile_for_sm90(kernel, constexprs).asm["cubin"], kernel.__name__


@pytest.mark.skipif(DEVICE != "cpu", reason="the CUDA runs compile these kernels anyway")
def test_kernels_compile_for_h100():
    # the interpreter skips the compiler: what only the real compiler rejects shows here without a GPU.
    # A fresh process without TRITON_INTERPRET, where @triton.jit gives compilable JITFunctions.
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton has no CUDA backend to compile with: {err}")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(here)
    code = "import test_triton_heads as t; t.compile_big_kernels_for_h100()"
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------------------------ GPU only


def _error_ratio_case(case, dtype, batch, classes, features, chunk=None):
    """(kernel error, eager error in dtype) against float64, for loss, dx and dw (max abs errors)."""
    x, w, y = _inputs(batch, classes, features, dtype=torch.float32, ignore_frac=0.1)
    x, w = x.to(dtype), w.to(dtype)
    p = _params(case, reduction="sum")

    def run(fn, xx, ww):
        t = torch.zeros((), device=DEVICE) if p.uses_t else None
        xx, ww = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        rows = range(0, batch, chunk or batch)
        total = 0.0
        for r in rows:  # row chunks keep the eager (B, C) matrices small; sum-reduction adds up exactly
            sl = slice(r, r + (chunk or batch))
            loss = fn(xx[sl], ww, y[sl], p, t, True)
            loss.backward()
            total += loss.double().item()
        return total, xx.grad.double(), ww.grad.double()

    exact = run(ref_loss, x.double(), w.double())
    kernel = run(tri_loss, x, w)
    eager = run(ref_loss, x, w)

    def err(a):
        return (abs(a[0] - exact[0]), (a[1] - exact[1]).abs().max().item(), (a[2] - exact[2]).abs().max().item())

    return err(kernel), err(eager), exact


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["arcface", "combined_general", "mv_arc", "cosface"])
def test_low_precision_error_ratio(dtype, case):
    kernel, eager, _ = _error_ratio_case(case, dtype, 257, 3001, 130)
    for name, k, e in zip(("loss", "dx", "dw"), kernel, eager):
        assert math.isfinite(k) and k <= 4 * e + 1e-6, f"{name}: kernel error {k:.3e} vs eager {dtype} {e:.3e}"


@pytest.mark.gpu
def test_million_classes_memory():
    # B = 1024, C = 1M: the extra peak memory of forward + backward stays below B * C bytes (a (B, C)
    # tensor of even 1-byte elements would exceed it); the legitimate buffers are dW (C * d bf16 = 256 MB),
    # the dX partials (n_splits * B * d float32 <= 32 MB) and O(B + C) statistics
    batch, classes, features = 1024, 1_000_003, 128
    x = torch.randn(batch, features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(classes, features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, classes, (batch,), device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = tri_loss(x, w, y, _params("curricular"), torch.zeros((), device=DEVICE), True)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < batch * classes
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_million_classes_error_ratio():
    # B = 1024, C = 1M, d = 128, bfloat16; the float64 / bfloat16 eager runs go 64 rows at a time
    kernel, eager, exact = _error_ratio_case("arcface", torch.bfloat16, 1024, 1_000_003, 128, chunk=64)
    assert math.isfinite(exact[0])
    for name, k, e in zip(("loss", "dx", "dw"), kernel, eager):
        assert math.isfinite(k) and k <= 4 * e + 1e-6, f"{name}: kernel error {k:.3e} vs eager bf16 {e:.3e}"
