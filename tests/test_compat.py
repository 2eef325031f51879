"""facekernels.compat: the one-import-line drop-ins, against the peers in float64.

- pytorch-metric-learning (installed: a test dependency): its ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss and
  NormalizedSoftmaxLoss directly, built with the same constructor call, our loss loading its state dict
  strictly (and it ours): the same loss and gradients on the embeddings and on W, on rows spread over both
  sides of the fallback point theta = pi - m.
- insightface arcface_torch (not a package): an independent float64 oracle below (_insightface_oracle),
  written from partial_fc_v2.py and losses.py @7fadd42 (PartialFC_V2.forward, DistCrossEntropyFunc,
  CombinedMarginLoss / ArcFace / CosFace): the global batch's cosines clamped to [-1, 1] over the classes each
  rank keeps, inter-class filtering, the margin written into the logits without gradient, the mean of
  -log(max(p_target, 1e-30)) with the plain cross-entropy's gradient, the local embeddings' gradient world x
  d(loss)/d(local rows) (their AllGather backward). PartialFC_V2 runs in 1, 2 and 4 gloo processes (one
  spawned group per world size, every scenario in it), sample_rate 1 and < 1 (both sampling the same classes
  after the same seed).
"""

from __future__ import annotations

import datetime
import io
import math
import os
import time

import kit
import peers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from facekernels.compat import insightface as fi
from facekernels.compat import pml as fp
from facekernels.sharded import shard_range

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
BACKENDS = kit.FLOAT64_BACKENDS

# float64 comparisons: the two sides reassociate sums differently; 1e-11 of the largest value is ~5e4 ulps,
# far above that rounding and far below any formula difference (a margin of 1e-3 moves the loss by ~1e-2)
TOL64 = 1e-11


def _close64(got, want, what):
    scale = max(want.detach().abs().max().item() if want.numel() else 0.0, 1.0)
    err = kit.max_error(got, want)
    assert err <= TOL64 * scale, f"{what}: error {err:.3e} (scale {scale:.3g})"


# ------------------------------------------------------------------------------- pytorch-metric-learning

B, C, D, K = 37, 23, 19, 3  # no multiple of any tile or block size
PML_CASES = {
    "ArcFaceLoss": dict(margin=28.6, scale=64),
    "ArcFaceLoss_wide": dict(margin=50.0, scale=16),
    "CosFaceLoss": dict(margin=0.35, scale=64),
    "SubCenterArcFaceLoss": dict(margin=28.6, scale=64, sub_centers=K),
    "NormalizedSoftmaxLoss": dict(temperature=0.05),
}


def _pml_pair(case, dtype=torch.float64, backend="auto", **extra):
    """(theirs, ours) built with the same call (ours on ``backend``), ours holding their W (loaded strictly)."""
    name = case.split("_")[0]
    kwargs = dict(PML_CASES[case], **extra)
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kwargs).to(dtype)
    ours = getattr(fp, name)(num_classes=C, embedding_size=D, backend=backend, **kwargs).to(dtype)
    if name == "SubCenterArcFaceLoss":
        with torch.no_grad():  # sub-centers of one class close together: class cosines near -1 occur too
            w = theirs.W.view(D, C, K)
            w[:, : C // 2] = w[:, : C // 2, :1] + 0.1 * w[:, : C // 2]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _pml_inputs(theirs, seed, dtype=torch.float64):
    """Embeddings near +-3 x a column of W (targets over the whole range of cosines, past the fallback point
    included), labels, and how many rows lie past theta = pi - m."""
    g = torch.Generator().manual_seed(seed)
    w = theirs.W.detach().t().double()  # (C k, d)
    k = getattr(theirs, "sub_centers", 1)
    y = torch.randint(0, C, (B,), generator=g)
    pick = y * k + torch.randint(0, k, (B,), generator=g)
    sign = torch.where(torch.rand(B, generator=g) < 0.4, -1.0, 1.0).double().unsqueeze(1)
    noise = 0.25 * torch.randn(B, D, generator=g, dtype=torch.float64)
    x = sign * 3 * w[pick] / w[pick].norm(dim=1, keepdim=True) + noise
    x[:5] = torch.randn(5, D, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), y


def _grads(loss_fn, x, y):
    x = x.detach().clone().requires_grad_()
    loss_fn.W.grad = None
    loss = loss_fn(x, y)
    loss.backward()
    return loss.detach(), x.grad, loss_fn.W.grad.clone()


@pytest.fixture
def small_tiles(monkeypatch):
    from facekernels.kernels import cpu

    monkeypatch.setattr(cpu, "CLASS_TILE", 4)  # many class tiles, a ragged last one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PML_CASES))
def test_pml_losses_match_pml(case, backend, small_tiles):
    for seed in range(3):
        theirs, ours = _pml_pair(case, backend=backend)
        x, y = _pml_inputs(theirs, seed)
        if case.startswith("ArcFace") or case.startswith("SubCenter"):
            m = ours.margin
            with torch.no_grad():  # the fallback branch is taken by some rows, not by all
                cos = theirs.get_logits(x) / theirs.scale
                past = int((cos[torch.arange(B), y].clamp(-1, 1).acos() > math.pi - m).sum())
            assert 0 < past < B - 5, past
        got, want = _grads(ours, x, y), _grads(theirs, x, y)
        assert ours.W.grad.shape == theirs.W.grad.shape == (D, C * (K if "SubCenter" in case else 1))
        for what, a, b in zip(("loss", "dx", "dW"), got, want):
            _close64(a, b, f"{case} seed {seed} {what}")


@pytest.mark.parametrize("case", ["ArcFaceLoss", "CosFaceLoss", "SubCenterArcFaceLoss", "NormalizedSoftmaxLoss"])
@pytest.mark.slow
@kit.triton_on_cpu
def test_pml_triton_float32_error_ratio(case):
    """The Triton kernels (interpreted here) in float32, by the error-ratio rule against their float32 run,
    their float64 run being the oracle."""
    theirs64, ours = _pml_pair(case, torch.float32, backend="triton")
    theirs32 = getattr(pml_losses, case)(num_classes=C, embedding_size=D, **PML_CASES[case])
    theirs32.load_state_dict(theirs64.state_dict())
    theirs64 = theirs64.double()
    x, y = _pml_inputs(theirs64, 7)
    got, low, want = _grads(ours, x.float(), y), _grads(theirs32, x.float(), y), _grads(theirs64, x, y)
    for what, a, b, c in zip(("loss", "dx", "dW"), got, low, want):
        kit.assert_error_ratio(a, b, c, what=f"{case} {what}")


@pytest.mark.parametrize("case", ["ArcFaceLoss", "SubCenterArcFaceLoss"])
def test_pml_state_dicts_load_strictly_both_ways_and_w_rows_stay_contiguous(case):
    theirs, ours = _pml_pair(case, torch.float32)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["W"]
    assert ours.W.shape == theirs.W.shape
    # W is (d, C k) over (C k, d) row-major storage: the kernels read W.t() in place, no copy
    assert ours.W.t().is_contiguous() and not ours.W.is_contiguous()
    assert torch.equal(ours.W, theirs.W)
    again = getattr(pml_losses, case)(num_classes=C, embedding_size=D, **PML_CASES[case])
    again.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(again.W, ours.W)
    # the layout survives casts, moves, a backward and optimizer steps (state in W's layout)
    ours = ours.double()
    assert ours.W.t().is_contiguous() and ours.W.dtype == torch.float64
    opt = torch.optim.Adam(ours.parameters(), lr=0.1)
    x, y = _pml_inputs(theirs.double(), 3)
    for _ in range(2):
        opt.zero_grad()
        ours(x.detach(), y).backward()
        opt.step()
    assert ours.W.grad.t().is_contiguous() and ours.W.t().is_contiguous()
    assert opt.state[ours.W]["exp_avg"].shape == (D, ours.W.shape[1])
    torch.save(ours.state_dict(), buffer := io.BytesIO())
    buffer.seek(0)
    loaded = torch.load(buffer)
    again = getattr(pml_losses, case)(num_classes=C, embedding_size=D, **PML_CASES[case]).double()
    again.load_state_dict(loaded, strict=True)
    assert torch.equal(again.W, ours.W)


def test_pml_options_that_the_fused_loss_honours():
    from pytorch_metric_learning import reducers

    # SumReducer, weight_init_func, collect_stats (avg_angle), the margin and scale changed after construction
    theirs, ours = _pml_pair("ArcFaceLoss", reducer=reducers.SumReducer(), collect_stats=True)
    x, y = _pml_inputs(theirs, 11)
    for _ in range(2):
        for what, a, b in zip(("loss", "dx", "dW"), _grads(ours, x, y), _grads(theirs, x, y)):
            _close64(a, b, f"sum {what}")
        assert abs(ours.avg_angle - theirs.avg_angle) < 1e-9
        ours.margin = theirs.margin = math.radians(10.0)  # theirs holds the margin in radians after init
        ours.scale = theirs.scale = 30.0
    init = lambda w: torch.nn.init.constant_(w, 0.25)
    ours = fp.CosFaceLoss(C, D, weight_init_func=init)
    assert ours.W.shape == (D, C) and bool((ours.W == 0.25).all()) and ours.W.t().is_contiguous()
    # get_logits (theirs: scale x the cosines, no margin), for evaluation
    for case in ("ArcFaceLoss", "SubCenterArcFaceLoss", "NormalizedSoftmaxLoss"):
        theirs, ours = _pml_pair(case)
        x, _ = _pml_inputs(theirs, 12)
        _close64(ours.get_logits(x), theirs.get_logits(x), f"{case} get_logits")


def test_pml_arguments_the_fused_loss_cannot_honour_raise_naming_them():
    from pytorch_metric_learning import distances, reducers, regularizers

    x, y = torch.randn(4, D), torch.randint(0, C, (4,))
    loss = fp.ArcFaceLoss(C, D)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(x, y, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, y, ref_emb=x)
    with pytest.raises(ValueError, match="labels are required"):
        loss(x)
    bad = [
        (dict(reducer=reducers.AvgNonZeroReducer()), "reducer"),
        (dict(reducer=reducers.ThresholdReducer(low=0.1)), "reducer"),
        (dict(distance=distances.LpDistance()), "distance"),
        (dict(distance=distances.CosineSimilarity(power=2)), "distance"),
        (dict(weight_regularizer=regularizers.RegularFaceRegularizer()), "weight_regularizer"),
        (dict(embedding_regularizer=regularizers.LpRegularizer()), "embedding_regularizer"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            fp.ArcFaceLoss(C, D, **kwargs)
    with pytest.raises(ValueError, match="distance"):
        fp.NormalizedSoftmaxLoss(C, D, distance=distances.DotProductSimilarity(normalize_embeddings=False))
    with pytest.raises(TypeError):
        fp.CosFaceLoss(C, D, miner=None)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 23\\); found -100"):
        loss(x, torch.tensor([0, 1, -100, 2]))
    with pytest.raises(ValueError, match="margin"):
        fp.ArcFaceLoss(C, D, margin=180.0)
    # the defaults pass, as objects too
    fp.ArcFaceLoss(C, D, reducer=reducers.MeanReducer(), distance=distances.CosineSimilarity())
    fp.NormalizedSoftmaxLoss(C, D, distance=distances.DotProductSimilarity())


# ------------------------------------------------------------------------------------- insightface


def _insightface_oracle(x, w, y, kind, *, s, m2=0.0, m3=0.0, threshold=0.0, kept=None, floor=True):
    """What arcface_torch's PartialFC_V2 + margin + DistCrossEntropy compute, in float64, on one process.

    x (B, d) the global batch, w (C, d) every class, y (B,) global labels; ``kept``: the sorted global class
    ids used this step (the union of the ranks' samples; None: all); ``floor=False``: without the 1e-30 floor
    (to see that a case exercises it). Returns the loss (autograd to x and w).
    """
    classes = torch.arange(w.shape[0]) if kept is None else kept
    cos = (F.normalize(x) @ F.normalize(w[classes]).t()).clamp(-1, 1)
    column = torch.searchsorted(classes, y)
    assert bool((classes[column] == y).all()), "every positive is kept"
    target = F.one_hot(column, len(classes)).bool()
    if threshold > 0:  # dirty non-target classes: their cosine times 0 (logit 0, no gradient)
        cos = cos * (target | (cos.detach() <= threshold)).to(cos.dtype)
    if kind == "arc":  # acos, + m2 on the target, cos: values only (under no_grad there)
        logits = cos + (torch.where(target, torch.cos(torch.acos(cos.detach()) + m2), cos.detach()) - cos.detach())
    else:
        logits = torch.where(target, cos - m3, cos)
    logits = s * logits
    p = torch.softmax(logits, dim=1)[target]
    # their forward: -log(max(p, 1e-30)); their backward: (softmax - one_hot) / B, whatever the floor did
    plain = -torch.log_softmax(logits, dim=1)[target]
    floored = -torch.log(p.detach().clamp_min(1e-30))
    return (plain + (floored - plain).detach()).mean() if floor else plain.mean()


# scenario: name -> (margin constructor, oracle kwargs, classes, local batch, sample_rate)
IF_SCENARIOS = {
    "combined_arc": (lambda: fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), dict(kind="arc", s=64, m2=0.5), 13, 5, 1.0),
    "combined_cos_filter": (lambda: fi.CombinedMarginLoss(64, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.2),
                            dict(kind="cos", s=64, m3=0.4, threshold=0.2), 13, 5, 1.0),  # fmt: skip
    "combined_arc_filter": (lambda: fi.CombinedMarginLoss(32, 1.0, 0.5, 0.0, interclass_filtering_threshold=0.3),
                            dict(kind="arc", s=32, m2=0.5, threshold=0.3), 11, 4, 1.0),  # fmt: skip
    "arcface": (lambda: fi.ArcFace(s=48.0, margin=0.45), dict(kind="arc", s=48, m2=0.45), 9, 3, 1.0),
    "cosface": (lambda: fi.CosFace(s=64.0, m=0.4), dict(kind="cos", s=64, m3=0.4), 9, 3, 1.0),
    "arc_sampled": (lambda: fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), dict(kind="arc", s=64, m2=0.5), 57, 4, 0.3),
    "cos_sampled": (lambda: fi.CombinedMarginLoss(64, 1.0, 0.0, 0.4), dict(kind="cos", s=64, m3=0.4), 41, 3, 0.5),
}
STEPS = 2
SAMPLE_SEED = 4321


def _if_inputs(name, world, step):
    """Global batch (B, d) float64, every class's weight (C, d), labels; rows near +-3 x their class (targets
    past theta + m2 > pi included) and one hopeless row (target opposite, p_target < 1e-30 at s = 64)."""
    _, _, classes, b_local, _ = IF_SCENARIOS[name]
    g = torch.Generator().manual_seed(list(IF_SCENARIOS).index(name) + 100 * world + 10 * step)
    x, w, y = kit.head_inputs(world * b_local, classes, 7, near_frac=0.6, generator=g)
    flip = torch.rand(len(y), generator=g) < 0.3
    x[flip] = -x[flip]
    # not exactly opposite: at c = -1 the angle's derivative is infinite, and one ulp of c moves the ArcFace
    # logit by ~1e-8 (a test of rounding, not of the formulas)
    x[0] = -5 * w[y[0]] / w[y[0]].norm() + 0.2 * torch.randn(7, generator=g, dtype=torch.float64)
    w[(y[0] + 1) % classes] = w[y[0]] * -2  # another class right where the row points
    return x, w, y


def _if_worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        torch.set_num_threads(1)
        from facekernels.kernels import cpu

        cpu.CLASS_TILE = 3
        results = {}
        for name, (margin, _, classes, b, rate) in IF_SCENARIOS.items():
            head = fi.PartialFC_V2(margin(), 7, classes, sample_rate=rate).double()
            assert list(head.state_dict()) == ["weight"] and head.weight.shape == (head.num_local, 7)
            steps = []
            for step in range(STEPS):
                x, w, y = _if_inputs(name, world, step)
                with torch.no_grad():
                    head.weight.copy_(w[head.class_start : head.class_start + head.num_local])
                head.weight.grad = None
                xl = x[rank * b : (rank + 1) * b].clone().requires_grad_()
                yl = y[rank * b : (rank + 1) * b].clone().view(-1, 1)  # (B, 1), as their data loader gives
                torch.manual_seed(SAMPLE_SEED + 10 * rank + step)  # their draws come from the default generator
                loss = head(xl, yl)
                loss.backward()
                assert yl.shape == (b, 1)  # not squeezed in place
                steps.append(dict(loss=loss.detach(), dx=xl.grad, dw=head.weight.grad.clone()))
            results[name] = steps
        # a per-rank checkpoint (theirs: {"weight": (num_local, d)}) loads strictly and gives the same loss;
        # fp16=True on CPU tensors changes nothing (their CUDA autocast leaves CPU tensors alone)
        head = fi.PartialFC_V2(fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 7, 13)
        shard = {"weight": torch.randn(head.num_local, 7)}
        head.load_state_dict(shard, strict=True)
        again = fi.PartialFC_V2(fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0), 7, 13, fp16=True)
        again.load_state_dict(head.state_dict(), strict=True)
        x, y = torch.randn(3, 7), torch.randint(0, 13, (3,))
        results["checkpoint"] = (head(x, y).detach(), again(x, y).detach())
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp_path, timeout=600):
    ctx = mp.start_processes(_if_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PartialFC_V2 workers (world {world}) did not finish in {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


def _their_sample(y, class_start, num_local, rate, seed):
    """Their PartialFC_V2.sample for one rank: int(rate * num_local) classes, positives first, the rest by
    torch.rand(num_local) from the default generator; all positives (and no draw) when they are more."""
    torch.manual_seed(seed)
    local = (y >= class_start) & (y < class_start + num_local)
    positive = torch.unique(y[local] - class_start)
    num_sample = int(rate * num_local)
    if num_sample < len(positive):
        return positive + class_start
    perm = torch.rand(num_local)
    perm[positive] = 2.0
    return perm.topk(num_sample).indices.sort().values + class_start


@kit.needs_ext
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.slow
def test_partial_fc_v2_matches_insightface(world, tmp_path):
    results = _spawn(world, tmp_path)
    for name, (_, oracle_kw, classes, b, rate) in IF_SCENARIOS.items():
        for step in range(STEPS):
            x, w, y = _if_inputs(name, world, step)
            kept = None
            if rate < 1:
                kept = torch.cat([_their_sample(y, *shard_range(classes, world, r), rate, SAMPLE_SEED + 10 * r + step)
                                  for r in range(world)])  # fmt: skip
                assert len(kept) < classes
            x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
            want = _insightface_oracle(x, w, y, kept=kept, **oracle_kw)
            want.backward()
            if step == 0 and name == "combined_arc":  # the hopeless row is floored (its loss 69.08, not ~120)
                unfloored = _insightface_oracle(x, w, y, kept=kept, floor=False, **oracle_kw)
                assert unfloored.item() - want.item() > 10 / len(y)
            for rank in range(world):
                got = results[rank][name][step]
                start, num_local = shard_range(classes, world, rank)
                where = f"{name} world {world} step {step} rank {rank}"
                assert torch.equal(got["loss"], results[0][name][step]["loss"]), where  # the same on every rank
                _close64(got["loss"], want, f"{where} loss")
                _close64(got["dx"], world * x.grad[rank * b : (rank + 1) * b], f"{where} dx")
                _close64(got["dw"], w.grad[start : start + num_local], f"{where} dW")
                if kept is not None:  # rows not sampled get no gradient at all
                    unsampled = torch.ones(num_local, dtype=torch.bool)
                    unsampled[kept[(kept >= start) & (kept < start + num_local)] - start] = False
                    assert bool(unsampled.any()) and bool((got["dw"][unsampled] == 0).all()), where
    for rank in range(world):
        plain, fp16 = results[rank]["checkpoint"]
        assert torch.equal(plain, fp16) and torch.equal(plain, results[0]["checkpoint"][0])


def test_insightface_oracle_floor_changes_the_value_not_the_gradient():
    """The oracle's DistCrossEntropy: a hopeless row's loss is -log(1e-30) = 69.08, its gradient the plain one."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2])  # row 0: target logit -64, another +64 (loss ~128); row 1: loss ~0
    loss = _insightface_oracle(x, w, y, "cos", s=64.0, m3=0.0)
    plain = _insightface_oracle(x, w, y, "cos", s=64.0, m3=0.0, floor=False)
    assert abs(loss.item() - (-math.log(1e-30)) / 2) < 1e-9 and plain.item() > 63
    for a, b in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(plain, (x, w))):
        assert torch.equal(a, b)


def test_insightface_margins_match_the_single_process_peer():
    """The margin modules' eager forward (their logits) against tests/peers.py's insightface head."""
    x, w, y = kit.head_inputs(9, 6, 5, near_frac=0.7, generator=torch.Generator().manual_seed(2))
    cos = (F.normalize(x) @ F.normalize(w).t()).clamp(-1, 1)
    for margin, kw in ((fi.CombinedMarginLoss(24, 1.0, 0.5, 0.0), dict(m1=1.0, m2=0.5, m3=0.0)),
                       (fi.CombinedMarginLoss(24, 1.0, 0.3, 0.4), dict(m1=1.0, m2=0.3, m3=0.4)),
                       (fi.ArcFace(24.0, 0.5), dict(m1=1.0, m2=0.5, m3=0.0)),
                       (fi.CosFace(24.0, 0.4), dict(m1=1.0, m2=0.0, m3=0.4))):  # fmt: skip
        got = F.cross_entropy(margin(cos.clone(), y.view(-1, 1)), y)
        _close64(got, peers.insightface(x, w, y, s=24.0, **kw), type(margin).__name__)


def test_insightface_bad_arguments_raise():
    with pytest.raises(ValueError, match="m1 = 1 and m3 = 0"):
        fi.CombinedMarginLoss(64, 1.2, 0.0, 0.0)
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0, interclass_filtering_threshold=1.5)
    with pytest.raises(ValueError, match="m2"):
        fi.ArcFace(64.0, margin=4.0)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            fi.PartialFC_V2(fi.ArcFace(), 8, 10)


@kit.needs_ext
def test_partial_fc_v2_one_process_reads_its_margin_at_each_call(tmp_path):
    """World size 1 (the default group initialised, as theirs needs); a margin changed after construction
    takes effect (theirs reads it in every forward); arcface_torch's own margin objects are read too."""

    class CombinedMarginLoss(torch.nn.Module):  # stands for arcface_torch's losses.CombinedMarginLoss
        def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
            super().__init__()
            self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
            self.interclass_filtering_threshold = interclass_filtering_threshold

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        x, w, y = kit.head_inputs(6, 9, 5, generator=torch.Generator().manual_seed(8))
        margin = fi.CombinedMarginLoss(64, 1.0, 0.5, 0.0)
        head = fi.PartialFC_V2(margin, 5, 9).double()
        theirs = fi.PartialFC_V2(CombinedMarginLoss(32, 1.0, 0.3, 0.0), 5, 9).double()
        for h in (head, theirs):
            h.weight.data.copy_(w)
        first = head(x, y)
        _close64(first, _insightface_oracle(x, w, y, "arc", s=64, m2=0.5), "s = 64")
        margin.s, margin.m2 = 32, 0.3
        _close64(head(x, y), _insightface_oracle(x, w, y, "arc", s=32, m2=0.3), "s = 32 after construction")
        _close64(theirs(x, y), head(x, y), "their own CombinedMarginLoss object")
        with pytest.raises(TypeError, match="margin_loss"):
            fi.PartialFC_V2(lambda logits, labels: logits, 5, 9)
        with pytest.raises(ValueError, match="labels must lie in \\[0, 9\\); found -1"):
            head(x, torch.full((6,), -1))
    finally:
        dist.destroy_process_group()
