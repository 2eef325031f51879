"""The fallback option of the angular-margin heads (``fallback=``) and the trainer presets (``like``).

Each head x fallback x margin_grad is checked against a float64 oracle written here from the definitions
(acos / cos with autograd, one ``torch.where`` per fallback), on rows placed on every branch: past the
fallback point (theta + m > pi), between the easy_margin and the monotonic thresholds, and ordinary rows.
"""

import math

import kit
import pytest
import torch
from peers import rows_with_target_cosines

import facekernels as fk
from facekernels import functional as fkf

M = 0.5
# target cosines: theta + m > pi (fallback rows: c < -cos m = -0.878), -0.878 < c < 0 (easy_margin alone
# differs), and c > 0
TARGET_COS = [-0.97, -0.93, -0.9, -0.6, -0.2, 0.1, 0.5, 0.8, 0.95, -0.95, 0.3]
FALLBACKS = ["monotonic", "none", "easy_margin", "facexzoo", 0.2]
HEADS = ["arcface", "combined", "curricular", "mv_arc"]


def oracle_loss(x, w, y, *, s, m, fallback, margin_grad, negatives="plain", t=0.0):
    """Mean cross-entropy of the margin logits, in float64 with autograd."""
    x_hat = x / x.norm(dim=1, keepdim=True)
    w_hat = w / w.norm(dim=1, keepdim=True)
    cos = x_hat @ w_hat.T
    rows = torch.arange(len(y))
    c = cos[rows, y]
    raw = torch.cos(torch.acos(c) + m)  # exact derivative through acos
    if fallback == "none":
        phi = raw
    elif fallback == "easy_margin":
        phi = torch.where(c > 0, raw, c)
    else:  # below cos(pi - m), theta + m > pi: c - offset
        offset = {"monotonic": math.sin(math.pi - m) * m, "facexzoo": 0.0}.get(fallback, fallback)
        phi = torch.where(c > math.cos(math.pi - m), raw, c - offset)
    if margin_grad == "straight_through":
        phi = c + (phi - c).detach()
    hard = cos.detach() > raw.detach().unsqueeze(1)  # tau = cos(theta + m) before any fallback
    if negatives == "mv":
        neg = torch.where(hard, (t + 1) * cos + t, cos)
    elif negatives == "curricular":
        neg = torch.where(hard, cos * (t + cos), cos)
    else:
        neg = cos
    onehot = torch.zeros_like(cos, dtype=torch.bool)
    onehot[rows, y] = True
    logits = s * torch.where(onehot, phi.unsqueeze(1), neg)
    return torch.nn.functional.cross_entropy(logits, y)


def make_head(kind, fallback, margin_grad, backend):
    common = dict(fallback=fallback, margin_grad=margin_grad, backend=backend)
    if kind == "arcface":
        return fk.ArcFace(5, 7, s=16.0, m=M, **common), dict(negatives="plain")
    if kind == "combined":
        return fk.CombinedMargin(5, 7, s=16.0, m1=1.0, m2=M, m3=0.0, **common), dict(negatives="plain")
    if kind == "mv_arc":
        return fk.MVSoftmax(5, 7, s=16.0, m=M, t=0.15, is_am=False, **common), dict(negatives="mv", t=0.15)
    head = fk.CurricularFace(5, 7, s=16.0, m=M, **common).eval()  # eval: t is read, not updated
    head.t.fill_(0.3)
    return head, dict(negatives="curricular", t=float(head.t))


def loss_and_grads(head, x, w, y):
    xa = x.clone().requires_grad_()
    with torch.no_grad():
        head.weight.copy_(w)
    head.weight.grad = None
    loss = head(xa, y)
    loss.backward()
    return loss, xa.grad, head.weight.grad


def check(kind, fallback, margin_grad, backend, dtype, tol):
    x, w, y = rows_with_target_cosines(TARGET_COS)
    head, extra = make_head(kind, fallback, margin_grad, backend)
    dev = kit.device(backend)
    head = head.to(dev, dtype)
    got = [a.cpu() for a in loss_and_grads(head, x.to(dev, dtype), w.to(dev, dtype), y.to(dev))]
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = oracle_loss(xa, wa, y, s=16.0, m=M, fallback=fallback, margin_grad=margin_grad, **extra)
    want.backward()
    for name, g, e in zip(("loss", "d embeddings", "d weight"), got, (want, xa.grad, wa.grad)):
        torch.testing.assert_close(g.double(), e.detach(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("fallback", FALLBACKS, ids=str)
@pytest.mark.parametrize("kind", HEADS)
def test_reference_float64(kind, fallback, margin_grad):
    check(kind, fallback, margin_grad, "reference", torch.float64, 1e-10)


@kit.needs_ext
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("fallback", FALLBACKS, ids=str)
@pytest.mark.parametrize("kind", HEADS)
def test_cpu_kernels(kind, fallback, margin_grad):
    check(kind, fallback, margin_grad, "cpu", torch.float64, 1e-10)
    check(kind, fallback, margin_grad, "cpu", torch.float32, 2e-4)


def _triton_runs():
    try:
        import facekernels.kernels.triton as th
    except Exception:
        return False
    return th._TRITON_IMPORT_ERROR is None and (torch.cuda.is_available() or th._INTERPRETED)


@pytest.mark.skipif(not _triton_runs(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("fallback", FALLBACKS, ids=str)
@pytest.mark.parametrize("kind", ["arcface", "curricular"])
def test_triton_kernels(kind, fallback):
    check(kind, fallback, "exact", "triton", torch.float32, 2e-4)


@pytest.mark.parametrize("kind", HEADS)
def test_default_is_the_published_fallback(kind):
    # fallback=None keeps what each head did before the option existed
    default, _ = make_head(kind, None, "exact", "reference")
    named, _ = make_head(kind, "easy_margin" if kind == "mv_arc" else "monotonic", "exact", "reference")
    assert default.params == named.params


def test_functional_takes_the_fallback_too():
    x, w, y = rows_with_target_cosines(TARGET_COS)
    head = fk.ArcFace(5, 7, fallback=0.2, backend="reference").double()
    with torch.no_grad():
        head.weight.copy_(w)
    got = fkf.margin_cross_entropy(x, w, y, "arcface", fallback=0.2, backend="reference")
    assert torch.equal(got, head(x, y))
    other = fkf.margin_cross_entropy(x, w, y, "arcface", backend="reference")
    assert not torch.equal(got, other)  # the fallback rows differ


def test_presets():
    ins = fk.ArcFace.like("insightface", 8, 10)
    assert ins.params == fk.CombinedMargin.like("insightface", 8, 10).params
    assert (ins.params.fallback, ins.params.margin_grad) == (fk._params.Fallback.NONE, "straight_through")
    fx = fk.ArcFace.like("facexzoo", 8, 10, backend="reference")
    assert (fx.params.s, fx.params.m2, fx.params.margin_am, fx.backend) == (32.0, 0.35, 0.0, "reference")
    assert fx.params.fallback == fk._params.Fallback.OFFSET
    assert fk.ArcFace.like("curricularface", 8, 10).params == fk.ArcFace(8, 10).params
    assert fk.ArcFace.like("pytorch-metric-learning", 8, 10).params.m2 == math.radians(28.6)
    assert fk.CurricularFace.like("tface", 8, 10).params.momentum == 0.1
    assert fk.MVSoftmax.like("facexzoo", 8, 10, is_am=False).params.mv_t == 0.12
    assert fk.CosFace.like("insightface", 8, 10).params.m3 == 0.4
    with pytest.raises(ValueError, match="preset must be one of"):
        fk.ArcFace.like("insight", 8, 10)
    with pytest.raises(ValueError, match="NormSoftmax has no presets"):
        fk.NormSoftmax.like("insightface", 8, 10)
