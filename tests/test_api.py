"""The public API of the API contract (README "Use", docs/): names, defaults, dispatch and argument validation."""

import pytest
import torch

import facekernels as fk
from facekernels import functional as fkf
from facekernels._backends import head_kernels

HEADS = list(fk.heads.HEAD_CLASSES.values())  # every head of the registry


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_head_owns_its_weight_and_returns_the_loss(cls):
    head = cls(130, 301, backend="reference")
    k = head.params.subcenters
    assert isinstance(head.weight, torch.nn.Parameter) and head.weight.shape == (301 * k, 130)
    if cls.unit_norm_init:
        assert torch.allclose(head.weight.norm(dim=1), torch.ones(301 * k))
    else:
        assert abs(head.weight.std().item() - 0.01) < 1e-3 and abs(head.weight.mean().item()) < 1e-3
    x, y = torch.randn(7, 130), torch.randint(0, 301, (7,))
    loss = head(x, y)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    head.params = fk.head_params(head.head, reduction="none", **head.margins)
    assert head(x, y).shape == (7,)
    assert repr(head).startswith(cls.__name__)


def test_published_defaults():
    assert fk.ArcFace(2, 2).params == fk.head_params("arcface", s=64.0, m=0.5)
    assert fk.ArcFace(2, 2).params.m2 == 0.5 and fk.ArcFace(2, 2).params.s == 64.0
    assert fk.CosFace(2, 2).params.m3 == 0.35
    mv = fk.MVSoftmax(2, 2).params
    assert (mv.s, mv.m3, mv.mv_t) == (32.0, 0.35, 0.2)
    cf = fk.CurricularFace(2, 2)
    assert (cf.params.s, cf.params.m2, cf.params.momentum) == (64.0, 0.5, 0.01)
    assert cf.t.shape == () and cf.t.dtype == torch.float32 and cf.t.item() == 0.0
    tl = fk.TripletMarginLoss()
    assert (tl.margin, tl.mining, tl.distance, tl.normalize, tl.soft, tl.reduction, tl.backend) == (
        0.2, "semihard", "squared_euclidean", True, False, "mean", "auto")  # fmt: skip


def test_functional_equals_module():
    head = fk.CurricularFace(16, 9, m=0.4, momentum=0.1, backend="reference")
    x, y = torch.randn(5, 16), torch.randint(0, 9, (5,))
    t = torch.zeros(())
    got = fkf.margin_cross_entropy(x, head.weight, y, "curricular", t=t, m=0.4, momentum=0.1, backend="reference")
    want = head(x, y)
    assert torch.equal(got, want) and torch.equal(t, head.t)
    mv = fk.MVSoftmax(16, 9, t=0.3, is_am=False, backend="reference")
    got = fkf.margin_cross_entropy(x, mv.weight, y, "mv_softmax", t=0.3, is_am=False, backend="reference")
    assert torch.equal(got, mv(x, y))


def test_unavailable_backends_raise_not_fall_back():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(fk.BackendUnavailableError, match="no head backend for meta"):
        head_kernels("auto", torch.device("meta"))
    with pytest.raises(fk.BackendUnavailableError, match="CUDA tensors"):
        fk.TripletMarginLoss(backend="cuda")(x, y)


def test_one_backend_vocabulary_names_the_other_losss_gpu_backend():
    # each name is one implementation (facekernels._params.BACKENDS); the heads' GPU kernels are "triton", the
    # triplet loss's "cuda": either loss, given the other's name, says which name it uses
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for make in (lambda: fk.ArcFace(4, 3, backend="cuda"), lambda: fkf.margin_cross_entropy(
            x, torch.randn(3, 4), y, backend="cuda")):  # fmt: skip
        with pytest.raises(ValueError, match="backend='cuda' is not a backend of the heads; its GPU kernels are "
                                             "backend='triton'"):  # fmt: skip
            make()
    with pytest.raises(ValueError, match="backend='triton' is not a backend of the triplet loss; its GPU kernels "
                                         "are backend='cuda'"):  # fmt: skip
        fk.TripletMarginLoss(backend="triton")
    head = fk.ArcFace(4, 3, backend="reference")
    with pytest.raises(ValueError, match="its GPU kernels are backend='triton'"):
        head.backend = "cuda"
    assert head.backend == "reference"


# (callable, exception, words the message must contain)
BAD_CONSTRUCTORS = [
    (lambda: fk.ArcFace(0, 10), ValueError, "in_features"),
    (lambda: fk.ArcFace(8, 0), ValueError, "num_classes"),
    (lambda: fk.ArcFace(8.0, 10), TypeError, "in_features"),
    (lambda: fk.ArcFace(8, 10, s=0.0), ValueError, "s must"),
    (lambda: fk.ArcFace(8, 10, s=float("nan")), ValueError, "s must"),
    (lambda: fk.ArcFace(8, 10, m=-0.1), ValueError, "m must"),
    (lambda: fk.ArcFace(8, 10, m=3.2), ValueError, "m must"),
    (lambda: fk.ArcFace(8, 10, easy_margin=1), TypeError, "easy_margin"),
    (lambda: fk.CosFace(8, 10, m=-0.35), ValueError, "m must"),
    (lambda: fk.CombinedMargin(8, 10, m1=0.0), ValueError, "m1"),
    (lambda: fk.CombinedMargin(8, 10, m3=-1.0), ValueError, "m3"),
    (lambda: fk.MVSoftmax(8, 10, t=-0.2), ValueError, "t must"),
    (lambda: fk.CurricularFace(8, 10, momentum=1.5), ValueError, "momentum"),
    (lambda: fk.ArcFace(8, 10, reduction="avg"), ValueError, "reduction"),
    (lambda: fk.ArcFace(8, 10, margin_grad="ste"), ValueError, "margin_grad"),
    (lambda: fk.ArcFace(8, 10, backend="cuda"), ValueError, "backend"),
    (lambda: fk.ArcFace(8, 10, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: fk.ArcFace(8, 10, fallback="insightface"), ValueError, "fallback must be one of"),
    (lambda: fk.ArcFace(8, 10, fallback=-0.1), ValueError, "fallback must be"),
    (lambda: fk.ArcFace(8, 10, fallback=float("inf")), ValueError, "fallback must be"),
    (lambda: fk.ArcFace(8, 10, fallback=True), TypeError, "fallback"),
    (lambda: fk.ArcFace(8, 10, fallback=[0.1]), TypeError, "fallback"),
    (lambda: fk.ArcFace(8, 10, easy_margin=True, fallback="none"), ValueError, "easy_margin=True"),
    (lambda: fk.CombinedMargin(8, 10, m1=0.9, fallback="monotonic"), ValueError, "fallback applies"),
    (lambda: fk.CombinedMargin(8, 10, m3=0.2, fallback=0.0), ValueError, "fallback applies"),
    (lambda: fk.MVSoftmax(8, 10, is_am=True, fallback="none"), ValueError, "fallback applies"),
    (lambda: fk.CosFace(8, 10, fallback="none"), TypeError, "fallback"),
    (lambda: fk.ArcFace.like("arcface", 8, 10), ValueError, "preset"),
    (lambda: fk.ArcFace.like("insightface", 8, 10, fallback="bad"), ValueError, "fallback"),
    (lambda: fk.TripletMarginLoss(margin=-1.0), ValueError, "margin"),
    (lambda: fk.TripletMarginLoss(mining="easy"), ValueError, "mining"),
    (lambda: fk.TripletMarginLoss(distance="l1"), ValueError, "distance"),
    (lambda: fk.TripletMarginLoss(reduction="max"), ValueError, "reduction"),
    (lambda: fk.TripletMarginLoss(backend="triton"), ValueError, "backend"),
    (lambda: fk.TripletMarginLoss(normalize="yes"), TypeError, "normalize"),
]


@pytest.mark.parametrize("i", range(len(BAD_CONSTRUCTORS)))
def test_bad_constructor_arguments(i):
    fn, exc, words = BAD_CONSTRUCTORS[i]
    with pytest.raises(exc, match=words):
        fn()


def _head():
    return fk.ArcFace(8, 10, backend="reference")


BAD_FORWARDS = [
    (lambda h: h(torch.randn(4, 8), torch.tensor([0, 1, 2, 10])), ValueError, r"labels must lie in \[0, 10\)"),
    (lambda h: h(torch.randn(4, 8), torch.tensor([0, 1, 2, -3])), ValueError, "labels must lie"),
    (lambda h: h(torch.randn(4, 8), torch.tensor([0.0, 1, 2, 3])), TypeError, "labels must be an int64"),
    (lambda h: h(torch.randn(4, 8), torch.tensor([0, 1, 2])), ValueError, "labels must have shape"),
    (lambda h: h(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda h: h(torch.randn(4, 7), torch.zeros(4, dtype=torch.long)), ValueError, "embeddings must have 8 features"),
    (lambda h: h(torch.randn(4, 8, 1), torch.zeros(4, dtype=torch.long)), ValueError, "embeddings must be 2-D"),
    (lambda h: h(torch.randint(0, 3, (4, 8)), torch.zeros(4, dtype=torch.long)), TypeError, "embeddings must be float"),
    (lambda h: h([[0.0] * 8], torch.zeros(1, dtype=torch.long)), TypeError, "embeddings must be a torch.Tensor"),
]


@pytest.mark.parametrize("i", range(len(BAD_FORWARDS)))
def test_bad_forward_inputs(i):
    fn, exc, words = BAD_FORWARDS[i]
    with pytest.raises(exc, match=words):
        fn(_head())


def test_curricular_t_argument_is_checked():
    w, x, y = torch.randn(5, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="t is required"):
        fkf.margin_cross_entropy(x, w, y, "curricular", backend="reference")
    with pytest.raises(ValueError, match="0-dim float32"):
        fkf.margin_cross_entropy(x, w, y, "curricular", t=torch.zeros(1), backend="reference")
    with pytest.raises(ValueError, match="only an argument"):
        fkf.margin_cross_entropy(x, w, y, "arcface", t=0.2, backend="reference")
    with pytest.raises(TypeError, match="unexpected argument"):
        fkf.margin_cross_entropy(x, w, y, "cosface", m2=0.1, backend="reference")


def test_label_checks_can_be_turned_off():
    h = _head()
    fk.set_label_checks(False)
    try:
        h(torch.randn(2, 8), torch.tensor([0, 1]))  # still fine; the range check is skipped, not the rest
        with pytest.raises(ValueError, match="labels must have shape"):
            h(torch.randn(2, 8), torch.tensor([0]))
    finally:
        fk.set_label_checks(True)


def test_triplet_bad_inputs():
    with pytest.raises(ValueError, match="labels must have shape"):
        fkf.triplet_margin_loss(torch.randn(4, 3), torch.tensor([0, 1]), backend="reference")
    with pytest.raises(TypeError, match="labels must be an int64"):
        fkf.triplet_margin_loss(torch.randn(4, 3), torch.randn(4), backend="reference")


@pytest.mark.slow
def test_heads_compile_fullgraph_with_the_reference_backend():
    # dispatch and validation must not break the graph (no importlib, no host-side label check)
    head = fk.CurricularFace(16, 37, backend="reference")
    x, y = torch.randn(9, 16, requires_grad=True), torch.randint(0, 37, (9,))
    compiled = torch.compile(head, fullgraph=True)
    loss = compiled(x, y)
    loss.backward()
    t_after_compiled = head.t.clone()
    head.t.zero_()
    x_eager = x.detach().clone().requires_grad_()
    want = head(x_eager, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, x_eager.grad)
    torch.testing.assert_close(t_after_compiled, head.t)


def test_device_mismatch_is_a_value_error():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="one device"):
        fkf.margin_cross_entropy(x, torch.randn(5, 4, device="meta"), y, "arcface", backend="reference")
    with pytest.raises(ValueError, match="one device"):
        fkf.triplet_margin_loss(x, y.to("meta"), backend="reference")
    with pytest.raises(ValueError, match="device of embeddings"):
        fkf.margin_cross_entropy(x, torch.randn(5, 4), y, "curricular", t=torch.zeros((), device="meta"),
                                 backend="reference")  # fmt: skip
