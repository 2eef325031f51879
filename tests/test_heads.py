"""One conformance suite for every kernel back-end of the head algorithm (facekernels/_algorithm.py): the
compiled CPU kernels and the Triton kernels (under Triton's interpreter here, float32; on CUDA when there is a
GPU), against the float64 reference (itself checked against the independent oracle in test_reference_heads.py).

Adding a back-end or a case is one entry in kit.FUSED_BACKENDS or kit.CASES. Every kernel-written buffer starts as
NaN (POISON_OUTPUTS) and the class tiles / backward chunks are made small, so that small odd shapes cover many
tiles, several chunks and ragged last ones.
"""

import math

import kit
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import facekernels as fk
from facekernels import _extension
from facekernels import functional as fkf
from facekernels._backends import head_loss
from facekernels.reference import eager_margin_cross_entropy as ref_loss

DEVICE = kit.TRITON_DEVICE
BACKENDS = kit.FUSED_BACKENDS  # each compared with the reference


_dtype = kit.precise_dtype


@pytest.fixture
def small_tiles(monkeypatch):
    """CPU tiles of 8 classes; Triton backward chunks of one 128-class tile, class splits in the forward."""
    from facekernels.kernels import cpu

    monkeypatch.setattr(cpu, "CLASS_TILE", 8)
    if kit.triton_importable():
        from facekernels.kernels import triton as tk

        monkeypatch.setattr(tk, "CHUNK_BYTES", 1)
        monkeypatch.setattr(tk, "POISON_OUTPUTS", True)


def _loss_and_grads(backend, x, w, y, params, t, training=True, g=None, state=None):
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = head_loss(xa, wa, y, params, t, training, backend, state=state)
    if g is None:
        g = torch.randn(loss.shape, dtype=torch.float64, device=loss.device)
    (loss * g.to(loss.dtype)).sum().backward()
    return loss, xa.grad, wa.grad, g


def _check(backend, x, w, y, case, *, training=True, what="", **options):
    """The back-end against the reference for ``case`` (a name of kit.CASES) with head ``options``: to 1e-9 in
    float64, by the error-ratio rule in float32; the training-step state (CurricularFace's t, AdaFace's
    statistics) must come out alike. Returns the back-end's (loss, dx, dw)."""
    case_ = kit.CASES[case]
    params = case_.params(**options)
    ts, states = [case_.t0(x.device) for _ in range(3)], [case_.state(x.device) for _ in range(3)]
    got, dx, dw, g = _loss_and_grads(backend, x, w, y, params, ts[0], training, state=states[0])
    want = _loss_and_grads("reference", x.double(), w.double(), y, params, ts[1], training, g=g, state=states[1])
    assert got.dtype == kit_acc(x.dtype) and dx.dtype == x.dtype and dw.dtype == w.dtype
    names, what = ("loss", "dx", "dw"), what or case
    if x.dtype == torch.float64:
        for name, a, b in zip(names, (got, dx, dw), want):
            kit.assert_close(a, b, rtol=1e-9, atol=1e-10, what=f"{what} {name}")
    else:
        low = _loss_and_grads("reference", x, w, y, params, ts[2], training, g=g, state=states[2])
        for name, a, b, c in zip(names, (got, dx, dw), low, want):
            kit.assert_error_ratio(a, b, c, floor=kit.logit_floor(params.s, x.dtype), what=f"{what} {name}")
    if ts[0] is not None:
        assert ts[0].item() == pytest.approx(ts[1].item(), abs=1e-6)
    if states[0] is not None and states[0].batch_mean is not None:  # AdaFace's statistics
        for a, b in zip(states[0][:2], states[1][:2]):
            assert a.item() == pytest.approx(b.item(), rel=1e-6)
    return got, dx, dw


def kit_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", kit.ORACLE_CASES)
@pytest.mark.parametrize("margin_grad", kit.fast_first("exact", "straight_through"))
@pytest.mark.parametrize("reduction", kit.fast_first("mean", "sum", "none"))
@pytest.mark.parametrize("ignore_index", kit.fast_first(3, None, -100))
def test_matches_reference(backend, case, margin_grad, reduction, ignore_index, small_tiles):
    # C = 300: three Triton backward chunks (the last ragged) and two forward splits; 38 CPU tiles
    options = dict(margin_grad=margin_grad, reduction=reduction)
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
    x, w, y = kit.head_inputs(13, 300, 19, dtype=_dtype(backend), ignore_frac=0.3 if ignore_index else 0.0,
                              ignore_index=ignore_index or -100)  # fmt: skip
    if ignore_index is not None:
        y[0] = ignore_index
    x, w, y = x.to(kit.device(backend)), w.to(kit.device(backend)), y.to(kit.device(backend))
    got, dx, _ = _check(backend, x, w, y, case, **options)
    if ignore_index is not None:
        ignored = y == ignore_index
        assert torch.all(dx[ignored] == 0)
        if reduction == "none":
            assert torch.all(got[ignored] == 0)


# ------------------------------------------------------------------------------------------ more heads

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", kit.MORE_CASES)
@pytest.mark.parametrize("reduction", kit.fast_first("mean", "none"))
@pytest.mark.parametrize("ignore_index", kit.fast_first(3, None))
def test_more_heads_match_reference(backend, case, reduction, ignore_index, small_tiles):
    # C = 150 classes: two Triton backward chunks (k = 3: four, the last ragged) and two forward splits
    options = dict(reduction=reduction, margin_grad="exact" if reduction == "mean" else "straight_through")
    kw = dict(ignore_frac=0.3, ignore_index=ignore_index) if ignore_index is not None else {}
    x, w, y = kit.CASES[case].inputs(13, 150, 19, _dtype(backend), **kw)
    if ignore_index is not None:
        options["ignore_index"] = ignore_index
        y[0] = ignore_index
    dev = kit.device(backend)
    got, dx, _ = _check(backend, x.to(dev), w.to(dev), y.to(dev), case, **options)
    if ignore_index is not None:
        ignored = (y == ignore_index).to(dev)
        assert torch.all(dx[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["adaface", "elastic_arc_plus", "elastic_cos_official"])
def test_more_heads_in_eval_mode(backend, case, small_tiles):
    # eval: AdaFace reads its statistics without updating them; ElasticFace gives every row m, drawing nothing
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.CASES[case].inputs(11, 140, 9, _dtype(backend)))
    _check(backend, x, w, y, case, training=False)
    state = kit.CASES[case].state(dev)
    before = [a.clone() if isinstance(a, torch.Tensor) else a.get_state() for a in state if a is not None]
    head_loss(x, w, y, kit.CASES[case].params(), None, False, backend, state=state)
    after = [a if isinstance(a, torch.Tensor) else a.get_state() for a in state if a is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_subcenter_ties_give_the_gradient_to_the_first(backend, small_tiles):
    # every class's sub-centers 1 and 2 are copies of its sub-center 0: exact ties, the first maximum (0) takes
    # the whole gradient (spec: the first, lowest k), the copies get exactly 0. Every row has 4 entries +-2^e
    # and 0 elsewhere: its norm 2^(e+1) is a power of two, so raw products, inverse norms, normalised rows and
    # cosines (multiples of 1/4) are all exact in float32, and the copies tie in any GEMM, whatever its blocking
    # or summation order, and whether a backend normalises before or after it (tl.dot, BLAS, ATen's kernels)
    def rows(n):
        signs = torch.randint(0, 2, (n, 9)).float() * 2 - 1
        four = torch.rand(n, 9).argsort(dim=1) < 4
        return signs * four * 2.0 ** torch.randint(0, 4, (n, 1)).float()

    dev = kit.device(backend)
    x, w, y = rows(11), rows(140).repeat_interleave(3, dim=0), torch.randint(0, 140, (11,))
    *_, dw, _ = _loss_and_grads(backend, x.to(dev), w.to(dev), y.to(dev), fk.head_params("subcenter_arcface"), None)
    dw = dw.view(140, 3, 9)
    assert torch.all(dw[:, 1:] == 0) and dw[:, 0].abs().amax(dim=1).gt(0).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_more_heads_nan_in_nan_out(backend, small_tiles):
    # a NaN embedding row: that row's loss is NaN, AdaFace's statistics keep their values (the batch's mean norm is
    # NaN: the step is skipped, as AMP skips it); a NaN in one sub-center of class 0: every row's loss is NaN
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.CASES["adaface"].inputs(9, 150, 7, torch.float32))
    x[2, 1] = float("nan")
    for case in ("adaface", "magface", "elastic_arc"):
        state = kit.CASES[case].state(dev)
        loss = head_loss(x, w, y, kit.CASES[case].params(reduction="none"), None, True, backend, state=state)
        assert torch.isnan(loss[2]) and torch.isfinite(loss[torch.arange(9, device=dev) != 2]).all(), (case, loss)
        if case == "adaface":
            assert (state.batch_mean.item(), state.batch_std.item()) == (6.0, 3.0)
    x, w, y = (a.to(dev) for a in kit.CASES["subcenter"].inputs(9, 150, 7, torch.float32))
    w[0, 3] = float("nan")
    loss = head_loss(x, w, y, fk.head_params("subcenter_arcface", reduction="none"), None, True,
                                     backend)  # fmt: skip
    assert torch.isnan(loss).all(), loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["adaface", "magface", "subcenter", "filter_arc"])
@pytest.mark.parametrize("shape", [(1, 1, 5), (0, 13, 4), (70, 200, 33), (33, 130, 130)])
@pytest.mark.slow
def test_more_heads_odd_shapes(backend, case, shape):
    # default tiles and chunks; B = 70 takes Triton's 128-row tiles; B = 1 leaves AdaFace's std as it is
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.CASES[case].inputs(*shape, dtype=_dtype(backend)))
    _check(backend, x, w, y, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["arcface", "combined_general", "mv_arc", "curricular"])
@pytest.mark.parametrize("shape", [(1, 1, 5), (0, 13, 4), (7, 1025, 3), (70, 200, 33), (33, 130, 130)])
@pytest.mark.slow
def test_odd_shapes(backend, case, shape):
    # default tiles and chunks; B = 70 takes Triton's 128-row tiles, B = 1 and d = 3 the smallest
    x, w, y = kit.head_inputs(*shape, dtype=_dtype(backend))
    dev = kit.device(backend)
    _check(backend, x.to(dev), w.to(dev), y.to(dev), case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_curricular_t_over_steps_eval_and_a_batch_without_valid_rows(backend, small_tiles):
    dev, dtype = kit.device(backend), _dtype(backend)
    params = kit.CASES["curricular"].params()
    t, t_ref = torch.zeros((), device=dev), torch.zeros((), device=dev)
    for step in range(3):
        x, w, y = (a.to(dev) for a in kit.head_inputs(11, 150, 9, dtype=dtype, ignore_frac=0.2))
        got, *_ = _loss_and_grads(backend, x, w, y, params, t)
        want, *_ = _loss_and_grads("reference", x.double(), w.double(), y, params, t_ref)
        kit.assert_close(got, want, rtol=2e-5, atol=2e-5, what=f"loss at step {step}")
        assert t.item() == pytest.approx(t_ref.item(), abs=1e-6)
    assert t.item() > 0
    before = t.clone()
    x, w, y = (a.to(dev) for a in kit.head_inputs(6, 150, 9, dtype=dtype))
    _loss_and_grads(backend, x, w, y, params, t, training=False)
    assert torch.equal(t, before)  # eval reads t and leaves it
    loss, dx, dw, _ = _loss_and_grads(backend, x, w, torch.full_like(y, -100), params, t)
    assert torch.equal(t, before) and loss.item() == 0 and torch.all(dx == 0) and torch.all(dw == 0)


# ------------------------------------------------------------------------------------------ NaN and Inf


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_ignored_row_touches_nothing(backend, bad, small_tiles):
    # a NaN / Inf embedding in a row labelled ignore_index: finite loss, a 0 gradient for that row, and finite
    # gradients for every class weight (NaN * 0 in the products would poison every row of W)
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(9, 150, 7, dtype=torch.float32))
    y[4] = -100
    x[4, 2] = bad
    for case in ("arcface", "curricular"):
        loss, dx, dw, _ = _loss_and_grads(backend, x, w, y, kit.CASES[case].params(), kit.CASES[case].t0(dev))
        assert torch.isfinite(loss) and torch.isfinite(dw).all(), case
        assert torch.all(dx[4] == 0) and torch.isfinite(dx).all(), case
        want, *_ = _loss_and_grads("reference", x.double(), w.double(), y, kit.CASES[case].params(),
                                   kit.CASES[case].t0(dev))  # fmt: skip
        kit.assert_close(loss, want, rtol=1e-5, atol=1e-5, what=case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_class_row_gives_a_nan_loss_whatever_tile_or_thread_holds_it(backend, request):
    # a NaN in class row 0, with every target in the other half of the classes: the merge of the per-thread
    # (cpu) or per-split (triton) partial log-sum-exps must keep the NaN
    if backend == "cpu":  # two threads, each with its partial; the suite's own count restored after
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    x, w, y = kit.head_inputs(6, 2048 if backend == "cpu" else 300, 8, dtype=torch.float32)
    w[0, 3] = float("nan")
    y = (y % (w.shape[0] // 2)) + w.shape[0] // 2
    dev = kit.device(backend)
    got = head_loss(x.to(dev), w.to(dev), y.to(dev), kit.CASES["arcface"].params(reduction="none"), None,
                                    True, backend)  # fmt: skip
    assert torch.isnan(got).all(), got


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_embedding_row_stays_nan(backend, small_tiles):
    dev = kit.device(backend)
    x, w, y = kit.head_inputs(5, 150, 6, dtype=_dtype(backend))
    x[2, 1] = float("nan")
    for case in ("arcface", "curricular"):
        params = kit.CASES[case].params(reduction="none")
        got = head_loss(x.to(dev), w.to(dev), y.to(dev), params, kit.CASES[case].t0(dev), False, backend)
        want = ref_loss(x.double(), w.double(), y, params, kit.CASES[case].t0(), False)
        assert torch.isnan(got[2]) and torch.isnan(want[2])
        keep = torch.arange(5) != 2
        kit.assert_close(got[keep.to(dev)], want[keep], rtol=1e-5, atol=1e-5, what="finite rows")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_curricular_t_survives_a_non_finite_batch(backend):
    # an Inf embedding sets the batch's mean target cosine to NaN: t must skip that batch (AMP's GradScaler
    # skips its step too) and later clean batches must train as if it never came
    dev = kit.device(backend)
    params = kit.CASES["curricular"].params()
    t, t_clean = torch.full((), 0.3, device=dev), torch.full((), 0.3, device=dev)
    x, w, y = (a.to(dev) for a in kit.head_inputs(8, 150, 7, dtype=torch.float32))
    x_bad = x.clone()
    x_bad[1] = float("inf")
    head_loss(x_bad, w, y, params, t, True, backend)
    assert t.item() == pytest.approx(0.3)
    got = head_loss(x, w, y, params, t, True, backend)
    want = head_loss(x, w, y, params, t_clean, True, backend)
    assert torch.isfinite(got) and torch.equal(got, want) and torch.equal(t, t_clean)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_huge_norms_are_not_zero_vectors(backend):
    # the loss is invariant to the scale of a row: embeddings or class weights scaled by 1e20 (a float32 sum of
    # squares overflows at ~1.8e19) must give the loss of the unscaled rows, not that of zero vectors. (Both at
    # once would overflow the float32 dot products of the Triton tiles, which take the raw inputs: README.)
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(7, 150, 9, dtype=torch.float32))
    params = kit.CASES["arcface"].params()
    want = head_loss(x, w, y, params, None, True, backend)
    for xs, ws in ((x * 1e20, w), (x, w * 1e20)):
        got = head_loss(xs, ws, y, params, None, True, backend)
        kit.assert_close(got, want, rtol=1e-5, atol=1e-5, what="loss of scaled rows")


# ------------------------------------------------------------------------------------------ autograd


@pytest.mark.parametrize("backend", BACKENDS)
def test_higher_order_and_forward_mode_raise_instead_of_a_silent_zero(backend):
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(5, 40, 6, dtype=torch.float32))
    xa = x.clone().requires_grad_()
    loss = head_loss(xa, w, y, kit.CASES["arcface"].params(), None, True, backend)
    (grad,) = torch.autograd.grad(loss, xa, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of the fused heads are not implemented"):
        torch.autograd.grad(grad.sum(), xa)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda a: head_loss(a, w, y, kit.CASES["arcface"].params(), None, True, backend), (x,),
                       (torch.ones_like(x),))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_matches_backward(backend):
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(5, 40, 6, dtype=torch.float32))
    params = kit.CASES["mv_arc"].params()
    got = torch.func.grad(lambda a: head_loss(a, w, y, params, None, True, backend))(x)
    _, want, _, _ = _loss_and_grads(backend, x, w, y, params, None, g=torch.ones((), dtype=torch.float64))
    kit.assert_close(got, want, rtol=1e-6, atol=1e-7, what="torch.func.grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_dx, need_dw", [(True, True), (True, False), (False, True), (False, False)])
def test_requires_grad_combinations(backend, need_dx, need_dw, small_tiles):
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(6, 150, 5, dtype=torch.float32))
    params = kit.CASES["arcface"].params()
    xa, wa = x.clone().requires_grad_(need_dx), w.clone().requires_grad_(need_dw)
    xb, wb = x.double().requires_grad_(need_dx), w.double().requires_grad_(need_dw)
    got = head_loss(xa, wa, y, params, None, True, backend)
    want = ref_loss(xb, wb, y, params)
    kit.assert_close(got, want, rtol=1e-5, atol=1e-6, what="loss")
    assert got.requires_grad == (need_dx or need_dw)
    if got.requires_grad:
        got.backward()
        want.backward()
    assert (xa.grad is None) == (not need_dx) and (wa.grad is None) == (not need_dw)
    if need_dx:
        kit.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6, what="d embeddings")
    if need_dw:
        kit.assert_close(wa.grad, wb.grad, rtol=1e-4, atol=1e-6, what="d weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_uses_each_forwards_t(backend):
    # two forwards before one backward: each backward must use the t its own forward used
    dev = kit.device(backend)
    params = kit.CASES["curricular"].params()
    x, w, y = (a.to(dev) for a in kit.head_inputs(8, 60, 6, dtype=_dtype(backend)))
    t, t_ref = torch.zeros((), device=dev), torch.zeros((), device=dev)
    wa, wb = w.clone().requires_grad_(), w.double().requires_grad_()
    total = head_loss(x, wa, y, params, t, True, backend) + head_loss(
        x, wa, y, params, t, True, backend)
    ref = ref_loss(x.double(), wb, y, params, t_ref) + ref_loss(x.double(), wb, y, params, t_ref)
    total.backward()
    ref.backward()
    kit.assert_close(wa.grad, wb.grad, rtol=1e-4, atol=5e-5, what="accumulated d weight")


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_the_class_range_and_strided_inputs(backend, small_tiles):
    dev = kit.device(backend)
    x, w, y = kit.head_inputs(17, 140, 7, dtype=_dtype(backend))
    y[:4] = 3
    x_view, w_view = x.t().contiguous().t(), w[::2].repeat_interleave(2, 0)
    assert not x_view.is_contiguous()
    _, dx, _ = _check(backend, x_view.to(dev), w_view.to(dev), y.to(dev), "curricular", ignore_index=3,
                      reduction="sum")  # fmt: skip
    assert torch.all(dx[(y == 3).to(dev)] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_promote_like_the_reference(backend):
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(7, 23, 6))
    dtypes = (torch.bfloat16, torch.float32) if backend == "cpu" else (torch.float16, torch.float32)
    x, w = x.to(dtypes[0]), w.to(dtypes[1])
    got, dx, dw, g = _loss_and_grads(backend, x, w, y, kit.CASES["mv_arc"].params(), None)
    want, dx_ref, dw_ref, _ = _loss_and_grads("reference", x, w, y, kit.CASES["mv_arc"].params(), None, g=g)
    assert (got.dtype, dx.dtype, dw.dtype) == (want.dtype, dx_ref.dtype, dw_ref.dtype) == (torch.float32, *dtypes)
    kit.assert_close(got, want, rtol=2e-2, atol=2e-2, what="loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_margin_grad_at_the_poles_is_finite(backend):
    dev = kit.device(backend)
    w = torch.randn(4, 6, device=dev)
    x = torch.cat([w[:2], -w[2:3]]).clone().requires_grad_()  # theta = 0 twice, theta = pi once
    loss = head_loss(x, w, torch.tensor([0, 1, 2], device=dev), kit.CASES["combined_general"].params(), None,
                                     True, backend)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    dev = kit.device(backend)
    w = torch.randn(5, 4, device=dev, requires_grad=True)
    x = torch.randn(0, 4, device=dev, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=dev)
    loss = head_loss(x, w, y, kit.CASES["arcface"].params(), None, True, backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(w.grad == 0)
    assert head_loss(x, w, y, kit.CASES["arcface"].params(reduction="none"), None, True, backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_runs_are_bitwise_equal(backend, small_tiles):
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(9, 300, 7, dtype=torch.float32))
    runs = [_loss_and_grads(backend, x, w, y, kit.CASES["mv_am"].params(), None, g=torch.ones((), dtype=torch.float64))
            for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_no_batch_by_classes_tensor(backend, small_tiles):
    # with the small chunks of the fixture, a Triton backward chunk is (B, 128): any (B, C) tensor, in forward
    # or backward, shows among the shapes the ops return (the same recorder sees the reference's logits)
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(13, 397, 7, dtype=torch.float32))
    for case in ("curricular", "mv_am", "arcface"):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with _RecordSizes() as rec:
            head_loss(xa, wa, y, kit.CASES[case].params(), kit.CASES[case].t0(dev), True, backend).backward()
        big = [(f, s) for f, s in rec.shapes if len(s) == 2 and s[0] * s[1] >= 13 * 397 and 13 in s]
        assert not big, big
        with _RecordSizes() as rec:
            ref_loss(xa, wa, y, kit.CASES[case].params(), kit.CASES[case].t0(dev)).backward()
        assert any(s == (13, 397) for _, s in rec.shapes)
    # the more heads: sub-centers (k rows of w per class), per-row margins, filtering
    for case in kit.MORE_CASES:
        x, w, y = (a.to(dev) for a in kit.CASES[case].inputs(13, 397, 7, torch.float32))
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        with _RecordSizes() as rec:
            head_loss(xa, wa, y, kit.CASES[case].params(), None, True, backend,
                      state=kit.CASES[case].state(dev)).backward()  # fmt: skip
        big = [(f, s) for f, s in rec.shapes if len(s) == 2 and s[0] * s[1] >= 13 * 397 and 13 in s]
        assert not big, (case, big)


# ------------------------------------------------------------------------------------------ public API


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_and_functional_use_the_backend(backend, small_tiles):
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(7, 150, 16, dtype=torch.float32))
    want = fkf.margin_cross_entropy(x, w, y, "combined", m1=0.9, m2=0.4, m3=0.15, backend="reference")
    head = fk.CombinedMargin(16, 150, m1=0.9, m2=0.4, m3=0.15, backend=backend).to(dev)
    with torch.no_grad():
        head.weight.copy_(w)
    kit.assert_close(head(x, y), want, rtol=1e-5, atol=1e-6, what="module loss")
    auto = fkf.margin_cross_entropy(x, w, y, "combined", m1=0.9, m2=0.4, m3=0.15, backend="auto")
    kit.assert_close(auto, want, rtol=1e-5, atol=1e-6, what="auto")
    cf, cf_ref = fk.CurricularFace(16, 150, backend=backend).to(dev), fk.CurricularFace(16, 150, backend="reference")
    cf_ref.load_state_dict(cf.state_dict())
    kit.assert_close(cf(x, y), cf_ref.to(dev)(x, y), rtol=1e-5, atol=1e-6, what="CurricularFace module")
    assert cf.t.item() == pytest.approx(cf_ref.t.item(), abs=1e-7) and cf.t.item() != 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_same_errors_as_reference(backend):
    dev = kit.device(backend)
    x, w = torch.randn(4, 6, device=dev), torch.randn(5, 6, device=dev)
    for labels, error, words in [([0, 1, 2, 9], ValueError, "labels must lie in"),
                                 ([0.0, 1, 2, 3], TypeError, "labels"), ([0, 1, 2], ValueError, "labels")]:  # fmt: skip
        for b in (backend, "reference"):
            with pytest.raises(error, match=words):
                fkf.margin_cross_entropy(x, w, torch.tensor(labels, device=dev), "arcface", backend=b)
                # CUDA label values are checked on the device and reported at the next sync point (_validate.py)
                fk.check_labels()
    with pytest.raises(ValueError, match="t must be a 0-dim float32"):
        fkf.margin_cross_entropy(x, w, torch.tensor([0, 1, 2, 3], device=dev), "curricular",
                                 t=torch.zeros(1, device=dev), backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", ["adaface", "magface", "elastic", "subcenter", "filter"])
@pytest.mark.slow
def test_more_heads_torch_compile_fullgraph(backend, module, small_tiles):
    dev = kit.device(backend)
    make = {
        "adaface": lambda: fk.AdaFace(16, 150, h=0.9, t_alpha=0.5, backend=backend),
        "magface": lambda: fk.MagFace(16, 150, l_a=3.0, u_a=10.0, backend=backend),
        "elastic": lambda: fk.ElasticCosFace(16, 150, std=0.1, plus=True, backend=backend),
        "subcenter": lambda: fk.SubCenterArcFace(16, 150, k=2, backend=backend),
        "filter": lambda: fk.CosFace(16, 150, s=4.0, interclass_filtering_threshold=0.2, backend=backend),
    }[module]
    head, eager = make().to(dev), make().to(dev)
    eager.load_state_dict(head.state_dict())
    x, _, y = (a.to(dev) for a in kit.CASES["adaface"].inputs(7, 150, 16, torch.float32))
    torch._dynamo.reset()  # each head class recompiles forward: stay below Dynamo's recompile limit
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if dev == "cpu" else "inductor")
    torch.manual_seed(3)  # ElasticFace draws from the default generator
    got = compiled(x, y)
    got.backward()
    torch.manual_seed(3)
    want = eager(x, y)
    want.backward()
    kit.assert_close(got, want, rtol=1e-5, atol=1e-6, what="loss")
    kit.assert_close(head.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-6, what="d weight")
    for a, b in zip(head.buffers(), eager.buffers(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_torch_compile_fullgraph(backend, small_tiles):
    # aot_eager on CPU: Dynamo + AOTAutograd trace forward and backward in one graph, no C++ codegen
    dev = kit.device(backend)
    head = fk.CurricularFace(16, 150, momentum=0.1, backend=backend).to(dev)
    eager = fk.CurricularFace(16, 150, momentum=0.1, backend=backend).to(dev)
    eager.load_state_dict(head.state_dict())
    x, _, y = (a.to(dev) for a in kit.head_inputs(7, 150, 16, dtype=torch.float32))
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if dev == "cpu" else "inductor")
    got = compiled(x, y)
    got.backward()
    want = eager(x, y)
    want.backward()
    kit.assert_close(got, want, rtol=1e-5, atol=1e-6, what="loss")
    kit.assert_close(head.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-6, what="d weight")
    assert torch.equal(head.t, eager.t)


# ------------------------------------------------------------------------------------------ low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["arcface", "cosface", "mv_am", "curricular", "adaface", "magface",
                                  "elastic_arc_plus", "subcenter", "filter_arc"])  # fmt: skip
def test_cpu_low_precision_error_ratio(dtype, case, small_tiles):
    # (kernel, eager-in-dtype, float64) losses and gradients on the same rounded inputs
    if not _extension.is_available():
        pytest.skip("needs facekernels._C")
    case_ = kit.CASES[case]
    x, w, y = case_.inputs(21, 45, 24, dtype=dtype, ignore_frac=0.2)
    params = case_.params(reduction="none")
    g = torch.rand(x.shape[0], dtype=torch.float64)
    got, low, want = [_loss_and_grads(b, xx, ww, y, params, case_.t0(), g=g, state=case_.state())
                      for b, xx, ww in [("cpu", x, w), ("reference", x, w), ("reference", x.double(), w.double())]]
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    for name, i in (("loss", 0), ("dx", 1), ("dw", 2)):
        kit.assert_error_ratio(got[i], low[i], want[i], k=2, what=f"{case} {name}")


# The Triton kernels in bfloat16 / float16 (every head, option and the float16 flush case): test_heads_lowp.py,
# under the interpreter here. Only what needs a GPU (C = 1M, memory) stays here, gpu-marked.


def _million_class_inputs(batch=1024, classes=1_000_003, features=128):
    x = torch.randn(batch, features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(classes, features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    return x, w, torch.randint(0, classes, (batch,), device=DEVICE)


@pytest.mark.gpu
def test_triton_million_classes_memory():
    # B = 1024, C = 1M: the extra peak memory of forward + backward stays below B * C bytes; the legitimate
    # buffers are dW (C * d bf16 = 256 MB), a backward chunk's D (32 MB) and O(B d + C) statistics
    x, w, y = _million_class_inputs()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = head_loss(x, w, y, kit.CASES["curricular"].params(), torch.zeros((), device=DEVICE), True, "triton")
    loss.backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < x.shape[0] * w.shape[0]
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_million_classes_error_ratio():
    # B = 1024, C = 1M, d = 128, bfloat16; the float64 / bfloat16 eager runs go 64 rows at a time
    x, w, y = _million_class_inputs()
    params = kit.CASES["arcface"].params(reduction="sum")

    def run(backend, xx, ww):
        xx, ww = xx.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        total = 0.0
        for r in range(0, xx.shape[0], 64 if backend == "reference" else xx.shape[0]):
            loss = head_loss(xx[r : r + 64 if backend == "reference" else None], ww,
                                             y[r : r + 64 if backend == "reference" else None], params, None,
                                             True, backend)  # fmt: skip
            loss.backward()
            total += loss.double().item()
        return torch.tensor(total), xx.grad, ww.grad

    kernel, eager, exact = run("triton", x, w), run("reference", x, w), run("reference", x.double(), w.double())
    for name, i in (("loss", 0), ("dx", 1), ("dw", 2)):
        kit.assert_error_ratio(kernel[i], eager[i], exact[i], what=name)
    assert math.isfinite(exact[0].item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["arcface", "mv_am", "curricular"])
def test_stats_match_the_logits(backend, case, small_tiles):
    # target cosine and top-1 correctness from the fused pass against the reference's logits matrix, on rows
    # that are right and rows that are wrong (near their class or not), with ignored rows
    dev = kit.device(backend)
    x, w, y = (a.to(dev) for a in kit.head_inputs(40, 300, 33, dtype=_dtype(backend), ignore_frac=0.1,
                                                  near_frac=0.5))  # fmt: skip
    params = kit.CASES[case].params()
    t_got, t_ref = kit.CASES[case].t0(dev), kit.CASES[case].t0(dev)
    loss, stats = head_loss(x, w, y, params, t_got, True, backend, True)
    want_loss, want = head_loss(x.double(), w.double(), y, params, t_ref, True, "reference", True)
    kit.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5, what="loss")
    kit.assert_close(stats.target_cosine, want.target_cosine, rtol=1e-6, atol=1e-6, what="target cosine")
    assert stats.correct.dtype == torch.bool and torch.equal(stats.correct.cpu(), want.correct.cpu())
    assert 0 < int(want.correct.sum()) < int((y != -100).sum())  # the case has right and wrong rows
    assert not stats.correct[y == -100].any() and torch.all(stats.target_cosine[y == -100] == 0)


def test_module_and_functional_return_stats():
    head = fk.ArcFace(9, 30, backend="reference")
    x, y = torch.randn(5, 9), torch.randint(0, 30, (5,))
    assert isinstance(head(x, y), torch.Tensor)
    head.return_stats = True
    loss, stats = head(x, y)
    assert isinstance(stats, fk.HeadStats) and stats.target_cosine.shape == (5,) and stats.correct.shape == (5,)
    loss2, stats2 = fkf.margin_cross_entropy(x, head.weight, y, "arcface", return_stats=True, backend="reference")
    assert torch.equal(loss, loss2) and torch.equal(stats.correct, stats2.correct)
