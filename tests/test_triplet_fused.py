"""The fused triplet loss (backends "cpu" and "cuda", facekernels/kernels/triplet.py on the ops of
csrc/cpu/triplet.cpp and csrc/cuda/triplet.cu) against the eager reference and the brute-force oracle,
degenerate batches, ties, the memory contract, the direct ops, and pytorch-metric-learning."""

import itertools
import os
import subprocess
import sys

import kit
import oracle
import pytest
import torch

from facekernels import TripletMarginLoss, _extension
from facekernels import functional as fkf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = ["semihard", "hard", "all"]
DISTANCES = ["squared_euclidean", "euclidean", "cosine"]
REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]
ALL_OPTIONS = list(itertools.product(MODES, DISTANCES, [True, False], [False, True], REDUCTIONS))


def _options(mining, distance, normalize, soft, reduction, margin=0.3):
    return dict(margin=margin, mining=mining, distance=distance, normalize=normalize, soft=soft, reduction=reduction)


def _run(e, y, backend, **opts):
    """(loss or terms, triplets or None, gradient of a fixed random projection of the output)."""
    e = e.detach().clone().requires_grad_()
    out = fkf.triplet_margin_loss(e, y, backend=backend, **opts)
    out, idx = out if opts["reduction"] == "none" else (out, None)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * g.to(out.device, out.dtype)).sum().backward()
    return out, idx, e.grad


def _assert_same_triplets(got_idx, want_idx):
    assert got_idx.dtype == torch.int64 and got_idx.shape == want_idx.shape
    assert torch.equal(got_idx.cpu(), want_idx.cpu())


def _check_against_reference(e, y, device, opts, loss_tol, grad_tol):
    """The fused backend on `device` against the reference on the same (rounded) inputs in float64."""
    backend = "cpu" if device == "cpu" else "cuda"
    got, got_idx, got_grad = _run(e.to(device), y.to(device), backend, **opts)
    want, want_idx, want_grad = _run(e.double(), y, "reference", **opts)
    assert got.dtype == (torch.float64 if e.dtype == torch.float64 else torch.float32)
    assert got_grad.dtype == e.dtype
    if got_idx is not None:
        _assert_same_triplets(got_idx, want_idx)
    kit.assert_close(got, want, **loss_tol, what="loss")
    kit.assert_close(got_grad, want_grad, **grad_tol, what="d embeddings")



# ------------------------------------------------------------------------------------------ float64 CPU


@pytest.mark.parametrize("mining,distance,normalize,soft,reduction", ALL_OPTIONS)
def test_cpu_matches_reference_float64(mining, distance, normalize, soft, reduction):
    e, y = kit.triplet_inputs(13, 3)
    opts = _options(mining, distance, normalize, soft, reduction)
    _check_against_reference(e, y, "cpu", opts, dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-8, atol=1e-10))


@pytest.mark.parametrize("mining,distance,normalize,soft,reduction", ALL_OPTIONS)
@pytest.mark.slow
def test_cpu_matches_brute_force_oracle(mining, distance, normalize, soft, reduction):
    e, y = kit.triplet_inputs(9, 3)
    opts = _options(mining, distance, normalize, soft, reduction)
    got, got_idx, got_grad = _run(e, y, "cpu", **opts)
    e_orc = e.clone().requires_grad_()
    want = oracle.triplet_loss(e_orc, y, **opts)
    if reduction == "none":
        want, want_idx = want
        _assert_same_triplets(got_idx, want_idx)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (want * g).sum().backward()
    kit.assert_close(got, want, rtol=1e-10, atol=1e-12, what="loss")
    kit.assert_close(got_grad, e_orc.grad, rtol=1e-8, atol=1e-10, what="d embeddings")


# -------------------------------------------------------------------------------- low precision on CPU


def _check_low_precision(e, y, device, opts, backend=None):
    """Error-ratio check (flash-attention, CCE): against the float64 reference on the same rounded inputs,
    the fused backend's error is at most a few times that of the same eager math in float32 (the
    reference on float32 rows, its gradient rounded to the input dtype as the fused one is). The mined
    triplets must be identical."""
    backend = backend or ("cpu" if device == "cpu" else "cuda")
    got, got_idx, got_grad = _run(e.to(device), y.to(device), backend, **opts)
    want, want_idx, want_grad = _run(e.double(), y, "reference", **opts)
    base, _, base_grad = _run(e.float(), y, "reference", **opts)
    assert got.dtype == torch.float32 and got_grad.dtype == e.dtype
    if got_idx is not None:
        _assert_same_triplets(got_idx, want_idx)
    kit.assert_error_ratio(got, base, want, what="loss")
    kit.assert_error_ratio(got_grad, base_grad.to(e.dtype), want_grad, what="d embeddings")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.slow
def test_cpu_low_precision_inputs(dtype, mining, distance, reduction):
    e, y = kit.triplet_inputs(21, 4, features=37, dtype=dtype)
    for normalize in (True, False):
        opts = _options(mining, distance, normalize, False, reduction)
        _check_low_precision(e, y, "cpu", opts)


# ------------------------------------------------------------------------------------------ degenerate


@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("labels", [[0], [0, 1], [0, 0], [3, 3, 3, 3], [0, 1, 2, 3, 4]])
def test_degenerate_batches_give_zero_with_zero_gradient(mining, reduction, labels):
    e = torch.randn(len(labels), 4, dtype=torch.float64, requires_grad=True)
    out = fkf.triplet_margin_loss(e, torch.tensor(labels), mining=mining, reduction=reduction, backend="cpu")
    if reduction == "none":
        terms, idx = out
        assert terms.shape == (0,) and idx.shape == (0, 3) and idx.dtype == torch.int64
        terms.sum().backward()
    else:
        assert out.item() == 0.0 and out.dtype == torch.float64
        out.backward()
    assert torch.all(e.grad == 0)


@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("distance", DISTANCES)
def test_duplicate_embeddings_give_finite_gradients_matching_reference(mining, distance):
    e = torch.randn(8, 4, dtype=torch.float64)
    e[1] = e[0]
    e[4] = e[2]
    e[6] = e[0]  # a negative at distance 0 from anchors 0 and 1
    e[7] = 0  # a zero row: the normalisation's eps branch
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for normalize, reduction in itertools.product([True, False], ["mean", "none"]):
        opts = _options(mining, distance, normalize, False, reduction, margin=0.2)
        got, idx, grad = _run(e, y, "cpu", **opts)
        want, want_idx, want_grad = _run(e, y, "reference", **opts)
        assert torch.isfinite(got).all() and torch.isfinite(grad).all()
        if idx is not None:
            _assert_same_triplets(idx, want_idx)
        kit.assert_close(got, want, rtol=1e-10, atol=1e-12, what="loss")
        kit.assert_close(grad[:7], want_grad[:7], rtol=1e-8, atol=1e-10, what="d embeddings")
        # the zero row's gradient is that of its normalised row times 1 / eps = 1e12: slopes that cancel
        # exactly in theory leave ~1e-19 of rounding there, ~1e-7 after the 1e12
        kit.assert_close(grad[7], want_grad[7], rtol=1e-8, atol=1e-3 if normalize else 1e-10, what="zero row")


def test_uneven_classes_module_form_and_auto_backend():
    e, y = kit.triplet_inputs(17, 4, dtype=torch.float32)
    y[:9] = 0
    for mining in MODES:
        loss = TripletMarginLoss(mining=mining, backend="auto")(e, y)
        want = oracle.triplet_loss(e, y, mining=mining)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_ties_go_to_the_lowest_index():
    # anchor 0; positives 1 and 2 at the same distance; negatives 3 and 4 at the same distance
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1])
    e.requires_grad_()
    terms, idx = fkf.triplet_margin_loss(e, y, margin=10.0, mining="hard", normalize=False, reduction="none",
                                         backend="cpu")  # fmt: skip
    assert idx[0].tolist() == [0, 1, 3]
    terms[0].backward()
    # the tied twins 2 and 4 get nothing: the lowest index takes the whole gradient
    assert e.grad[2].abs().sum() == 0 and e.grad[4].abs().sum() == 0
    assert e.grad[1].abs().sum() > 0 and e.grad[3].abs().sum() > 0
    # semi-hard: negatives 3 and 4 tie as the closest farther one, and as the farthest fallback
    _, idx = fkf.triplet_margin_loss(e, y, mining="semihard", normalize=False, reduction="none", backend="cpu")
    assert idx[:2].tolist() == [[0, 1, 3], [0, 2, 3]]
    e2 = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    _, idx = fkf.triplet_margin_loss(e2, torch.tensor([0, 0, 1, 1]), mining="semihard", normalize=False,
                                     reduction="none", backend="cpu")  # fmt: skip
    assert idx[0].tolist() == [0, 1, 2]


def _duplicated_batches(count, seed):
    """Random float32 batches in which one row is copied under another label (label noise), and for hard mining
    a second row is copied under its own label (tied positives): distances that are equal in exact arithmetic
    but come from different GEMM entries."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(count):
        batch = int(torch.randint(6, 40, (), generator=g))
        e = torch.randn(batch, int(torch.randint(2, 40, (), generator=g)), generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        i, j, k, m = torch.randperm(batch, generator=g)[:4].tolist()
        e[j], y[j] = e[i], (y[i] + 1) % 4
        e[m], y[m] = e[k], y[k]
        yield trial, e, y, ("squared_euclidean", "euclidean", "cosine")[trial % 3], trial % 2 == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_representatives_are_the_lowest_equal_row(dtype):
    from facekernels._pairs import representatives

    g = torch.Generator().manual_seed(3)
    e = torch.randint(-2, 3, (60, 3), generator=g).to(dtype)  # many equal rows
    e[7, 1], e[8, 1] = -0.0, 0.0  # equal as numbers
    e[8, 0], e[8, 2] = e[7, 0], e[7, 2]
    e[20, 0] = e[21, 0] = float("nan")  # a row with a NaN equals no row, not even a copy of itself
    e[21] = e[20]
    want = [next(j for j in range(len(e)) if bool((e[j] == e[i]).all())) if not e[i].isnan().any() else i
            for i in range(len(e))]  # fmt: skip
    assert representatives(e).tolist() == want
    assert representatives(e[:0]).tolist() == [] and representatives(e[:1]).tolist() == [0]


@pytest.mark.parametrize("mining", ["semihard", "hard"])
@pytest.mark.slow
def test_equal_rows_under_two_labels_mine_as_the_float64_oracle(mining):
    # d_an == d_ap exactly when n is a copy of p: n is not semi-hard (d_an > d_ap fails), and a hard-mining
    # tie goes to the lowest index. Every backend must see the tie whatever its GEMM rounds by position.
    backends = ["reference", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wrong = {backend: [] for backend in backends}
    for trial, e, y, distance, normalize in _duplicated_batches(200, seed=6):
        _, want = oracle.triplet_loss(e.double(), y, mining=mining, distance=distance, normalize=normalize,
                                      reduction="none")  # fmt: skip
        for backend in backends:
            dev = "cuda" if backend == "cuda" else "cpu"
            _, got = fkf.triplet_margin_loss(e.to(dev), y.to(dev), mining=mining, distance=distance,
                                             normalize=normalize, reduction="none", backend=backend)  # fmt: skip
            if not torch.equal(got.cpu(), want):
                wrong[backend].append(trial)
    assert all(not trials for trials in wrong.values()), f"batches mined unlike the oracle: {wrong}"


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.slow
def test_hard_mining_ties_between_equal_rows_go_to_the_lowest_index(distance):
    # anchor 0 with two copies as its farthest positives and two copies as its closest negatives, at random
    # places of batches of random sizes (where a GEMM rounds equal rows differently by position)
    g = torch.Generator().manual_seed(7)
    backends = ["reference", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wrong = []
    for trial in range(200):
        batch, features = int(torch.randint(6, 80, (), generator=g)), int(torch.randint(3, 40, (), generator=g))
        e = torch.randn(batch, features, generator=g)
        y = torch.randint(2, 6, (batch,), generator=g)
        p1, p2, n1, n2 = (1 + torch.randperm(batch - 1, generator=g)[:4]).tolist()  # anchor 0
        y[0] = y[p1] = y[p2] = 0
        e[p1] = e[p2] = -e[0] + 0.5 * torch.randn(features, generator=g)
        y[n1] = y[n2] = 1
        e[n1] = e[n2] = e[0] + 0.01 * torch.randn(features, generator=g)
        want = [0, min(p1, p2), min(n1, n2)]
        for backend in backends:
            dev = "cuda" if backend == "cuda" else "cpu"
            _, idx = fkf.triplet_margin_loss(e.to(dev), y.to(dev), mining="hard", distance=distance,
                                             reduction="none", backend=backend)  # fmt: skip
            if idx[0].tolist() != want:
                wrong.append((trial, backend, idx[0].tolist(), want))
    assert not wrong, f"hard-mining ties not to the lowest index: {wrong[:5]} ({len(wrong)} in all)"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mining", MODES)
@pytest.mark.slow
def test_integer_batches_with_many_ties_match_reference_exactly(device, dtype, mining):
    # small integer rows: every Gram entry and squared distance is exact in float32 whatever the summation
    # order (BLAS, cuBLAS, the reference's float64), so even the many exact ties must be broken identically;
    # on CUDA B = 300 spans several blocks of anchors (not a multiple of 32), and backend="auto" must pick the
    # fused kernel
    if device == "cuda":
        _require_cuda_build()
    batch = 300 if device == "cuda" else 61
    e = torch.randint(-3, 4, (batch, 16)).to(dtype)
    y = torch.randint(0, batch // 6, (batch,))
    for distance, reduction in itertools.product(["squared_euclidean", "euclidean"], REDUCTIONS):
        _check_low_precision(e, y, device, _options(mining, distance, False, False, reduction, margin=1.0), "auto")


def _batch_all_mean_float64(e, y, margin, distance):
    """mining="all", reduction="mean" in float64 by another algorithm than the kernels': per anchor the
    negatives' distances sorted, so that sum_n max(d_ap + margin - d_an, 0) = k (d_ap + margin) - (sum of the
    k smallest d_an), k = #{n: d_an < d_ap + margin}. Distances from explicit differences."""
    e = e.double()
    d = ((e.unsqueeze(1) - e.unsqueeze(0)) ** 2).sum(-1)
    if distance == "euclidean":
        d = d.sqrt()
    rows = torch.arange(len(y))
    total, count = torch.zeros((), dtype=torch.float64), 0
    for a in range(len(y)):
        neg = d[a, y != y[a]].sort().values
        pos = d[a, (y == y[a]) & (rows != a)]
        prefix = torch.cat([neg.new_zeros(1), neg.cumsum(0)])
        k = torch.searchsorted(neg, pos + margin)
        total += (k * (pos + margin) - prefix[k]).sum()
        count += len(pos) * len(neg)
    return total / max(count, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean"])
@pytest.mark.slow
def test_batch_all_float32_sums_many_terms_accurately(device, distance):
    # two tight clusters: each anchor has ~B/2 positives and ~B/2 negatives, a quarter million terms of about
    # the margin, whose float32 running sum (ulp 2^-6 at 2.6e5) was 3e-4 off; the kernels sum in float64
    if device == "cuda":
        _require_cuda_build()
    batch = 1025
    e, y = kit.triplet_inputs(batch, 2, 16, dtype=torch.float32, spread=0.01)
    e = 0.02 * e  # small norms: the Gram cancellation in float32 stays ~1e-9, far below the accumulation error
    got = fkf.triplet_margin_loss(e.to(device), y.to(device), margin=1.0, mining="all", distance=distance,
                                  normalize=False, backend="auto")  # fmt: skip
    want = _batch_all_mean_float64(e, y, 1.0, distance)
    assert 0.8 < want.item() < 1.0  # most terms active, each about the margin
    kit.assert_close(got, want, rtol=2e-6, atol=0, what="batch-all mean")


# ------------------------------------------------------------------------------------- memory contract


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # every aten op (at::empty inside the C++ ops included) is an event; its usage is what it allocated
    return max(ev.cpu_memory_usage for ev in prof.events())


@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.slow
def test_no_cubic_allocation(mining, reduction):
    batch, features = 96, 8
    e = torch.randn(batch, features, requires_grad=True)
    y = torch.arange(batch) % 24  # K = 4

    def step(backend):
        def run():
            out = fkf.triplet_margin_loss(e, y, mining=mining, reduction=reduction, backend=backend)
            loss = out[0].sum() if reduction == "none" else out
            loss.backward()

        return run

    cubic = batch**3  # bytes of a (B, B, B) bool mask, the smallest (B, B, B) tensor
    # the detector sees the reference's (chunk, B, B) masks, so it can fail...
    if mining == "all":
        assert _largest_allocation(step("reference")) >= cubic
    # ...and the fused backend stays O(B^2), plus its output with reduction="none": T terms (float32),
    # triplets (int64) and slopes (float32); the op's event counts all three
    count = batch * 3 * (batch - 4) if mining == "all" else batch * 3 if mining == "semihard" else batch
    outputs = (4 + 3 * 8 + 2 * 4) * count if reduction == "none" else 0
    assert _largest_allocation(step("cpu")) <= max(8 * batch * batch, outputs)


# One step's peak, read in a fresh process: a process's resident high-water mark is the measure (as the
# benchmark reads it), and inside the suite's process it also carries what earlier tests left (allocator state,
# BLAS scratch): one CI run read 3.1 B^2 there in 4 readings of 4, where a fresh process reads ~2.
_PEAK_STEP = """
import sys, torch
from facekernels import functional as fkf
from facekernels.benchmark import measure
mining, reduction = sys.argv[1:]
if not measure.hwm_resettable():
    print("unresettable")
    sys.exit()
e = torch.randn(2048, 16, requires_grad=True)
y = torch.arange(2048) % 700
def step():
    out = fkf.triplet_margin_loss(e, y, mining=mining, reduction=reduction, backend="cpu")
    (out[0].sum() if reduction == "none" else out).backward()
step()  # warm-up: one-off allocations of the first call
# the least of 4 readings: about 1 reading in 6 on a loaded 2-core machine has one more transient B^2 (the
# BLAS's own packing of the (B, B) operand of W e / W^T e at the thread count it picks under load)
print(min(measure.peak_memory_mib(step, torch.device("cpu"))[0] for _ in range(4)))
"""


# (mining="all" with reduction="none" returns ~2 B^2 triplets: its output is the memory)
@pytest.mark.parametrize("mining, reduction", [(m, "mean") for m in MODES] + [("semihard", "none"), ("hard", "none")])
@pytest.mark.slow
def test_peak_memory_is_two_batch_squared_buffers(mining, reduction):
    # the Gram and distance matrices in the forward, then distances and W; the backward adds nothing of (B, B)
    # beside the saved W (a (W + W^T) temporary and autograd's zero-filled gradient for W were a third one)
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", _PEAK_STEP, mining, reduction], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    if done.stdout.strip() == "unresettable":
        pytest.skip("this kernel does not let a process reset its VmHWM")
    peak, square = float(done.stdout.strip().splitlines()[-1]), 2048 * 2048 * 4 / 2**20  # MiB; one (B, B) float32
    assert peak <= 2.4 * square, f"peak {peak:.1f} MiB = {peak / square:.2f} B^2 float32 matrices"


# ---------------------------------------------------------------------------------- second derivatives


def _hessian_vector(e, y, backend, v, u, **opts):
    """d/de <v, d<u, loss>/de>: the gradient built with create_graph=True, differentiated once more (u weighs
    the terms with reduction="none")."""
    e = e.detach().clone().requires_grad_()
    out = fkf.triplet_margin_loss(e, y, backend=backend, **opts)
    loss = (out[0] * u[: out[0].shape[0]]).sum() if opts["reduction"] == "none" else out
    (grad,) = torch.autograd.grad(loss, e, create_graph=True)
    if not grad.requires_grad:  # the second derivative is identically 0 (every term flat)
        return grad, torch.zeros_like(e)
    (hv,) = torch.autograd.grad((grad * v).sum(), e)
    return grad, hv


@pytest.mark.parametrize("mining,distance,normalize,soft,reduction", ALL_OPTIONS)
@pytest.mark.slow
def test_cpu_second_derivatives_match_reference_float64(mining, distance, normalize, soft, reduction):
    # the kernels' slopes are numbers: where they depend on the embeddings (euclidean's 1 / 2d, soft's
    # sigmoid) a create_graph backward must still carry that dependence, or the second derivative is wrong
    e, y = kit.triplet_inputs(11, 3, 4)
    v, u = torch.randn_like(e), torch.randn(11 * 10 * 9, dtype=torch.float64)
    opts = _options(mining, distance, normalize, soft, reduction)
    grad, hv = _hessian_vector(e, y, "cpu", v, u, **opts)
    want_grad, want_hv = _hessian_vector(e, y, "reference", v, u, **opts)
    kit.assert_close(grad, want_grad, rtol=1e-8, atol=1e-10, what="gradient")
    kit.assert_close(hv, want_hv, rtol=1e-7, atol=1e-9, what="Hessian-vector product")


@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("distance,soft", [("euclidean", False), ("squared_euclidean", True), ("euclidean", True),
                                           ("cosine", True)])  # fmt: skip
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.slow
def test_cpu_gradgradcheck(mining, distance, soft, reduction):
    # finite differences of the gradient itself, independent of the reference; unnormalised rows spread
    # apart so that no mining choice or hinge flips within the step
    e, y = kit.triplet_inputs(7, 2, 3)
    e = 3 * e

    def loss(x):
        out = fkf.triplet_margin_loss(x, y, margin=0.5, mining=mining, distance=distance, normalize=False,
                                      soft=soft, reduction=reduction, backend="cpu")  # fmt: skip
        return out[0] if reduction == "none" else out

    assert torch.autograd.gradgradcheck(loss, (e.requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ direct ops


def test_ops_reject_bad_arguments():
    ops = _extension.ops()
    e, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match="int64"):
        ops.triplet_reduce(e, y.int(), "hard", "cosine", 0.2, False)
    with pytest.raises(ValueError, match="mining"):
        ops.triplet_reduce(e, y, "hardest", "cosine", 0.2, False)
    with pytest.raises(ValueError, match="distance"):
        ops.triplet_terms(e, y, "hard", "l2", 0.2, False)
    # the messages with numbers and sizes in them: built without an ostream (csrc/include/facekernels/
    # check_message.h); streamed, they segfaulted in the H200 machine's CUDA build
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\); got \[3\]$"):
        ops.triplet_terms(e, y[:3], "hard", "cosine", 0.2, False)
    with pytest.raises(ValueError, match=r"embeddings must be 2-D; got \[3\]$"):
        ops.triplet_terms(e[0], y, "hard", "cosine", 0.2, False)
    with pytest.raises(ValueError, match=r"margin must be >= 0; got -0.25$"):
        ops.triplet_terms(e, y, "hard", "cosine", -0.25, False)
    with pytest.raises(ValueError, match=r"representatives must be row indices in \[0, 4\); got 4 at 1"):
        ops.triplet_reduce(e, y, "hard", "cosine", 0.2, False, torch.tensor([0, 4, 1, 2]))
    with pytest.raises(ValueError, match="representatives must have shape"):
        ops.triplet_terms(e, y, "hard", "cosine", 0.2, False, torch.arange(3))
    with pytest.raises(TypeError, match="representatives must be int64"):
        ops.triplet_terms(e, y, "hard", "cosine", 0.2, False, torch.arange(4).int())


@pytest.mark.parametrize("mining", MODES)
def test_ops_opcheck(mining):
    import facekernels.kernels.triplet  # noqa: F401  (importing it registers the shape functions)

    e, y = kit.triplet_inputs(10, 3, 6, dtype=torch.float32)
    args = (e, y, mining, "euclidean", 0.2, False)
    # each overload spelled out: test_robustness's guard looks for these names
    torch.library.opcheck(torch.ops.facekernels.triplet_reduce.default, args)
    torch.library.opcheck(torch.ops.facekernels.triplet_terms.default, args)
    e[4] = e[1]
    with_rep = args + (torch.tensor([0, 1, 2, 3, 1, 5, 6, 7, 8, 9]),)
    torch.library.opcheck(torch.ops.facekernels.triplet_reduce.default, with_rep)
    torch.library.opcheck(torch.ops.facekernels.triplet_terms.default, with_rep)


# ------------------------------------------------------------------ pytorch-metric-learning equivalences


@pytest.mark.parametrize("mining", ["all", "hard"])
def test_mean_nonzero_equals_pml(mining):
    # a test extra (.ci/run installs it); imported here so that a machine without it still runs the rest
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    e, y = kit.triplet_inputs(23, 4, features=8)
    got = fkf.triplet_margin_loss(e, y, margin=0.2, mining=mining, distance="euclidean", normalize=True,
                                  reduction="mean_nonzero", backend="cpu")  # fmt: skip
    pairs = miners.BatchHardMiner()(e, y) if mining == "hard" else None
    want = losses.TripletMarginLoss(margin=0.2)(e, y, pairs)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


@pytest.mark.parametrize("distance,squared", [("euclidean", False), ("squared_euclidean", True)])
def test_semihard_equals_tfa(distance, squared):
    from test_reference_triplet import _tfa_semihard  # TF-Addons' algorithm re-derived as loops

    e, y = kit.triplet_inputs(19, 3, features=6)
    got = fkf.triplet_margin_loss(e, y, margin=0.5, mining="semihard", distance=distance, normalize=False,
                                  reduction="mean", backend="cpu")  # fmt: skip
    assert got.item() == pytest.approx(_tfa_semihard(e, y, 0.5, squared), rel=1e-9)


# ------------------------------------------------------------------------------------------------- GPU


def _require_cuda_build():
    if not _extension.cuda_built():
        pytest.fail("a CUDA device is present but facekernels._C was built without CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("mining,distance,normalize,soft,reduction", ALL_OPTIONS)
def test_cuda_matches_reference_float64(mining, distance, normalize, soft, reduction):
    _require_cuda_build()
    e, y = kit.triplet_inputs(37, 5)
    opts = _options(mining, distance, normalize, soft, reduction)
    _check_against_reference(e, y, "cuda", opts, dict(rtol=1e-10, atol=1e-12), dict(rtol=1e-8, atol=1e-10))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_low_precision_inputs(dtype, mining, distance, reduction):
    _require_cuda_build()
    e, y = kit.triplet_inputs(29, 5, features=131, dtype=dtype)
    for normalize, soft in itertools.product([True, False], [False, True]):
        opts = _options(mining, distance, normalize, soft, reduction)
        _check_low_precision(e, y, "cuda", opts)


@pytest.mark.gpu
@pytest.mark.parametrize("mining", MODES)
@pytest.mark.parametrize("labels", [[0], [0, 1], [0, 0], [3, 3, 3, 3], [0, 1, 2, 3, 4]])
def test_cuda_degenerate_batches(mining, labels):
    _require_cuda_build()
    e = torch.randn(len(labels), 4, device="cuda", requires_grad=True)
    loss = fkf.triplet_margin_loss(e, torch.tensor(labels, device="cuda"), mining=mining, backend="cuda")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(e.grad == 0)
    terms, idx = fkf.triplet_margin_loss(e, torch.tensor(labels, device="cuda"), mining=mining, reduction="none",
                                         backend="cuda")  # fmt: skip
    assert terms.shape == (0,) and idx.shape == (0, 3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backend_function_compiles_fullgraph(reduction):
    # the backend function itself (facekernels.functional's backend lookup imports modules, which dynamo
    # does not trace): the ops' shape functions, including the data-dependent T of reduction="none"
    from facekernels._params import TripletParams
    from facekernels.kernels.triplet import fused_triplet_margin_loss

    params = TripletParams(margin=0.3, mining="semihard", distance="euclidean", reduction=reduction)
    e, y = kit.triplet_inputs(12, 3, features=6, dtype=torch.float32)

    def loss(e):
        out = fused_triplet_margin_loss(e, y, params)
        return out[0].sum() if reduction == "none" else out

    eager = e.clone().requires_grad_()
    compiled = e.clone().requires_grad_()
    want = loss(eager)  # also loads the extension: torch.compile cannot trace an import
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(compiled.grad, eager.grad)


def test_strided_embeddings_and_int32_labels():
    e, y = kit.triplet_inputs(15, 3, features=7)
    strided = torch.randn(7, 15, dtype=torch.float64).t()  # column-major rows
    strided.copy_(e)
    for mining in MODES:
        opts = _options(mining, "euclidean", False, False, "mean")
        got, _, got_grad = _run(strided, y.int(), "cpu", **opts)
        want, _, want_grad = _run(e, y, "reference", **opts)
        kit.assert_close(got, want, rtol=1e-10, atol=1e-12, what="loss")
        kit.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10, what="d embeddings")
