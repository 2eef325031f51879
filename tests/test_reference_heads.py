"""The eager reference heads against independent float64 oracles (tests/oracle.py), hand-worked cases,
gradcheck and the CurricularFace t recursion."""

import math

import kit
import oracle
import pytest
import torch

import facekernels as fk
from facekernels import functional as fkf
from facekernels.reference import eager_margin_cross_entropy as ref_loss


def _inputs(batch, classes, features, dtype=torch.float64, ignore_frac=0.0):
    x = torch.randn(batch, features, dtype=dtype)
    w = torch.randn(classes, features, dtype=dtype)
    y = torch.randint(0, classes, (batch,))
    if ignore_frac:
        y[torch.rand(batch) < ignore_frac] = -100
    # put some targets close to their class so that margins, fallbacks and hard negatives all occur
    near = torch.rand(batch) < 0.5
    w_rows = w[y.clamp_min(0)]
    x[near] = w_rows[near] * 3 + 0.6 * torch.randn(int(near.sum()), features, dtype=dtype)
    return x, w, y


def _ref(x, w, y, case, t=None, **options):
    params = kit.CASES[case].params(**options)
    return ref_loss(x, w, y, params, t=t, training=True)


@pytest.mark.parametrize("case", kit.ORACLE_CASES)
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [False, True])
def test_reference_matches_oracle(case, margin_grad, reduction, ignore):
    x, w, y = _inputs(13, 7, 5, ignore_frac=0.3 if ignore else 0.0)
    x_ref, w_ref = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_orc, w_orc = x.clone().requires_grad_(), w.clone().requires_grad_()
    t0 = float(torch.tensor(0.15, dtype=torch.float32))  # the buffer is float32
    t = torch.tensor(t0, dtype=torch.float32) if case == "curricular" else None
    options = dict(margin_grad=margin_grad, reduction=reduction)
    got = _ref(x_ref, w_ref, y, case, t=t, **options)
    want, t_want = oracle.head_loss(x_orc, w_orc, y, case, t=t0, **options)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if t is not None:
        assert t.item() == pytest.approx(t_want, abs=1e-7)
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x_ref.grad, x_orc.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(w_ref.grad, w_orc.grad, rtol=1e-8, atol=1e-9)
    if ignore:
        ignored = y == -100
        assert ignored.any()
        assert torch.all(x_ref.grad[ignored] == 0)


@pytest.mark.parametrize("case", ["norm_softmax", "arcface", "cosface", "combined_general", "mv_am", "mv_arc"])
def test_reference_gradcheck_exact(case):
    params = kit.CASES[case].params()
    x, w, y = _inputs(5, 6, 4)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ref_loss(a, b, y, params), (x, w), eps=1e-7, atol=1e-5)


def test_curricular_gradcheck_eval_mode():
    # eval mode reads t without updating it, so the function is deterministic for gradcheck
    params = fk.head_params("curricular", s=16.0)
    t = torch.tensor(0.3)
    x, w, y = _inputs(6, 5, 4)
    x.requires_grad_()
    w.requires_grad_()
    fn = lambda a, b: ref_loss(a, b, y, params, t=t, training=False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-7, atol=1e-5)
    assert t.item() == pytest.approx(0.3)


def test_hand_worked_arcface():
    # 2-D: x along the first axis; classes at angles 0.3, 1.0 and 2.0 rad; label 0.
    s, m = 2.0, 0.5
    x = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    angles = [0.3, 1.0, 2.0]
    w = torch.tensor([[math.cos(a) * 2, math.sin(a) * 2] for a in angles], dtype=torch.float64)
    loss = fkf.margin_cross_entropy(x, w, torch.tensor([0]), "arcface", s=s, m=m, backend="reference")
    z = [s * math.cos(0.3 + 0.5), s * math.cos(1.0), s * math.cos(2.0)]
    want = math.log(sum(math.exp(v) for v in z)) - z[0]
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # theta + m > pi: the fallback c - sin(pi - m) m (label 2 at angle 2.0 with m = 1.5)
    loss = fkf.margin_cross_entropy(x, w, torch.tensor([2]), "arcface", s=s, m=1.5, backend="reference")
    c = math.cos(2.0)
    z = [s * math.cos(0.3), s * math.cos(1.0), s * (c - math.sin(math.pi - 1.5) * 1.5)]
    want = math.log(sum(math.exp(v) for v in z)) - z[2]
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_hand_worked_mv_am_hard_negative():
    # target at angle 0.5 (c = cos 0.5 > m), negatives at 0.6 (hard: c_j > c - m) and 2.5 (easy)
    s, m, t = 1.0, 0.35, 0.2
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[math.cos(a), math.sin(a)] for a in (0.5, 0.6, 2.5)], dtype=torch.float64)
    loss = fkf.margin_cross_entropy(x, w, torch.tensor([0]), "mv_softmax", s=s, m=m, t=t, backend="reference")
    c = math.cos(0.5)
    z = [s * (c - m), s * ((t + 1) * math.cos(0.6) + t), s * math.cos(2.5)]
    assert loss.item() == pytest.approx(math.log(sum(math.exp(v) for v in z)) - z[0], rel=1e-12)


def test_exact_margin_grad_at_the_poles_is_finite():
    # x equal to its class weight: c = 1 (theta = 0), where sin(theta) = 0 in the exact derivative
    w = torch.randn(4, 6, dtype=torch.float64)
    x = w[:2].clone().requires_grad_()
    loss = fkf.margin_cross_entropy(x, w, torch.tensor([0, 1]), "arcface", backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_curricular_t_is_the_closed_form_ema():
    alpha, steps = 0.05, 7
    head = fk.CurricularFace(6, 9, momentum=alpha, backend="reference").double()
    x = torch.randn(11, 6, dtype=torch.float64)
    y = torch.randint(0, 9, (11,))
    y[3] = -100
    with torch.no_grad():
        x_hat = x / x.norm(dim=1, keepdim=True)
        w_hat = head.weight / head.weight.norm(dim=1, keepdim=True)
        valid = y != -100
        mean_c = (x_hat[valid] * w_hat[y[valid]]).sum(1).mean().item()
    for _ in range(steps):
        head(x, y).backward()
    # t_k = (1 - (1 - alpha)^k) * mean_c when the cosines do not change between steps
    assert head.t.item() == pytest.approx((1 - (1 - alpha) ** steps) * mean_c, rel=1e-5, abs=1e-7)
    assert head.t.dtype == torch.float32 and "t" in head.state_dict()
    before = head.t.clone()
    head.eval()
    head(x, y)
    assert torch.equal(head.t, before)


def test_all_rows_ignored_and_empty_batch_give_zero():
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = fkf.margin_cross_entropy(x, w, torch.full((3,), -100), "cosface", backend="reference")
    loss.backward()
    assert loss.item() == 0 and torch.all(x.grad == 0) and torch.all(w.grad == 0)
    empty = fkf.margin_cross_entropy(x[:0], w, torch.zeros(0, dtype=torch.long), "arcface", backend="reference")
    assert empty.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_reference_is_close(dtype):
    x, w, y = _inputs(9, 11, 16, dtype=torch.float32)
    params = fk.head_params("arcface", s=64.0)
    want = ref_loss(x.double(), w.double(), y, params)
    got = ref_loss(x.to(dtype), w.to(dtype), y, params)
    assert got.dtype == torch.float32
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.5, torch.float16: 0.1}[dtype]
    assert abs(got.item() - want.item()) < tol * max(1.0, abs(want.item()))


@pytest.mark.parametrize("case", ["arcface", "combined_general", "curricular", "mv_arc", "cosface"])
def test_second_derivatives_match_the_oracle(case):
    # Hessian-vector products of the reference (phi' of _rowmath, differentiated again) against the oracle's
    # direct acos / cos formulas through autograd, in float64, away from the poles (where sin theta is floored)
    x, w, y = kit.head_inputs(6, 9, 5)
    params = kit.CASES[case].params(reduction="sum")
    v = torch.randn_like(x)

    def hvp(loss_fn):
        xa = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(xa), xa, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), xa)
        return h

    t0 = 0.2
    got = hvp(lambda a: fk.reference.eager_margin_cross_entropy(a, w, y, params, torch.tensor(t0), True))
    want = hvp(lambda a: oracle.head_loss(a, w, y, case, t=t0, reduction="sum")[0])
    kit.assert_close(got, want, rtol=1e-8, atol=1e-9, what=f"{case} Hessian-vector product")


def test_float16_rows_with_norms_beyond_float16_are_not_zero_vectors():
    # a float16 norm above 65504 is inf, and x / inf a zero vector: the reference normalises in float32
    x, w, y = kit.head_inputs(6, 11, 8, dtype=torch.float32)
    params = fk.head_params("arcface")
    big = (x / x.norm(dim=1, keepdim=True) * 7e4).half()  # norm 7e4 > 65504, every element finite
    got = ref_loss(big, w.half(), y, params)
    assert torch.isfinite(big).all() and torch.isfinite(got)
    kit.assert_close(got, ref_loss(big.float(), w.half().float(), y, params), rtol=2e-2, atol=2e-2,
                     what="float16 loss")  # fmt: skip
