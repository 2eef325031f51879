"""The eager reference triplet loss against brute-force loops over every (a, p, n), the equivalences of
triplet.md with pytorch-metric-learning, and degenerate batches."""

import itertools

import kit
import oracle
import pytest
import torch
from pytorch_metric_learning import losses, miners  # a test extra, installed by .ci/run

from facekernels import TripletMarginLoss
from facekernels import functional as fkf
from facekernels.reference.triplet import pairwise_distances

MODES = ["semihard", "hard", "all"]
DISTANCES = ["squared_euclidean", "euclidean", "cosine"]
REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]


ALL_OPTIONS = list(itertools.product(MODES, DISTANCES, [True, False], [False, True], REDUCTIONS))


@pytest.mark.parametrize("mining,distance,normalize,soft,reduction", ALL_OPTIONS)
def test_reference_matches_brute_force(mining, distance, normalize, soft, reduction):
    e, y = kit.triplet_inputs(11, 3)
    opts = dict(margin=0.3, mining=mining, distance=distance, normalize=normalize, soft=soft, reduction=reduction)
    e_ref, e_orc = e.clone().requires_grad_(), e.clone().requires_grad_()
    got = fkf.triplet_margin_loss(e_ref, y, backend="reference", **opts)
    want = oracle.triplet_loss(e_orc, y, **opts)
    if reduction == "none":
        (got, got_idx), (want, want_idx) = got, want
        assert got_idx.dtype == torch.int64 and got_idx.shape == (len(want), 3)
        assert torch.equal(got_idx, want_idx)
    kit.assert_close(got, want, rtol=1e-9, atol=1e-10, what="loss")
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (want * g).sum().backward()
    kit.assert_close(e_ref.grad, e_orc.grad, rtol=1e-7, atol=1e-9, what="d embeddings")


def test_ties_go_to_the_lowest_index():
    # anchor 0; positives 1 and 2 at the same distance; negatives 3 and 4 at the same distance
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1])
    terms, idx = fkf.triplet_margin_loss(e, y, mining="hard", normalize=False, reduction="none", backend="reference")
    assert idx[0].tolist() == [0, 1, 3]
    e.requires_grad_()
    loss = fkf.triplet_margin_loss(e, y, margin=10.0, mining="hard", normalize=False, reduction="sum",
                                   backend="reference")  # fmt: skip
    loss.backward()
    # anchor 0's term sends gradient to p = 1 and n = 3 only, not to their tied twins 2 and 4;
    # every other anchor's term involves other rows, so isolate anchor 0 by its own contribution
    e2 = e.detach().clone().requires_grad_()
    terms, idx = fkf.triplet_margin_loss(e2, y, margin=10.0, mining="hard", normalize=False, reduction="none",
                                         backend="reference")  # fmt: skip
    terms[0].backward()
    assert e2.grad[2].abs().sum() == 0 and e2.grad[4].abs().sum() == 0
    assert e2.grad[1].abs().sum() > 0 and e2.grad[3].abs().sum() > 0


def test_semihard_picks_closest_farther_negative_then_fallback():
    e = torch.tensor([[0.0], [1.0], [1.5], [3.0], [0.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    terms, idx = fkf.triplet_margin_loss(e, y, mining="semihard", distance="euclidean", normalize=False,
                                         margin=0.1, reduction="none", backend="reference")  # fmt: skip
    # (a=0, p=1): d_ap = 1; negatives at 1.5, 3.0, 0.5 -> the closest one farther than 1 is 2 (1.5)
    # (a=1, p=0): d_ap = 1; negatives at 0.5, 2.0, 0.5 -> farther: 3 (2.0)
    assert idx[:2].tolist() == [[0, 1, 2], [1, 0, 3]]
    kit.assert_close(terms[:2], torch.tensor([max(1 - 1.5 + 0.1, 0), max(1 - 2.0 + 0.1, 0)]), rtol=1e-12,
                     atol=1e-15, what="terms")  # fmt: skip
    # no negative is farther than d_ap: the farthest one is used
    e = torch.tensor([[0.0], [5.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    _, idx = fkf.triplet_margin_loss(e, y, mining="semihard", normalize=False, reduction="none", backend="reference")
    assert idx[0].tolist() == [0, 1, 3]


@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("labels", [[], [0], [0, 1], [0, 0], [3, 3, 3, 3], [0, 1, 2, 3, 4]])
def test_degenerate_batches_give_zero_with_zero_gradient(mining, labels):
    e = torch.randn(len(labels), 4, dtype=torch.float64, requires_grad=True)
    loss = fkf.triplet_margin_loss(e, torch.tensor(labels, dtype=torch.long), mining=mining, backend="reference")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(e.grad == 0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_embeddings_give_finite_gradients(distance):
    e = torch.randn(6, 4, dtype=torch.float64)
    e[1] = e[0]
    e[4] = e[2]
    e.requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    for mining in MODES:
        loss = fkf.triplet_margin_loss(e, y, mining=mining, distance=distance, backend="reference")
        (g,) = torch.autograd.grad(loss, e)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_uneven_classes_module_form():
    e, y = kit.triplet_inputs(17, 4, dtype=torch.float32)
    y[:9] = 0
    loss = TripletMarginLoss(mining="all", backend="reference")(e, y)
    want = oracle.triplet_loss(e, y, mining="all")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [30.0, 1.5e4])  # norms ~240 (squared past float16's 65504) and ~1.2e5
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.slow
def test_half_inputs_compute_in_float32(dtype, scale, distance, normalize):
    # float16 norms and squared distances overflowed (NaN loss without normalisation, zero rows with it) and
    # the terms were rounded to the input dtype (a margin of 0.19995); they are computed in float32 now
    e = (scale * kit.triplet_inputs(11, 3, 64)[0]).to(dtype)
    assert torch.isfinite(e).all()
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    # float32 distances of rounded inputs: relative error ~1e-6 of the largest distance
    atol = 1e-5 * float(pairwise_distances(e.double(), distance, normalize).max())
    for mining in MODES:
        opts = dict(margin=0.2, mining=mining, distance=distance, normalize=normalize, reduction="mean")
        e_half, e_orc = e.clone().requires_grad_(), e.double().requires_grad_()
        got = fkf.triplet_margin_loss(e_half, y, backend="reference", **opts)
        want = oracle.triplet_loss(e_orc, y, **opts)
        assert got.dtype == torch.float32
        kit.assert_close(got, want, rtol=1e-5, atol=atol, what=f"{mining} loss")
        got.backward()
        want.backward()
        assert e_half.grad.dtype == dtype
        # the gradient is rounded to the input dtype: 2^-8 relative for bfloat16, and float16's subnormal
        # spacing 2^-24 where it is tiny (normalised rows of norm 1e5)
        atol_grad = 1e-3 * float(e_orc.grad.abs().max()) + 2**-24
        kit.assert_close(e_half.grad, e_orc.grad, rtol=1e-2, atol=atol_grad, what=f"{mining} gradient")


# ------------------------------------------------------------------ pytorch-metric-learning equivalences


def test_batch_all_mean_nonzero_equals_pml():
    e, y = kit.triplet_inputs(23, 4, features=8)
    got = fkf.triplet_margin_loss(e, y, margin=0.2, mining="all", distance="euclidean", normalize=True,
                                  reduction="mean_nonzero", backend="reference")  # fmt: skip
    want = losses.TripletMarginLoss(margin=0.2)(e, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_batch_hard_mean_nonzero_equals_pml():
    e, y = kit.triplet_inputs(23, 4, features=8)
    got = fkf.triplet_margin_loss(e, y, margin=0.2, mining="hard", distance="euclidean", normalize=True,
                                  reduction="mean_nonzero", backend="reference")  # fmt: skip
    miner = miners.BatchHardMiner()
    want = losses.TripletMarginLoss(margin=0.2)(e, y, miner(e, y))
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def _tfa_semihard(e, y, margin, squared):
    """TF-Addons triplet_semihard_loss, re-derived from its documented algorithm in float64 numpy-style
    torch: for each positive pair the smallest negative distance above d_ap, else the largest negative
    distance of the anchor; mean of max(d_ap - d_an + margin, 0) over positive pairs."""
    n = len(y)
    diff = e.unsqueeze(1) - e.unsqueeze(0)
    d = (diff * diff).sum(-1)
    if not squared:
        d = d.clamp_min(0).sqrt()
    total, count = 0.0, 0
    for a in range(n):
        negs = [float(d[a, q]) for q in range(n) if y[q] != y[a]]
        for p in range(n):
            if p == a or y[p] != y[a]:
                continue
            above = [v for v in negs if v > float(d[a, p])]
            d_an = min(above) if above else max(negs)
            total += max(float(d[a, p]) - d_an + margin, 0.0)
            count += 1
    return total / count


@pytest.mark.parametrize("distance,squared", [("euclidean", False), ("squared_euclidean", True)])
def test_semihard_equals_tfa(distance, squared):
    e, y = kit.triplet_inputs(19, 3, features=6)
    got = fkf.triplet_margin_loss(e, y, margin=0.5, mining="semihard", distance=distance, normalize=False,
                                  reduction="mean", backend="reference")  # fmt: skip
    assert got.item() == pytest.approx(_tfa_semihard(e, y, 0.5, squared), rel=1e-9)
