"""Robustness: defined results at the edges, property-based tests against the oracles, long runs,
determinism, torch.compile and autocast, for every backend that runs on this machine."""

import ast
import glob
import math
import os

import kit
import oracle
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import facekernels as fk
from facekernels import functional as fkf
from facekernels._extension import is_available as extension_built

# The backends that must run here (CPU tensors). Triton runs under its interpreter (TRITON_INTERPRET=1
# from conftest) on CPU tensors; CUDA-only backends are covered by gpu-marked tests elsewhere.
HEAD_BACKENDS = kit.CPU_TENSOR_BACKENDS
TRIPLET_BACKENDS = ["reference", "cpu"]
# 10,000 steps or an inductor compile of six heads are not for the Triton interpreter (Triton's sm_90 compile
# test is test_gpu_static.py, its bf16/fp16 tests under the interpreter test_heads_lowp.py)
CPU_HEAD_BACKENDS = kit.FLOAT64_BACKENDS


def _loss(backend, x, w, y, case, t=None, **options):
    """The public functional for ``case`` of kit.CASES; ``t`` is CurricularFace's buffer (MV-Softmax's t is a
    margin of the case)."""
    kw = dict(kit.CASES[case].margins)
    t = kw.pop("t", t)
    return fkf.margin_cross_entropy(x, w, y, kit.CASES[case].head, t=t, backend=backend, **options, **kw)


# ------------------------------------------------------------------------------------ edges: heads


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("case", kit.ORACLE_CASES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.slow
def test_nan_or_inf_embeddings_give_nan_loss(backend, case, bad):
    x, w = torch.randn(5, 8), torch.randn(7, 8)
    x[2, 3] = bad
    t = torch.zeros(()) if case == "curricular" else None
    loss = _loss(backend, x, w, torch.randint(0, 7, (5,)), case, t=t)
    assert torch.isnan(loss), f"{case}: {loss}"


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("case", kit.ORACLE_CASES)
def test_edge_inputs_give_finite_loss_and_gradients(backend, case):
    w = torch.randn(6, 8)
    x = torch.randn(6, 8)
    x[0] = 0  # zero-norm embedding
    x[1] = w[1] * 3  # equal to its class weight: theta = 0
    x[2] = -w[2]  # opposite its class weight: theta = pi
    w_zero = w.clone()
    w_zero[5] = 0  # a zero-norm class
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    for weight in (w, w_zero):
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        t = torch.zeros(()) if case == "curricular" else None
        loss = _loss(backend, xg, wg, y, case, t=t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xg.grad).all() and torch.isfinite(wg.grad).all()


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_one_class_empty_batch_all_ignored(backend):
    w = torch.randn(1, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    loss = fkf.margin_cross_entropy(x, w, torch.zeros(3, dtype=torch.long), "arcface", backend=backend)
    loss.backward()
    # one class: the loss is s * (c - phi(c)) >= 0, finite
    assert torch.isfinite(loss) and loss.item() >= 0 and torch.isfinite(x.grad).all()
    empty = fkf.margin_cross_entropy(x[:0], w, torch.zeros(0, dtype=torch.long), "cosface", backend=backend)
    assert empty.item() == 0
    none = fkf.margin_cross_entropy(x, w, torch.full((3,), -100), "cosface", reduction="none", backend=backend)
    assert torch.equal(none, torch.zeros(3))


@pytest.mark.parametrize("backend", HEAD_BACKENDS)  # Triton's interpreter: bf16 through tests/interpreter_bf16.py
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_at_s64_are_finite(backend, dtype):
    x, w = torch.randn(9, 16), torch.randn(11, 16)
    x[:4] = w[:4] * 2  # near-1 target cosines: logits near s = 64
    y = torch.arange(9)
    xg, wg = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    loss = fkf.margin_cross_entropy(xg, wg, y, "arcface", s=64.0, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(xg.grad.float()).all() and torch.isfinite(wg.grad.float()).all()
    want = fkf.margin_cross_entropy(x.double(), w.double(), y, "arcface", s=64.0, backend="reference")
    assert abs(loss.item() - want.item()) < 0.05 * max(1.0, want.item())


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_non_contiguous_inputs(backend):
    x_big, w_big = torch.randn(10, 20, dtype=torch.float64), torch.randn(12, 30, dtype=torch.float64)
    x, w = x_big[::2, ::2], w_big[:, 5:15]  # strided rows and columns
    y = torch.randint(0, 12, (5,))
    dtype = torch.float64 if backend == "reference" else torch.float32
    got = fkf.margin_cross_entropy(x.to(dtype), w.to(dtype), y, "cosface", backend=backend)
    want = fkf.margin_cross_entropy(x.contiguous(), w.contiguous(), y, "cosface", backend="reference")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.slow
def test_float16_first_order_gradient_under_create_graph_is_the_plain_one(backend):
    # the features sum past float16's 65504 (B d = 120,000 elements of mean 0.6): tying the gradient to the
    # input by 0 * sum(x) made the whole dx NaN under create_graph=True
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(40, 3000, generator=g) + 0.1).half()
    w = torch.randn(37, 3000, generator=g).half()
    y = torch.randint(0, 37, (40,), generator=g)
    grads = []
    for create_graph in (False, True):
        xg = x.clone().requires_grad_()
        loss = fkf.margin_cross_entropy(xg, w, y, "arcface", backend=backend)
        (dx,) = torch.autograd.grad(loss, xg, create_graph=create_graph)
        grads.append(dx.detach())
    assert torch.isfinite(grads[0]).all()
    assert torch.equal(grads[1], grads[0])


# ---------------------------------------------------------------------------------- edges: triplet


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@pytest.mark.parametrize("mining", ["semihard", "hard", "all"])
@pytest.mark.parametrize("labels", [[], [4], [2, 2, 2], [0, 1, 2, 3, 4]])
def test_triplet_degenerate_batches(backend, mining, labels):
    e = torch.randn(len(labels), 5, requires_grad=True)
    loss = fkf.triplet_margin_loss(e, torch.tensor(labels, dtype=torch.long), mining=mining, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.all(e.grad == 0)


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean", "cosine"])
def test_triplet_duplicates_and_nan(backend, distance):
    e = torch.randn(8, 5)
    e[1] = e[0]
    e[5] = e[4]
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for mining in ("semihard", "hard", "all"):
        eg = e.clone().requires_grad_()
        loss = fkf.triplet_margin_loss(eg, y, mining=mining, distance=distance, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(eg.grad).all()
    for bad in (float("nan"), float("inf")):
        e[3, 0] = bad
        for mining in ("semihard", "hard", "all"):
            assert torch.isnan(fkf.triplet_margin_loss(e, y, mining=mining, distance=distance, backend=backend))


# Non-negative features (GAP after ReLU, as in re-ID) whose float16 sum passes 65504: B d = 131,072 elements
# of mean 0.6 sum to ~79,000. Float32 rows of ~1e37 pass float32's range in a sum of more than ~50 elements.
HALF_SUM_CASES = [(torch.float16, 1.0, 32, 4096), (torch.bfloat16, 1.0, 32, 4096), (torch.float32, 1.0, 32, 4096),
                  (torch.float32, 1e37, 32, 12)]  # fmt: skip


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@pytest.mark.parametrize("dtype, scale, batch, features", HALF_SUM_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("mining", ["semihard", "hard", "all"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.slow
def test_triplet_finite_rows_whose_sum_overflows_give_a_finite_loss(backend, dtype, scale, batch, features, mining,
                                                                     normalize):  # fmt: skip
    if scale > 1 and not normalize:
        pytest.skip("unnormalised rows of 1e37 have distances past float32's range")
    g = torch.Generator().manual_seed(21)
    e = ((torch.rand(batch, features, generator=g, dtype=torch.float64) + 0.1) * scale).to(dtype)
    y = torch.randint(0, 5, (batch,), generator=g)
    eg = e.clone().requires_grad_()
    got = fkf.triplet_margin_loss(eg, y, mining=mining, normalize=normalize, backend=backend)
    got.backward()
    assert torch.isfinite(eg.grad).all()
    want = oracle.triplet_loss(e.double(), y, mining=mining, normalize=normalize)
    # the same rounded rows in float32: the eager error the kernel's is measured against
    low = fkf.triplet_margin_loss(e.float(), y, mining=mining, normalize=normalize, backend="reference")
    kit.assert_error_ratio(got, low, want, what=f"{dtype} loss")
    # a NaN or Inf still gives a NaN loss
    for bad in (float("nan"), float("inf")):
        e_bad = e.clone()
        e_bad[3, 1] = bad
        assert torch.isnan(fkf.triplet_margin_loss(e_bad, y, mining=mining, normalize=normalize, backend=backend))


# ------------------------------------------------------------------------------------ malformed inputs


def _unusual_tensors(x):
    """(description, tensor) of layouts and devices that carry no ordinary strided data."""
    yield "sparse", x.to_sparse()
    yield "sparse CSR", x.to_sparse_csr() if x.dim() == 2 else x.to_sparse()
    if torch.backends.mkldnn.is_available() and x.is_floating_point():
        yield "mkldnn", x.float().to_mkldnn()
    yield "nested", torch.nested.nested_tensor(list(x.unbind(0)), layout=torch.jagged) if x.dim() == 2 else None
    yield "meta", x.to("meta")


@pytest.mark.parametrize("argument", ["embeddings", "weight", "labels"])
def test_unusual_layouts_and_meta_tensors_are_rejected_up_front(argument):
    # they used to pass the validation and fail deep inside a backend with an unrelated message
    good = dict(embeddings=torch.randn(4, 6), weight=torch.randn(5, 6), labels=torch.tensor([0, 1, 2, 4]))
    for kind, bad in _unusual_tensors(good[argument]):
        if bad is None:
            continue
        args = {**good, argument: bad}
        if kind == "meta":  # a meta tensor beside real ones is a device mismatch; all of them meta is its own case
            args = {k: v.to("meta") for k, v in good.items()}
        for backend in ("reference", "cpu"):
            with pytest.raises((ValueError, TypeError), match=argument if kind != "meta" else "meta") as err:
                fkf.margin_cross_entropy(args["embeddings"], args["weight"], args["labels"], "arcface",
                                         backend=backend)  # fmt: skip
            assert kind.split()[0] in str(err.value), (kind, str(err.value))
        if argument != "weight":
            with pytest.raises((ValueError, TypeError), match=argument if kind != "meta" else "meta"):
                fkf.triplet_margin_loss(args["embeddings"], args["labels"], backend="cpu")


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_ignore_index_outside_int64_is_a_value_error(value):
    with pytest.raises(ValueError, match="ignore_index must be an int64"):
        fk.ArcFace(4, 3, ignore_index=value)
    with pytest.raises(ValueError, match="ignore_index must be an int64"):
        fkf.margin_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), "cosface",
                                 ignore_index=value, backend="reference")  # fmt: skip
    fk.ArcFace(4, 3, ignore_index=2**63 - 1)  # the int64 bounds themselves are fine
    fk.ArcFace(4, 3, ignore_index=-(2**63))


@pytest.mark.parametrize("group", [object(), "world", 0])
def test_process_group_must_be_a_process_group(group):
    with pytest.raises(TypeError, match="process_group must be None or a torch.distributed.ProcessGroup"):
        fk.CosFace(4, 3, process_group=group)


OVERFLOWING_HYPERPARAMETERS = [
    (fk.ArcFace, dict(s=1e39), "s"),
    (fk.NormSoftmax, dict(s=1e5), "s"),
    (fk.CosFace, dict(m=1e38), "m"),
    (fk.CosFace, dict(m=11.0), "m"),
    (fk.CombinedMargin, dict(m3=1e38), "m3"),
    (fk.CombinedMargin, dict(m1=1e38), "m1"),
    (fk.MVSoftmax, dict(t=1e38), "t"),
    (fk.MVSoftmax, dict(t=11.0, is_am=False), "t"),
]


@pytest.mark.parametrize("cls,kwargs,name", OVERFLOWING_HYPERPARAMETERS)
def test_hyperparameters_that_overflow_float32_are_rejected(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number in"):
        cls(8, 10, **kwargs)
    head = cls.__name__.lower().replace("combinedmargin", "combined").replace("mvsoftmax", "mv_softmax")
    head = {"normsoftmax": "norm_softmax"}.get(head, head)
    with pytest.raises(ValueError, match=f"^{name} must be a finite number in"):
        fk.head_params(head, **kwargs)


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("cls,kwargs", [
    (fk.CosFace, dict(s=1e4, m=10.0)),
    (fk.CombinedMargin, dict(s=1e4, m1=10.0, m2=0.5, m3=10.0)),
    (fk.MVSoftmax, dict(s=1e4, m=0.35, t=10.0)),
    (fk.MVSoftmax, dict(s=1e4, m=0.5, t=10.0, is_am=False)),
    (fk.CurricularFace, dict(s=1e4, m=0.5)),
])  # fmt: skip
def test_hyperparameters_at_their_bounds_give_finite_float32_results(backend, cls, kwargs):
    # the largest accepted values: every logit stays below 1e4 * 21 and the loss, its gradients and
    # CurricularFace's t are finite in float32 (with rows near their class, so margins and MV negatives act)
    x, w, y = kit.head_inputs(7, 13, 8, dtype=torch.float32)
    head = cls(8, 13, backend=backend, reduction="sum", **kwargs)
    head.weight.data.copy_(w)
    xg = x.clone().requires_grad_()
    loss = head(xg, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xg.grad).all() and torch.isfinite(head.weight.grad).all()
    head_ref = cls(8, 13, backend="reference", reduction="sum", **kwargs).double()
    head_ref.weight.data.copy_(w.double())
    want = head_ref(x.double(), y)
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_column_labels_of_insightface_are_accepted_by_the_heads(backend, reduction):
    # insightface's trainers pass labels of shape (B, 1): the same loss and gradients as (B,)
    x, w, y = kit.head_inputs(7, 11, 6, dtype=torch.float32, ignore_frac=0.2)
    results = []
    for labels in (y, y.unsqueeze(1)):
        head = fk.CurricularFace(6, 11, backend=backend, reduction=reduction)
        head.weight.data.copy_(w)
        xg = x.clone().requires_grad_()
        loss = head(xg, labels)
        loss.sum().backward()
        results.append((loss, xg.grad, head.weight.grad, head.t))
    assert results[1][0].shape == results[0][0].shape == ((7,) if reduction == "none" else ())
    for got, want, what in zip(results[1], results[0], ("loss", "dx", "dw", "t")):
        kit.assert_close(got, want, rtol=0, atol=0, what=what)
    with pytest.raises(ValueError, match=r"labels must have shape \(7,\) or \(7, 1\)"):
        fkf.margin_cross_entropy(x, w, y.view(7, 1).expand(7, 2), "arcface", backend=backend)


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_column_labels_are_accepted_by_the_triplet_loss(backend, reduction):
    e, y = kit.triplet_inputs(13, 3, 5)
    loss_fn = fk.TripletMarginLoss(mining="hard", reduction=reduction, backend=backend)
    got, want = loss_fn(e, y.unsqueeze(1)), loss_fn(e, y)
    if reduction == "none":
        assert torch.equal(got[1], want[1])
        got, want = got[0], want[0]
    kit.assert_close(got, want, rtol=0, atol=0, what="loss")
    with pytest.raises(ValueError, match="labels must have shape"):
        loss_fn(e, y.view(1, 13))


# ------------------------------------------------------------------------------- property-based tests


@st.composite
def head_problems(draw):
    batch = draw(st.integers(0, 9))
    classes = draw(st.integers(1, 19))
    features = draw(st.integers(1, 17))
    case = draw(st.sampled_from(kit.ORACLE_CASES))
    options = dict(
        margin_grad=draw(st.sampled_from(["exact", "straight_through"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    ignore = draw(st.floats(0.0, 0.6))
    return batch, classes, features, case, options, seed, ignore


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@given(problem=head_problems())
@pytest.mark.slow
def test_heads_property_against_oracle(backend, problem):
    batch, classes, features, case, options, seed, ignore = problem
    g = torch.Generator().manual_seed(seed)
    x, w, y = kit.head_inputs(batch, classes, features, ignore_frac=ignore, generator=g)
    dtype = kit.precise_dtype(backend)
    # acos' slope is infinite at +-1: there a rounding of c by one ulp (eps) moves phi = cos(theta + m) by
    # ~sqrt(2 eps) * s, a conditioning effect, not an error of the backend (d = 1 puts every c at +-1)
    c = fk.reference.clamp_cosine((fk.reference.normalize_rows(x) * fk.reference.normalize_rows(w)[
        y.clamp_min(0)]).sum(1))  # fmt: skip
    assume(bool((c.abs() < 1 - 1e-4).all()))
    xg, wg = x.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    t0 = float(torch.tensor(0.1, dtype=torch.float32))
    t = torch.tensor(t0) if case == "curricular" else None
    got = _loss(backend, xg, wg, y, case, t=t, **options)
    want, t_want = oracle.head_loss(xo, wo, y, case, t=t0, **options)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    kit.assert_close(got, want, **tol, what="loss")
    if t is not None:
        assert t.item() == pytest.approx(t_want, abs=1e-6)
    if want.requires_grad:
        g = torch.randn(want.shape, dtype=torch.float64)
        (got.double() * g).sum().backward()
        (want * g).sum().backward()
        kit.assert_close(xg.grad, xo.grad, **tol, what="d embeddings")
        kit.assert_close(wg.grad, wo.grad, **tol, what="d weight")


@st.composite
def triplet_problems(draw):
    batch = draw(st.integers(1, 12))
    classes = draw(st.integers(1, 4))
    features = draw(st.integers(1, 6))
    opts = dict(
        margin=draw(st.sampled_from([0.0, 0.2, 1.0])),
        mining=draw(st.sampled_from(["semihard", "hard", "all"])),
        distance=draw(st.sampled_from(["squared_euclidean", "euclidean", "cosine"])),
        normalize=draw(st.booleans()),
        soft=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "mean_nonzero", "sum", "none"])),
    )
    return batch, classes, features, opts, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@given(problem=triplet_problems())
def test_triplet_property_against_brute_force(backend, problem):
    batch, classes, features, opts, seed = problem
    g = torch.Generator().manual_seed(seed)
    e, y = kit.triplet_inputs(batch, classes, features, generator=g)
    dtype = torch.float64
    eg, eo = e.to(dtype).clone().requires_grad_(), e.clone().requires_grad_()
    got = fkf.triplet_margin_loss(eg, y, backend=backend, **opts)
    want = oracle.triplet_loss(eo, y, **opts)
    if opts["reduction"] == "none":
        (got, got_idx), (want, want_idx) = got, want
        assert torch.equal(got_idx, want_idx)
    tol = dict(rtol=1e-8, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    kit.assert_close(got, want, **tol, what="loss")
    if want.requires_grad and want.numel():
        w = torch.randn(want.shape, dtype=torch.float64, generator=g)
        (got.double() * w).sum().backward()
        (want * w).sum().backward()
        kit.assert_close(eg.grad, eo.grad, **tol, what="d embeddings")


# ---------------------------------------------------------------------------- long run, determinism


@pytest.mark.parametrize("backend", CPU_HEAD_BACKENDS)
@pytest.mark.slow
def test_long_run_curricular_t_and_flat_memory(backend):
    import resource

    steps, alpha = 10_000, 0.01
    head = fk.CurricularFace(8, 13, momentum=alpha, backend=backend)
    x, y = torch.randn(6, 8), torch.randint(0, 13, (6,))
    with torch.no_grad():
        mean_c = fk.reference.normalize_rows(x).mul(fk.reference.normalize_rows(head.weight)[y]).sum(1).mean()
    rss = []
    for step in range(steps):
        head(x, y).backward()  # the weight does not change: the target cosines are the same every step
        if step in (steps // 10, steps - 1):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    # closed form of t_k = alpha * c + (1 - alpha) * t_(k-1), t_0 = 0
    assert head.t.item() == pytest.approx((1 - (1 - alpha) ** steps) * mean_c.item(), abs=1e-5)
    assert rss[1] - rss[0] < 20 * 1024, f"peak RSS grew by {rss[1] - rss[0]} KiB over the run"


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_repeated_cpu_runs_are_bitwise_equal(backend):
    x, w, y = torch.randn(33, 64), torch.randn(130, 64), torch.randint(0, 130, (33,))
    results = []
    for _ in range(3):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fkf.margin_cross_entropy(xg, wg, y, "arcface", backend=backend)
        loss.backward()
        results.append((loss, xg.grad, wg.grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ----------------------------------------------------------------------------- compile and autocast


@pytest.mark.parametrize("backend", CPU_HEAD_BACKENDS)
@pytest.mark.slow
def test_model_with_every_head_compiles_fullgraph(backend):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(12, 8)
            self.heads = torch.nn.ModuleList(
                cls(8, 17, backend=backend)
                for cls in (fk.NormSoftmax, fk.ArcFace, fk.CosFace, fk.CombinedMargin, fk.MVSoftmax, fk.CurricularFace)
            )

        def forward(self, inputs, labels):
            emb = self.backbone(inputs)
            return sum(head(emb, labels) for head in self.heads)

    model = Model()
    inputs, labels = torch.randn(7, 12), torch.randint(0, 17, (7,))
    eager = model(inputs, labels)
    model.heads[-1].t.zero_()
    compiled = torch.compile(model, fullgraph=True)(inputs, labels)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_autocast_bf16_on_cpu(backend):
    head = fk.ArcFace(16, 21, backend=backend)
    x, y = torch.randn(5, 16, requires_grad=True), torch.randint(0, 21, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = torch.nn.functional.linear(x, torch.eye(16))  # bf16 under autocast
        loss = head(emb, y)
    loss.backward()
    want = fkf.margin_cross_entropy(x.double(), head.weight.double(), y, "arcface", backend="reference")
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert abs(loss.item() - want.item()) < 0.05 * max(1.0, want.item())
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32


def _opchecked_overloads(source: str) -> set:
    """The op overloads ("margin_lse.default") that a test file passes to opcheck, by parsing its calls:
    exact names, so that an opcheck of triplet_terms.default does not count for triplet_reduce.default."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        target = node.args[0]  # e.g. torch.ops.facekernels.margin_lse.default
        if name == "opcheck" and isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute):
            found.add(f"{target.value.attr}.{target.attr}")
    return found


@pytest.mark.slow
def test_every_registered_op_has_an_opcheck_test():
    # the opcheck calls live next to each op's tests; this guard fails when a facekernels:: op overload lands
    # without one (each opcheck call must name the overload, torch.ops.facekernels.<op>.<overload>)
    import facekernels.kernels.cpu  # noqa: F401
    import facekernels.kernels.triton  # noqa: F401
    import facekernels.kernels.triplet  # noqa: F401

    assert extension_built()
    ops = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("facekernels::")]
    registered = {f"{op}.{overload}" for op in ops for overload in getattr(torch.ops.facekernels, op).overloads()}
    assert len(registered) >= 8, registered
    sources = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "test_*.py"))):
        with open(path) as f:
            sources.append(f.read())

    def missing(texts):
        return registered - set().union(*(_opchecked_overloads(t) for t in texts))

    assert not missing(sources), f"facekernels op overloads without an opcheck test: {sorted(missing(sources))}"
    # the guard can fail: with the opcheck calls of any one overload renamed away it reports exactly that one
    # (a substring match would still pass with every margin_lse.default opcheck removed: margin_lse.default is
    # not a substring of any other overload today, but a future margin_lse_x.default would hide it)
    for overload in sorted(registered):
        hidden = [text.replace(f".{overload}", ".hidden_op.default") for text in sources]
        assert missing(hidden) == {overload}


# the eager reference mines with data-dependent shapes (torch.nonzero): only the fused op compiles whole
@pytest.mark.parametrize("backend", [b for b in TRIPLET_BACKENDS if b != "reference"])
@pytest.mark.parametrize("mining", ["semihard", "hard", "all"])
@pytest.mark.slow
def test_triplet_loss_compiles_fullgraph(backend, mining):
    loss_fn = fk.TripletMarginLoss(mining=mining, backend=backend)
    e, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    e_compiled, e_eager = e.clone().requires_grad_(), e.clone().requires_grad_()
    got = torch.compile(loss_fn, fullgraph=True)(e_compiled, y)
    got.backward()
    want = loss_fn(e_eager, y)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(e_compiled.grad, e_eager.grad)


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_curricular_gradient_accumulation_uses_each_steps_t(backend):
    # two forwards, then one backward of their sum: each backward must use the t of its own forward
    dtype = kit.precise_dtype(backend)
    head = fk.CurricularFace(6, 9, momentum=0.5, backend=backend).to(dtype)
    ref = fk.CurricularFace(6, 9, momentum=0.5, backend="reference").double()
    ref.weight.data.copy_(head.weight.data.double())
    x1, x2 = torch.randn(5, 6, dtype=dtype), torch.randn(5, 6, dtype=dtype)
    y = torch.randint(0, 9, (5,))
    (head(x1, y) + head(x2, y)).backward()
    (ref(x1.double(), y) + ref(x2.double(), y)).backward()
    kit.assert_close(head.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5, what="d weight")
    torch.testing.assert_close(head.t, ref.t)


@pytest.mark.parametrize("backend", TRIPLET_BACKENDS)
@pytest.mark.parametrize("mining", ["semihard", "hard", "all"])
def test_repeated_triplet_runs_are_bitwise_equal(backend, mining):
    e, y = torch.randn(67, 33), torch.randint(0, 9, (67,))
    results = []
    for _ in range(3):
        eg = e.clone().requires_grad_()
        loss = fkf.triplet_margin_loss(eg, y, mining=mining, backend=backend)
        loss.backward()
        results.append((loss, eg.grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_curricular_t_keeps_its_float32_value_through_dtype_casts(cast):
    head = fk.CurricularFace(4, 5, backend="reference")
    head.t.fill_(0.12345679)
    before = head.t.clone()
    getattr(head, cast)()
    assert head.t.dtype == torch.float32 and torch.equal(head.t, before)  # not rounded through the half type
    assert head.weight.dtype == getattr(torch, {"half": "float16"}.get(cast, cast))


@kit.needs_ext
def test_triplet_under_torch_func():
    # torch.func.grad matches autograd; forward-mode AD and vmap raise torch's clear errors (no jvp / vmap rule)
    e, y = kit.triplet_inputs(8, 3, dtype=torch.float64)
    loss = lambda a: fkf.triplet_margin_loss(a, y, backend="cpu")  # noqa: E731
    ea = e.clone().requires_grad_()
    loss(ea).backward()
    kit.assert_close(torch.func.grad(loss)(e), ea.grad, rtol=1e-12, atol=1e-12, what="torch.func.grad")
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(loss, (e,), (torch.ones_like(e),))
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(loss)(e.unsqueeze(0).expand(2, -1, -1).clone())


# ------------------------------------------------------------------------------------------ deferred label checks


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Raises on every read of a tensor's value by the host (on CUDA each one is a sync)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__bool__", "item", "__int__", "__float__", "tolist", "numpy"):
            raise AssertionError(f"host read {func.__name__} of a tensor in the step")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def deferred_label_checks():
    # the CUDA default, forced on CPU tensors: reported by the device, raised at a later call
    fk.set_label_checks(True, deferred=True)
    yield
    fk.set_label_checks(True)
    fk._validate._pending_label_reports.clear()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_deferred_label_check_raises_at_the_next_call_and_meanwhile_gives_nan(backend, deferred_label_checks):
    if backend == "cpu" and not extension_built():
        pytest.skip("needs facekernels._C")
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    good, bad = torch.tensor([0, 1, 2, 4]), torch.tensor([0, 9, 2, -1])
    want = fkf.margin_cross_entropy(x, w, good, "arcface", reduction="none", ignore_index=-1, backend="reference")
    fk.check_labels()  # its report read now: the next call's read of a finished report is of host memory
    with _NoHostReads():  # no host read of the labels (nor of anything else) in the step
        rows = fkf.margin_cross_entropy(x, w, bad, "arcface", reduction="none", ignore_index=-1, backend=backend)
    assert math.isnan(rows[1]) and rows[3] == 0  # the bad label's row: NaN, never a wrong finite loss
    kit.assert_close(rows[[0, 2]], want[[0, 2]].float(), rtol=1e-5, atol=1e-6, what="the other rows")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) or equal ignore_index=-1; found 9"):
        fkf.margin_cross_entropy(x, w, good, "arcface", ignore_index=-1, backend=backend)
    fkf.margin_cross_entropy(x, w, good, "arcface", backend=backend)  # reported once
    fkf.margin_cross_entropy(x, w, torch.tensor([0, 1, 7, 5]), "arcface", backend=backend)
    with pytest.raises(ValueError, match="found 7"):  # the documented sync point: the first bad label
        fk.check_labels()
    fk.check_labels()  # nothing pending


def test_label_check_during_cuda_graph_capture_touches_no_event(monkeypatch, deferred_label_checks):
    # capturing a step (torch.cuda.graphs, reduce-overhead) after uncaptured steps: their reports' events must
    # not be queried, an event query during capture invalidates it. CUDA labels stood in for on CPU.
    class Event:
        def query(self):
            raise AssertionError("an event queried during capture")

    class CudaLabels:
        device = torch.device("cuda")

        def numel(self):
            return 4

    fk._validate._pending_label_reports.append((Event(), torch.tensor([0, 0]), 5, -1))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fk._validate.check_label_values(CudaLabels(), 5, -1)
    assert len(fk._validate._pending_label_reports) == 1  # read after the capture, not during it


def test_label_checks_on_cpu_labels_stay_immediate_by_default():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match="found 9"):
        fkf.margin_cross_entropy(x, w, torch.tensor([0, 9, 2, 4]), "arcface", backend="reference")
    assert not fk._validate._pending_label_reports
