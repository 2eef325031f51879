"""Each trainer's head, configured here as docs/migration.md says, against that trainer's formulas.

The trainers' heads are re-implemented in float64 in tests/peers.py (from their published code; file and
lines there). For every case: the same per-row losses, the same mean loss and the same gradients on the
embeddings and on the class weights (in the trainer's layout), on rows placed on every branch: past the
fallback point (theta + m > pi), between the easy_margin and fallback thresholds, below the MV-AM margin,
ordinary rows, with hard negatives for MV-Softmax and CurricularFace. Backends: the eager reference and the
compiled CPU kernels, both in float64.
"""

import dataclasses
import math

import kit
import peers
import pytest
import torch

import facekernels as fk

BACKENDS = kit.FLOAT64_BACKENDS

TARGET_COS = [-0.97, -0.93, -0.9, -0.6, -0.2, 0.1, 0.3, 0.5, 0.8, 0.95, -0.95, 0.34, 0.36]
CLASSES, FEATURES = 11, 6


def _their(weight, transposed):
    return (weight.T if transposed else weight).detach().clone().requires_grad_()


# name -> (peer loss(x, their weight, y, reduction), their layout is (d, C), our head(backend),
#          the fallback point: rows with a target cosine below it are past it)
CASES = {
    # insightface arcface_torch, CombinedMarginLoss(s, 1.0, 0.5, 0.0): no fallback, straight-through.
    # s = 24 keeps every row below its loss floor -log(1e-30) = 69.1 (s (1 + 1 + m3) + log C < 69)
    "insightface_arcface": (
        lambda x, w, y, r: peers.insightface(x, w, y, s=24.0, m1=1.0, m2=0.5, m3=0.0, reduction=r), False,
        lambda b: fk.CombinedMargin.like("insightface", FEATURES, CLASSES, s=24.0, backend=b), math.cos(math.pi - 0.5),
    ),  # fmt: skip
    "insightface_arcface_as_ArcFace": (
        lambda x, w, y, r: peers.insightface(x, w, y, s=24.0, m1=1.0, m2=0.5, m3=0.0, reduction=r), False,
        lambda b: fk.ArcFace.like("insightface", FEATURES, CLASSES, s=24.0, backend=b), math.cos(math.pi - 0.5),
    ),  # fmt: skip
    # CombinedMarginLoss(s, 1.0, 0.0, 0.4): CosFace; with m3 > 0 it ignores m1 and m2 (here 0.5): CosFace(m3)
    "insightface_cosface": (
        lambda x, w, y, r: peers.insightface(x, w, y, s=24.0, m1=1.0, m2=0.5, m3=0.4, reduction=r), False,
        lambda b: fk.CosFace(FEATURES, CLASSES, s=24.0, m=0.4, backend=b), None,
    ),  # fmt: skip
    "insightface_cosface_as_CombinedMargin": (
        lambda x, w, y, r: peers.insightface(x, w, y, s=24.0, m1=1.0, m2=0.0, m3=0.4, reduction=r), False,
        lambda b: fk.CombinedMargin(FEATURES, CLASSES, s=24.0, m1=1.0, m2=0.0, m3=0.4, backend=b), None,
    ),  # fmt: skip
    # the official CurricularFace repository's ArcFace (= TFace's): our defaults
    "curricularface_arcface": (
        lambda x, w, y, r: peers.curricularface_arcface(x, w, y, reduction=r), True,
        lambda b: fk.ArcFace(FEATURES, CLASSES, backend=b), math.cos(math.pi - 0.5),
    ),  # fmt: skip
    # FaceX-Zoo ArcFace (margin_arc 0.35, margin_am 0 then 0.2, scale 32)
    "facexzoo_arcface": (
        lambda x, w, y, r: peers.facexzoo_arcface(x, w, y, reduction=r), True,
        lambda b: fk.ArcFace.like("facexzoo", FEATURES, CLASSES, backend=b), math.cos(math.pi - 0.35),
    ),  # fmt: skip
    "facexzoo_arcface_margin_am": (
        lambda x, w, y, r: peers.facexzoo_arcface(x, w, y, margin_am=0.2, reduction=r), True,
        lambda b: fk.ArcFace(FEATURES, CLASSES, s=32.0, m=0.35, fallback=0.2, backend=b), math.cos(math.pi - 0.35),
    ),  # fmt: skip
    # FaceX-Zoo MV_Softmax (margin 0.35, mv_weight 1.12 = t + 1, scale 32); the AM variant falls back below m,
    # the Arc one below 0
    "facexzoo_mv_am": (
        lambda x, w, y, r: peers.facexzoo_mv_softmax(x, w, y, is_am=True, reduction=r), True,
        lambda b: fk.MVSoftmax.like("facexzoo", FEATURES, CLASSES, backend=b), 0.35,
    ),  # fmt: skip
    "facexzoo_mv_arc": (
        lambda x, w, y, r: peers.facexzoo_mv_softmax(x, w, y, is_am=False, reduction=r), True,
        lambda b: fk.MVSoftmax(FEATURES, CLASSES, s=32.0, m=0.35, t=0.12, is_am=False, backend=b), 0.0,
    ),  # fmt: skip
    # pytorch-metric-learning ArcFaceLoss (margin 28.6 degrees, scale 64) and CosFaceLoss (0.35, 64)
    "pml_arcface": (
        lambda x, w, y, r: peers.pml_arcface(x, w, y, reduction=r), True,
        lambda b: fk.ArcFace.like("pytorch-metric-learning", FEATURES, CLASSES, backend=b),
        math.cos(math.pi - math.radians(28.6)),
    ),  # fmt: skip
    "pml_cosface": (
        lambda x, w, y, r: peers.pml_cosface(x, w, y, reduction=r), True,
        lambda b: fk.CosFace.like("pytorch-metric-learning", FEATURES, CLASSES, backend=b), None,
    ),  # fmt: skip
}


def _compare(got_rows, got_loss, got_dx, got_dw, want_rows, want_loss, want_dx, want_dw):
    tol = dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(got_rows.detach(), want_rows.detach(), **tol)
    torch.testing.assert_close(got_loss.detach(), want_loss.detach(), **tol)
    torch.testing.assert_close(got_dx, want_dx, **tol, msg=lambda m: f"d embeddings: {m}")
    torch.testing.assert_close(got_dw, want_dw, **tol, msg=lambda m: f"d weight: {m}")


def _ours(head, x, w, y):
    """(per-row losses, mean loss, d x, d weight) of our head in float64; the per-row losses come from a second
    forward in eval mode, so that CurricularFace's t is the one the first (training) forward used."""
    head = head.double()
    with torch.no_grad():
        head.weight.copy_(w)
    xa = x.clone().requires_grad_()
    head.weight.grad = None
    loss = head(xa, y)
    loss.backward()
    params, training = head.params, head.training
    head.params = dataclasses.replace(params, reduction="none")
    try:
        with torch.no_grad():
            rows = head.eval()(x, y)
    finally:
        head.params = params
        head.train(training)
    return rows, loss, xa.grad, head.weight.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_same_loss_and_gradients_as_the_peer(name, backend):
    peer, transposed, make_head, fallback_point = CASES[name]
    x, w, y = peers.rows_with_target_cosines(TARGET_COS, classes=CLASSES, features=FEATURES)
    if fallback_point is not None:  # the inputs reach the fallback branch, and the ordinary one
        assert min(TARGET_COS) < fallback_point < max(TARGET_COS)
    head = make_head(backend)

    want_rows = peer(x, _their(w, transposed), y, "none")
    if name.startswith("insightface"):  # insightface floors p_target at 1e-30 (a value-only change): not reached
        assert float(want_rows.detach().max()) < -math.log(peers.LOG_FLOOR)
    xa, wa = x.clone().requires_grad_(), _their(w, transposed)
    want_loss = peer(xa, wa, y, "mean")
    want_loss.backward()
    want_dw = wa.grad.T if transposed else wa.grad
    _compare(*_ours(head, x, w, y), want_rows, want_loss, xa.grad, want_dw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset, alpha", [("curricularface", 0.01), ("tface", 0.1), ("facexzoo", 0.01)])
def test_curricularface_over_steps(preset, alpha, backend):
    # three training steps on one head, the weight moved between them as an optimizer would: each step gives
    # the peer's loss and gradients from the same t before it (t is updated first, then read by the negatives),
    # and leaves the peer's t after it (both float32 buffers; 1e-7: the compiled update may round differently)
    head = fk.CurricularFace.like(preset, FEATURES, CLASSES, backend=backend)
    x, w, y = peers.rows_with_target_cosines(TARGET_COS, classes=CLASSES, features=FEATURES)
    for step in range(3):
        w = w + 0.3 * torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        t_before = head.t.item()
        xa, wa = x.clone().requires_grad_(), _their(w, True)
        loss_want, t_want = peers.curricularface(xa, wa, y, t_before, alpha=alpha)
        loss_want.backward()
        rows_want, _ = peers.curricularface(x, _their(w, True), y, t_before, alpha=alpha, reduction="none")
        _compare(*_ours(head, x, w, y), rows_want, loss_want, xa.grad, wa.grad.T)
        assert head.t.item() == pytest.approx(t_want, abs=1e-7) and t_want != t_before


@pytest.mark.parametrize("backend", BACKENDS)
def test_curricularface_t_update_matches(backend):
    # the update itself: one training forward from t moves it to the peer's t (float32 buffer on both sides)
    head = fk.CurricularFace(FEATURES, CLASSES, backend=backend).double()
    x, w, y = peers.rows_with_target_cosines(TARGET_COS, classes=CLASSES, features=FEATURES)
    with torch.no_grad():
        head.weight.copy_(w)
        head.t.fill_(0.2)
    _, t_want = peers.curricularface(x, _their(w, True), y, float(head.t))
    head(x, y)
    assert head.t.item() == pytest.approx(t_want, abs=1e-7)


def test_pytorch_metric_learning_itself():
    # the re-implementation against the installed library (when it is there): ArcFaceLoss and CosFaceLoss
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, w, y = peers.rows_with_target_cosines(TARGET_COS, classes=CLASSES, features=FEATURES)
    for cls, mine in [(losses.ArcFaceLoss, peers.pml_arcface), (losses.CosFaceLoss, peers.pml_cosface)]:
        loss_fn = cls(num_classes=CLASSES, embedding_size=FEATURES).double()
        loss_fn.load_state_dict({"W": w.T.clone()})
        xa = x.clone().requires_grad_()
        theirs = loss_fn(xa, y)
        theirs.backward()
        xb = x.clone().requires_grad_()
        ours = mine(xb, w.T, y)
        ours.backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-12)
