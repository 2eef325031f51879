"""What only the Triton kernels have (facekernels/kernels/triton): their ops' opcheck, the errors when triton or
a GPU is missing, the skipped weight-gradient GEMM. Their results against the reference: tests/test_heads.py
(under Triton's interpreter here, float32; C = 1M is gpu-marked there) and tests/test_heads_lowp.py (bfloat16 /
float16); their sm_90 code: tests/test_gpu_static.py."""

import math
import os
import subprocess
import sys

import kit
import pytest
import torch

import facekernels as fk
from facekernels import functional as fkf
from facekernels._backends import head_loss

triton = pytest.importorskip("triton")
tk = pytest.importorskip("facekernels.kernels.triton")

DEVICE = kit.TRITON_DEVICE


def _op_args(batch=7, classes=130, features=64, negatives=2):
    x, w, y = (a.to(DEVICE) for a in kit.head_inputs(batch, classes, features, dtype=torch.float32))
    target = torch.where(torch.rand(batch, device=DEVICE) < 0.3, -1, y)
    rows = [torch.rand(batch, device=DEVICE) - 0.5 for _ in range(3)]  # phi, dphi, tau
    return x, w, tk.inv_norms(x), tk.inv_norms(w), target, rows, torch.tensor(0.2, device=DEVICE), negatives


@pytest.mark.parametrize("negatives, cos_bound, filter_threshold, subcenters",
                         [(0, 1.0, math.inf, 1), (1, 1.0, math.inf, 1), (2, 1.0, math.inf, 1), (0, 0.999, 0.3, 2)])
def test_opcheck(negatives, cos_bound, filter_threshold, subcenters, monkeypatch):
    # schemas and fake kernels of the ops (torch.compile traces them by their fakes)
    monkeypatch.setattr(tk, "CHUNK_BYTES", 1)
    x, w, inv_x, inv_w, target, (phi, dphi, tau), t, negatives = _op_args(negatives=negatives)
    target = torch.where(target >= 0, target // subcenters, target)  # 130 rows of w: 65 classes of 2
    ops = torch.ops.facekernels
    torch.library.opcheck(ops.triton_inv_norms.default, (w,))
    options = (64.0, negatives, 0.2, cos_bound, filter_threshold, subcenters)
    lse_args = (x, w, inv_x, inv_w, target, phi, tau, t, *options)
    torch.library.opcheck(ops.triton_margin_lse.default, lse_args)
    lse = ops.triton_margin_lse(*lse_args)[0]
    grad_args = (torch.randn(7, device=DEVICE), x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, *options)
    torch.library.opcheck(ops.triton_grad_logits.default, grad_args)
    # the pre-pass: cos m2, sin m2, m3, threshold, offset, cos bound, linear, fallback, straight-through, k
    valid = target >= 0
    margins = (0.9, 0.4, 0.0, -0.9, 0.2, cos_bound, negatives == 1, True, False, subcenters)
    torch.library.opcheck(ops.triton_target_rows.default, (x, w, inv_w, target, valid, *margins))
    torch.library.opcheck(ops.triton_target_rows_update_t.default, (x, w, inv_w, target, valid, t.clone(), *margins,
                                                                    0.01))  # fmt: skip


def test_frozen_weight_runs_no_weight_gradient_gemm(monkeypatch):
    # a weight without requires_grad: the backward computes d embeddings only (no D^T X product)
    mm_shapes = []
    real_mm = torch.mm

    def spy(a, b, *args, **kwargs):
        mm_shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_mm(a, b, *args, **kwargs)

    x, w, y = (a.to(DEVICE) for a in kit.head_inputs(7, 130, 64, dtype=torch.float32))
    x1, x32, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    monkeypatch.setattr(torch, "mm", spy)
    head_loss(x1, w, y, kit.CASES["cosface"].params(), None, True, "triton").backward()
    monkeypatch.undo()
    head_loss(x32, w, y, kit.CASES["cosface"].params(), None, True, "reference").backward()
    head_loss(x64, w.double(), y, kit.CASES["cosface"].params(), None, True, "reference").backward()
    assert w.grad is None
    assert mm_shapes and all(a[0] == 7 for a, _ in mm_shapes), mm_shapes  # only (B, n) @ (n, d): d embeddings
    # against the float64 oracle by the error-ratio rule (a fixed rtol / atol is one BLAS's rounding)
    floor = kit.logit_floor(kit.CASES["cosface"].params().s, torch.float32)
    kit.assert_error_ratio(x1.grad, x32.grad, x64.grad, floor=floor, what="d embeddings")


def test_float64_and_mixed_float64_are_the_references():
    x, w, y = (a.to(DEVICE) for a in kit.head_inputs(3, 5, 4, dtype=torch.float32))
    with pytest.raises(TypeError, match="float64 is the reference's"):
        head_loss(x.double(), w.double(), y, kit.CASES["arcface"].params(), None, True, "triton")
    with pytest.raises(TypeError, match="both be float64 or neither"):  # refused before any backend
        fkf.margin_cross_entropy(x, w.double(), y, "arcface", backend="triton")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(tk, "_INTERPRETED", False)
    x, w, y = kit.head_inputs(3, 5, 4, dtype=torch.float32)
    with pytest.raises(fk.BackendUnavailableError, match="needs CUDA tensors"):
        head_loss(x, w, y, kit.CASES["arcface"].params(), None, True, "triton")


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


def test_chunks_stay_within_the_budget_and_cover_whole_tiles():
    # the working set after the kernel: D in the GEMM dtype, the chunk of W and its float32 dW (d = 512)
    cases = [(1024, 1_000_000, torch.bfloat16), (256, 10_000_000, torch.float32), (7, 3, torch.float16)]
    for batch, classes, dtype in cases:
        chunk = tk.KERNELS.chunk_classes(batch, classes, dtype)
        gemm = 4 if dtype == torch.float32 else 2
        working_set = chunk * (batch * gemm + 512 * (dtype.itemsize + 4))
        assert chunk % 128 == 0 and (chunk == 128 or working_set <= tk.CHUNK_BYTES)
        assert (chunk + 128) * (batch * gemm + 512 * (dtype.itemsize + 4)) > tk.CHUNK_BYTES or chunk >= classes
    assert tk.KERNELS.chunk_classes(1024, 1_000_000, torch.bfloat16) == 131072  # 8 chunks at C = 1M


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case, options", [("curricular", {}), ("cosface", dict(interclass_filtering_threshold=0.2)),
                                           ("mv_am", {})])  # fmt: skip
def test_backward_with_and_without_the_fused_recompute(fused, case, options, monkeypatch):
    # the chunk's logits gradient from the tl.dot recompute (_grad_logits_kernel) and from cuBLAS's dots +
    # the elementwise kernel: both against the float64 oracle by the error-ratio rule, on poisoned buffers, over
    # several chunks (ragged: 300 classes in 128-class chunks) of a batch that is no multiple of the row tile
    monkeypatch.setattr(tk, "FUSED_RECOMPUTE", fused)
    monkeypatch.setattr(tk, "CHUNK_BYTES", 1)
    monkeypatch.setattr(tk, "POISON_OUTPUTS", True)
    launched = []
    real_launch = tk._launch
    monkeypatch.setattr(tk, "_launch", lambda kernel, *a, **k: (launched.append(kernel.fn.__name__),
                                                                 real_launch(kernel, *a, **k)))
    params = kit.CASES[case].params(reduction="none", **options)
    x, w, y = (a.to(DEVICE) for a in kit.head_inputs(67, 300, 40, dtype=torch.float32, ignore_frac=0.2))
    g = torch.rand(67, dtype=torch.float64, device=DEVICE)
    t = (lambda: torch.tensor(0.3, device=DEVICE)) if params.uses_t else (lambda: None)
    runs = []
    for backend, xx, ww in [("triton", x, w), ("reference", x, w), ("reference", x.double(), w.double())]:
        xa, wa = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        loss = head_loss(xa, wa, y, params, t(), True, backend)
        (loss * g.to(loss.dtype)).sum().backward()
        runs.append((xa.grad, wa.grad))
    kernels = ["_grad_logits_kernel", "_grad_logits_from_dots_kernel"]  # fused, and not
    used, unused = kernels if fused else kernels[::-1]
    assert launched.count(used) == 3 and unused not in launched, launched
    for i, name in enumerate(("dx", "dw")):
        kit.assert_error_ratio(runs[0][i], runs[1][i], runs[2][i], floor=kit.logit_floor(params.s, torch.float32),
                               what=name)


@pytest.mark.parametrize("parts", [1, 3, 70])
def test_combine_lse_kernel_against_float64(parts):
    # the class splits' (max, sum exp(z - max)) partials of 45 rows (two programs, the second ragged); 70 parts
    # take two BLOCK_P steps. Row 0: no class (every partial -inf, sum 0): -inf; row 1: a NaN partial; row 2 one
    # partial far below the others (its share underflows); poisoned outputs
    from facekernels.kernels.triton.forward import _combine_lse_kernel

    gen = torch.Generator().manual_seed(parts)
    part_max = 30 * torch.randn(45, parts, generator=gen, dtype=torch.float64)
    part_sum = 1 + 100 * torch.rand(45, parts, generator=gen, dtype=torch.float64)
    part_max[0], part_sum[0] = -math.inf, 0.0
    part_max[1, -1] = math.nan
    part_max[2, 0] -= 1e4
    lse, row_max = (torch.full((45,), 7.0, device=DEVICE) for _ in range(2))
    tk._launch(_combine_lse_kernel, (triton.cdiv(45, tk.COMBINE_BLOCK_R),), part_max.float().to(DEVICE),
               part_sum.float().to(DEVICE), lse, row_max, 45, parts, BLOCK_R=tk.COMBINE_BLOCK_R,
               BLOCK_P=min(64, triton.next_power_of_2(parts)))  # fmt: skip
    rounded_max, rounded_sum = part_max.float().double(), part_sum.float().double()  # the kernel's inputs
    want = torch.logsumexp(rounded_max + rounded_sum.log(), dim=1)
    want_max = rounded_max.amax(dim=1)
    assert lse[0].item() == -math.inf and row_max[0].item() == -math.inf
    assert math.isnan(lse[1].item()) and math.isnan(row_max[1].item())
    # float32 arithmetic: a few roundings of the largest term (max_j ~ 100 here, log sum_j ~ 5)
    eps = torch.finfo(torch.float32).eps
    kit.assert_close(lse[2:], want[2:], rtol=0.0, atol=16 * eps * want[2:].abs().max().item(), what="lse")
    assert torch.equal(row_max[2:].double().cpu(), want_max[2:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_place", [False, True])
def test_dw_correction_kernel_against_float64(dtype, in_place):
    # out = dW + k w, summed in float32 and rounded once to out's dtype: 37 rows (a ragged row block) x 300 of d
    # (a ragged 256-wide block), w every other row of a larger tensor (a row stride); in place: out is dW itself
    # (float32, the fused optimizer's master rows); else a NaN-poisoned buffer in w's dtype
    gen = torch.Generator().manual_seed(3)
    dw = torch.randn(37, 300, generator=gen)
    w = torch.randn(74, 300, generator=gen).to(dtype)[::2]
    k = torch.randn(37, generator=gen)
    exact = dw.double() + k.double()[:, None] * w.double()
    dw_dev, w_dev, k_dev = (a.to(DEVICE) for a in (dw, w, k))
    out = dw_dev if in_place else torch.full((37, 300), math.nan, dtype=dtype, device=DEVICE)
    got = tk.dw_correction(dw_dev, w_dev, k_dev, out)
    assert got is out and got.dtype == (torch.float32 if in_place else dtype)
    # one rounding to out's dtype (half an ulp) of a float32 sum (a few float32 ulps of its terms)
    half_ulp = torch.finfo(got.dtype).eps / 2
    terms = dw.double().abs() + (k.double()[:, None] * w.double()).abs()
    bound = half_ulp * exact.abs() + 4 * torch.finfo(torch.float32).eps * terms
    err = (got.double().cpu() - exact).abs()
    assert torch.isfinite(err).all() and (err <= bound).all(), f"largest error over its bound {(err / bound).max():.3g}"
