"""The heads of heads-more.md (AdaFace, MagFace, ElasticFace, Sub-center ArcFace, inter-class filtering):

(a) the float64 oracle (tests/oracle_more.py) against every official worked example of the spec;
(b) the library's reference backend against the oracle on random float64 inputs, losses and gradients;
(c) the worked examples through the library (reference and cpu backends, functional form) and the modules;
(d) malformed hyper-parameters.
"""

import math

import kit
import oracle_more as O
import pytest
import torch

import facekernels as fk
from facekernels import functional as fkf

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)

# the spec's shared worked example (heads-more §1e): rows of W are classes
W_EX = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], dtype=F64)
X_EX = torch.tensor([[2.0, 1.0], [0.6, 0.8]], dtype=F64)
Y_EX = torch.tensor([0, 2])
X_MAG = torch.tensor([[20.0, 10.0], [30.0, 40.0]], dtype=F64)  # §2e: the same directions, norms 22.36 and 50
# §4e: class 0: (1,0), (0,-1), (-1,0); class 1: (0,2), (1,1), (-2,1); class 2: (-1,-1), (1,-2), (0.5,0.5)
W_SUB = torch.tensor([[1, 0], [0, -1], [-1, 0], [0, 2], [1, 1], [-2, 1], [-1, -1], [1, -2], [0.5, 0.5]], dtype=F64)
ROW_CAP = O.INSIGHTFACE_ROW_CAP
# the official gradients printed in §1e (AdaFace, t_alpha 1) and §4e (Sub-center: dW nonzero on rows 0, 4, 8)
ADA_DX = torch.tensor([[-5.121652, 10.243304], [-14.136225, 10.602169]], dtype=F64)
ADA_DW = torch.tensor([[0, -7.366722], [18.720707, 0], [0.764798, -0.764798]], dtype=F64)
SUB_DX = torch.tensor([[-7.280037, 14.560075], [-11.706677, 8.780008]], dtype=F64)
SUB_DW = torch.zeros(9, 2, dtype=F64)
SUB_DW[0], SUB_DW[4], SUB_DW[8] = torch.tensor([-5.3e-9, -26.280899]), torch.tensor([0.267093, -0.267093]), 24.218449
SUB_DW[8, 1] = -24.218449


def rel(want, tol=1e-9):
    """Relative agreement (the official digits are printed to 1e-10 and more)."""
    return pytest.approx(want, rel=tol, abs=0)


def grads(fn, x, w):
    """(loss, dx, dw) of fn(x, w) with a fixed random upstream gradient (loss may be a vector)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w)
    g = torch.randn(loss.shape, dtype=F64, generator=torch.Generator().manual_seed(1)) if loss.dim() else 1.0
    (loss * g).sum().backward()
    return loss.detach(), x.grad, w.grad


def assert_same(got_fn, want_fn, x, w, what):
    """Library vs oracle: the loss and both gradients to 1e-9."""
    got, gx, gw = grads(got_fn, x, w)
    want, ox, ow = grads(want_fn, x, w)
    assert got.dtype == F64
    kit.assert_close(got, want, **TOL, what=f"{what}: loss")
    kit.assert_close(gx, ox, **TOL, what=f"{what}: dx")
    kit.assert_close(gw, ow, **TOL, what=f"{what}: dw")


# ---------------------------------------------------------------------------------- (a) oracle vs the spec


def test_oracle_adaface_worked_example():
    # official AdaFace(embedding_size=2, classnum=3): m .4, h .333, s 64, t_alpha 1.0, fresh buffers (20, 100)
    kw = dict(s=64.0, m=0.4, h=0.333, eps=1e-3, batch_mean=20.0, batch_std=100.0, training=True)
    x, w = X_EX.clone().requires_grad_(), W_EX.clone().requires_grad_()
    loss, mu, sigma = O.adaface_loss(x, w, Y_EX, t_alpha=1.0, **kw)
    loss.backward()
    assert loss.item() == rel(67.8600276196)
    assert mu == pytest.approx(1.6180339887, abs=1e-10) and sigma == pytest.approx(0.8740320489, abs=1e-10)
    kit.assert_close(x.grad, ADA_DX, rtol=0, atol=1e-6, what="AdaFace dX")
    kit.assert_close(w.grad, ADA_DW, rtol=0, atol=1e-6, what="AdaFace dW")
    loss, mu, sigma = O.adaface_loss(X_EX, W_EX, Y_EX, t_alpha=0.01, **kw)
    assert loss.item() == rel(69.3833459442)
    assert mu == pytest.approx(19.8161803399, abs=1e-10) and sigma == pytest.approx(99.0087403205, abs=1e-10)


def test_oracle_adaface_eval_and_small_batches_keep_the_buffers():
    # eval reads the buffers (spec c1); one valid row updates the mean only (c2); none updates nothing
    _, mu, sigma = O.adaface_loss(X_EX, W_EX, Y_EX, t_alpha=0.5, batch_mean=3.0, batch_std=2.0, training=False)
    assert (mu, sigma) == (3.0, 2.0)
    _, mu, sigma = O.adaface_loss(X_EX, W_EX, torch.tensor([0, -100]), t_alpha=0.5, batch_mean=3.0, batch_std=2.0)
    assert mu == pytest.approx(0.5 * math.sqrt(5) + 1.5, abs=1e-15) and sigma == 2.0
    _, mu, sigma = O.adaface_loss(X_EX, W_EX, torch.tensor([-100, -100]), t_alpha=0.5, batch_mean=3.0,
                                  batch_std=2.0)  # fmt: skip
    assert (mu, sigma) == (3.0, 2.0)


def test_oracle_magface_worked_example():
    q = dict(l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8)
    a = (math.sqrt(500), 50.0)
    assert [O.magface_margin(v, **q) for v in a] == pytest.approx([0.493262, 0.59], abs=1e-6)
    assert [O.magface_g(v, u_a=110.0) for v in a] == pytest.approx([0.0465693, 0.0241322], abs=1e-7)
    easy = O.magface_loss(X_MAG, W_EX, Y_EX).item()  # defaults: s 64, lambda_g 35, easy_margin, arc
    assert easy == rel(58.5157940548)
    loss_id = O.magface_loss(X_MAG, W_EX, Y_EX, lambda_g=0.0).item()
    assert loss_id == rel(57.2785163870)
    assert easy - loss_id == pytest.approx(1.2372777, abs=1e-7)
    # easy_margin=False: row 1 (c = -0.99) falls back to c - sin(pi - 0.59) 0.59 = -1.318202
    c1 = torch.tensor(-7 / (5 * math.sqrt(2)), dtype=F64)  # row 1's target cosine, -0.98995
    assert O.arc_target(c1, 0.59, "monotonic").item() == pytest.approx(-1.318202, abs=1e-6)
    hard = O.magface_loss(X_MAG, W_EX, Y_EX, easy_margin=False).item()
    assert hard == rel(69.0198901674)
    q_cos = dict(kind="cos", l_m=0.35, lambda_g=150.0)
    assert [O.magface_margin(v, **{**q, "l_m": 0.35}) for v in a] == pytest.approx([0.405623, 0.53], abs=1e-6)
    cos = O.magface_loss(X_MAG, W_EX, Y_EX, **q_cos).item()
    assert cos == rel(79.5747502786)
    cos_id = O.magface_loss(X_MAG, W_EX, Y_EX, **{**q_cos, "lambda_g": 0.0}).item()
    assert cos_id == rel(74.2721317022)


def _official_draws(m):
    torch.manual_seed(0)  # §3e: the default generator seeded 0 before the official forward
    return O.elastic_draws(2, m, 0.05)


def test_oracle_elastic_worked_example():
    draws = _official_draws(0.5)
    assert draws.dtype == torch.float32
    assert draws.tolist() == pytest.approx([0.5770498, 0.4853286], abs=1e-7)
    # official: no fallback ("none"); row 1 has theta + m = 3.485 > pi, a row that differs by design
    arc = O.elastic_loss(X_EX, W_EX, Y_EX, margins=draws, kind="arc", fallback="none").item()
    assert arc == rel(55.7431158407)
    c = O.target_cosines(X_EX, W_EX, Y_EX)
    assert c == pytest.approx([0.894427, -0.989949], abs=1e-6)
    c1 = torch.tensor(c[1], dtype=F64)
    assert O.arc_target(c1, float(draws[1]), "none").item() == pytest.approx(-0.941605, abs=1e-6)
    assert O.arc_target(c1, float(draws[1]), "monotonic").item() == pytest.approx(-1.216355, abs=1e-6)
    spec = O.elastic_loss(X_EX, W_EX, Y_EX, margins=draws, kind="arc", reduction="none").tolist()
    official = O.elastic_loss(X_EX, W_EX, Y_EX, margins=draws, kind="arc", fallback="none", reduction="none")
    assert spec[0] == official[0].item() and spec[1] > official[1].item() + 10  # only row 1 differs
    # plus (B = 2: official = rank-matched): row 0 gets the smaller draw
    for plus in (True, "official"):
        used = O.elastic_assign(c, draws, plus)
        assert used == [float(draws[1]), float(draws[0])]
        loss = O.elastic_loss(X_EX, W_EX, Y_EX, margins=used, kind="arc", fallback="none").item()
        assert loss == rel(54.6178694569)
    draws = _official_draws(0.35)
    assert draws.tolist() == pytest.approx([0.4270498, 0.3353285], abs=1e-7)
    cos = O.elastic_loss(X_EX, W_EX, Y_EX, margins=draws, kind="cos").item()
    assert cos == rel(68.1304260167)
    plus = O.elastic_loss(X_EX, W_EX, Y_EX, margins=O.elastic_assign(c, draws, True), kind="cos").item()
    assert plus == rel(70.9443674054)


def test_oracle_elastic_plus_assignment_of_the_spec():
    # §3c1: target cosines (0.1, 0.9, 0.5), draws (0.4270, 0.3353, 0.2411)
    c, d = [0.1, 0.9, 0.5], [0.4270, 0.3353, 0.2411]
    assert O.elastic_assign(c, d, "official") == [0.3353, 0.4270, 0.2411]
    assert O.elastic_assign(c, d, True) == [0.4270, 0.2411, 0.3353]
    assert O.elastic_assign(c, d, False) == d
    # ties go to the lower row index: rows 0 and 2 tie, row 0 ranks first (smaller margin)
    assert O.elastic_assign([0.5, 0.9, 0.5], [0.3, 0.1, 0.2], True) == [0.2, 0.1, 0.3]


def test_oracle_subcenter_worked_example():
    # official (MXNet, x / sqrt(|x|^2 + 1e-10)): loss, dX, and dW nonzero on rows 0, 4, 8 only
    x, w = X_EX.clone().requires_grad_(), W_SUB.clone().requires_grad_()
    loss = O.subcenter_loss(x, w, Y_EX, s=64.0, m=0.5, k=3, fallback="none", mxnet_eps=1e-10)
    loss.backward()
    assert loss.item() == rel(18.4951620659)
    kit.assert_close(x.grad, SUB_DX, rtol=0, atol=1e-6, what="Sub-center dX")
    kit.assert_close(w.grad, SUB_DW, rtol=0, atol=1e-6, what="Sub-center dW")
    assert w.grad[0, 0].item() == pytest.approx(-5.3e-9, abs=1e-10)
    # the spec's form drops the 1e-10 (§4c): 1.0e-9 relative from the official digits, and dW[0, 0] exactly 0
    x, w = X_EX.clone().requires_grad_(), W_SUB.clone().requires_grad_()
    spec = O.subcenter_loss(x, w, Y_EX, s=64.0, m=0.5, k=3)
    spec.backward()
    assert spec.item() == rel(18.4951620659, 2e-9)
    assert w.grad[0, 0].item() == 0.0


def test_oracle_subcenter_tie_goes_to_the_first_sub_center():
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=F64, requires_grad=True)
    x = torch.tensor([[1.0, 0.5]], dtype=F64)
    O.subcenter_loss(x, w, torch.tensor([0]), s=4.0, k=2).backward()
    assert w.grad[0].abs().sum() > 0 and torch.all(w.grad[1] == 0)  # class 0: equal cosines, sub-center 0
    assert w.grad[2].abs().sum() > 0 and torch.all(w.grad[3] == 0)  # class 1 likewise


def test_oracle_filter_worked_example():
    # filtered at 0.4: row 0's class 1, row 1's classes 0 and 1; official no-fallback ArcFace row 1
    arc = dict(head="combined", m1=1.0, m2=0.5, m3=0.0, fallback="none")
    got = O.filtered_loss(X_EX, W_EX, Y_EX, threshold=0.4, **arc).item()
    assert got == rel(30.3166031158)
    c1 = torch.tensor(-7 / (5 * math.sqrt(2)), dtype=F64)
    assert O.arc_target(c1, 0.5, "none").item() == pytest.approx(-0.936563, abs=1e-6)
    assert O.arc_target(c1, 0.5, "monotonic").item() == pytest.approx(-1.229662, abs=1e-6)
    # The other three official numbers are insightface's DistCrossEntropy, which takes log(max(p, 1e-30)): row 1's
    # loss (111.1, 140.2 and 89.6 as the spec's CE defines it) is capped at 30 ln 10 = 69.0776. Reproduced here
    # with that cap; the library follows heads.md's CE (no cap), checked in test_library_filter_worked_example.
    cos = dict(head="combined", m1=1.0, m2=0.0, m3=0.4)
    for kw, th, want in [(arc, 0.0, 34.5389631969), (cos, 0.0, 34.5625614778), (cos, 0.4, 34.5387763949)]:
        rows = O.filtered_loss(X_EX, W_EX, Y_EX, threshold=th, reduction="none", **kw)
        assert rows[1].item() > ROW_CAP
        capped = rows.clamp_max(ROW_CAP).mean().item()
        assert capped == rel(want)


# ------------------------------------------------------------------------- (b) library reference vs oracle


def rows(seed, *, batch=13, classes=29, features=11, k=1, ignore=(2, 7), ignore_index=-100):
    """x (B, d), w (C k, d), y: rows i % 3 == 0 near one sub-center of their class (theta small), i % 3 == 1
    opposite to it (theta + m > pi: the fallbacks), the rest random; rows ``ignore`` labelled ignore_index.
    With k > 1 the even classes' sub-centers are clustered (so an opposite row is opposite to all of them)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes * k, features, generator=g, dtype=F64)
    if k > 1:
        for j in range(0, classes, 2):
            w[j * k : (j + 1) * k] = w[j * k] + 0.2 * torch.randn(k, features, generator=g, dtype=F64)
    y = torch.randint(0, classes, (batch,), generator=g)
    sub = torch.randint(0, k, (batch,), generator=g)
    x = torch.randn(batch, features, generator=g, dtype=F64)
    for i in range(batch):
        target = w[int(y[i]) * k + int(sub[i])]
        if i % 3 == 0:
            x[i] = 3 * target + 0.6 * x[i]
        elif i % 3 == 1:
            x[i] = -3 * target + 0.6 * x[i]
    y[list(ignore)] = ignore_index
    return x, w, y


def lib(head, y, **kw):
    """The library's reference backend as a function of (x, w)."""
    return lambda x, w: fkf.margin_cross_entropy(x, w, y, head, backend="reference", **kw)


# AdaFace -------------------------------------------------------------------------------------------------


def adaface_rows(seed):
    """rows() plus AdaFace's edge cases: a norm above 100 and one below 0.001 (both clipped), a target cosine
    above 1 - eps and a negative below -1 + eps (clamped, zero gradient)."""
    x, w, y = rows(seed)
    x[3] *= 30.0  # a near row with norm ~300 -> 100: z_hat = 1, theta - m < eps (the CLIP fallback, flat)
    x[9] *= 1e-5
    x[6] = 2 * w[y[6]] + 1e-3 * x[6]  # cosine > 1 - 1e-3
    x[4] = -2 * w[(int(y[4]) + 1) % w.shape[0]] + 1e-3 * x[4]  # a negative below -1 + 1e-3
    return x, w, y


@pytest.mark.parametrize("t_alpha, start", [(1.0, (20.0, 100.0)), (0.01, (5.0, 2.0))])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.slow
def test_adaface_reference_matches_oracle(t_alpha, start, training, reduction, margin_grad):
    x, w, y = adaface_rows(1)
    kw = dict(s=64.0, m=0.4, h=0.333, t_alpha=t_alpha, eps=1e-3, reduction=reduction, margin_grad=margin_grad)
    buffers = []

    def got(a, b):
        mean, std = torch.tensor(start[0], dtype=F64), torch.tensor(start[1], dtype=F64)
        buffers.append((mean, std))
        return fkf.margin_cross_entropy(a, b, y, "adaface", batch_mean=mean, batch_std=std, training=training,
                                        backend="reference", **kw)  # fmt: skip

    want = lambda a, b: O.adaface_loss(a, b, y, batch_mean=start[0], batch_std=start[1], training=training,
                                       **kw)[0]  # fmt: skip
    assert_same(got, want, x, w, f"AdaFace t_alpha={t_alpha} training={training}")
    _, mu, sigma = O.adaface_loss(x, w, y, batch_mean=start[0], batch_std=start[1], training=training, **kw)
    mean, std = buffers[0]
    assert mean.item() == pytest.approx(mu, rel=1e-12) and std.item() == pytest.approx(sigma, rel=1e-12)
    assert (mean.item(), std.item()) != start if training else (mean.item(), std.item()) == start


def test_adaface_float32_buffers_are_float32_arithmetic():
    # float32 buffers: the EMA in float32 (1 ulp from a once-rounded float64 update: tolerance 1e-6)
    x, w, y = adaface_rows(2)
    mean, std = torch.tensor(20.0), torch.tensor(100.0)
    got = fkf.margin_cross_entropy(x, w, y, "adaface", batch_mean=mean, batch_std=std, t_alpha=0.1,
                                   backend="reference")  # fmt: skip
    want, mu, sigma = O.adaface_loss(x, w, y, t_alpha=0.1, buffer_dtype=torch.float32)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    assert mean.item() == pytest.approx(mu, rel=1e-6) and std.item() == pytest.approx(sigma, rel=1e-6)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("backend", kit.HEAD_BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.slow
def test_adaface_a_non_finite_norm_updates_no_statistic(backend, bad):
    # an Inf embedding (a float16 overflow) has an Inf norm, which the margins clip to 100: the statistics must
    # still see the batch as not finite, as the NaN loss and GradScaler do, and keep their values
    x, w, y = adaface_rows(5)
    x[5, 0] = bad  # a valid row (rows 2 and 7 are ignored)
    dev = kit.device(backend)
    x, w, y = x.to(dev, torch.float32), w.to(dev, torch.float32), y.to(dev)
    mean, std = torch.tensor(20.0, device=dev), torch.tensor(100.0, device=dev)
    loss = fkf.margin_cross_entropy(x, w, y, "adaface", batch_mean=mean, batch_std=std, t_alpha=0.5,
                                    backend=backend)  # fmt: skip
    assert torch.isnan(loss)
    assert (mean.item(), std.item()) == (20.0, 100.0)
    # the same batch labelled ignore_index on that row is finite and moves both
    y[5] = -100
    loss = fkf.margin_cross_entropy(x, w, y, "adaface", batch_mean=mean, batch_std=std, t_alpha=0.5,
                                    backend=backend)  # fmt: skip
    assert torch.isfinite(loss) and mean.item() != 20.0 and std.item() != 100.0


def test_adaface_one_valid_row_keeps_the_std():
    x, w, y = adaface_rows(3)
    y[1:] = -100
    mean, std = torch.tensor(20.0, dtype=F64), torch.tensor(100.0, dtype=F64)
    got = fkf.margin_cross_entropy(x, w, y, "adaface", batch_mean=mean, batch_std=std, t_alpha=0.5,
                                   backend="reference")  # fmt: skip
    want, mu, sigma = O.adaface_loss(x, w, y, t_alpha=0.5)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-9)
    assert mean.item() == pytest.approx(mu, rel=1e-12) and mean.item() != 20.0 and std.item() == 100.0


def test_adaface_module_step():
    # the module's buffers are float32 (kept under .double()); after a step they hold the float32 EMA
    x, w, y = adaface_rows(4)
    head = fk.AdaFace(11, 29, t_alpha=0.2, backend="reference").double()
    assert head.batch_mean.dtype == torch.float32 and head.batch_mean.item() == 20.0 and head.batch_std == 100.0
    with torch.no_grad():
        head.weight.copy_(w)
    got = head(x, y)
    want, mu, sigma = O.adaface_loss(x, w, y, t_alpha=0.2, buffer_dtype=torch.float32)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert head.batch_mean.item() == pytest.approx(mu, rel=1e-6)
    assert head.batch_std.item() == pytest.approx(sigma, rel=1e-6)
    assert {"batch_mean", "batch_std"} <= set(head.state_dict())
    head.eval()
    before = (head.batch_mean.item(), head.batch_std.item())
    got = head(x, y)
    want = O.adaface_loss(x, w, y, t_alpha=0.2, batch_mean=before[0], batch_std=before[1], training=False,
                          buffer_dtype=torch.float32)[0]  # fmt: skip
    assert (head.batch_mean.item(), head.batch_std.item()) == before
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


# MagFace -------------------------------------------------------------------------------------------------


def magface_rows(seed):
    """rows() with norms 5, 30, 80, 150 in turn: below l_a, inside, inside, above u_a (defaults 10, 110)."""
    x, w, y = rows(seed)
    norms = torch.tensor([[5.0], [30.0], [80.0], [150.0]], dtype=F64).repeat(4, 1)[: len(x)]
    return x / x.norm(dim=1, keepdim=True) * norms, w, y


MAGFACE = {
    "arc_easy": dict(easy_margin=True, kind="arc"),
    "arc_hard": dict(easy_margin=False, kind="arc"),
    "cos": dict(kind="cos", l_m=0.35, lambda_g=150.0),
}


@pytest.mark.parametrize("case", list(MAGFACE))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.slow
def test_magface_reference_matches_oracle(case, reduction, margin_grad):
    x, w, y = magface_rows(5)
    kw = dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, reduction=reduction,
              margin_grad=margin_grad)  # fmt: skip
    kw.update(MAGFACE[case])
    assert_same(lib("magface", y, **kw), lambda a, b: O.magface_loss(a, b, y, **kw), x, w, f"MagFace {case}")


def test_magface_radial_gradient_only_inside_the_norm_range():
    # rows with ||x|| < l_a or > u_a get no radial gradient (spec c2): dx orthogonal to x there, not inside
    x, w, y = magface_rows(6)
    _, dx, _ = grads(lib("magface", y), x, w)
    radial = (dx * x).sum(1) / x.norm(dim=1)
    norms = x.norm(dim=1)
    outside = ((norms < 10) | (norms > 110)) & (y != -100)
    inside = ~outside & (y != -100)
    assert outside.any() and inside.any()
    assert radial[outside].abs().max() < 1e-12 and radial[inside].abs().min() > 1e-6


def test_magface_module():
    x, w, y = magface_rows(7)
    head = fk.MagFace(11, 29, backend="reference").double()
    assert torch.allclose(head.weight.norm(dim=1), torch.ones(29, dtype=F64))  # unit-norm start (decision 1)
    with torch.no_grad():
        head.weight.copy_(w)
    got = head(x, y)
    assert got.item() == pytest.approx(O.magface_loss(x, w, y).item(), rel=1e-9)


# ElasticFace ---------------------------------------------------------------------------------------------

ELASTIC = {"arc": ("elastic_arcface", 0.5, "arc"), "cos": ("elastic_cosface", 0.35, "cos")}


def elastic_oracle(x, w, y, kind, *, plus, seed, fallback="monotonic", std=0.05, training=True, **kw):
    _, m, k = ELASTIC[kind]
    margins = O.elastic_margins(x, w, y, m=m, std=std, plus=plus, training=training,
                                generator=torch.Generator().manual_seed(seed),
                                ignore_index=kw.get("ignore_index", -100))  # fmt: skip
    loss = lambda a, b: O.elastic_loss(a, b, y, s=64.0, margins=margins, kind=k,
                                       fallback=fallback, **kw)  # fmt: skip
    return loss, margins


def elastic_lib(y, kind, *, plus, seed, fallback=None, std=0.05, training=True, **kw):
    head, m, _ = ELASTIC[kind]
    extra = dict(fallback=fallback) if kind == "arc" else {}

    def loss(a, b):
        g = torch.Generator().manual_seed(seed)  # a fresh, identically seeded generator on every call
        return fkf.margin_cross_entropy(a, b, y, head, s=64.0, m=m, std=std, plus=plus, generator=g,
                                        training=training, backend="reference", **extra, **kw)  # fmt: skip

    return loss


@pytest.mark.parametrize("backend", kit.HEAD_BACKENDS)
@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elastic_a_nan_margin_on_an_ignored_row_changes_nothing(backend, kind):
    # an ignored row's margin is never read: NaN there (rows 2 and 7 are ignored) gives the loss and the
    # gradients of any finite margin, every weight row's gradient finite
    head = ELASTIC[kind][0]
    dev = kit.device(backend)
    x, w, y = (a.to(dev, torch.float32) if a.is_floating_point() else a.to(dev) for a in rows(6))  # every backend's
    results = []
    for bad in (math.nan, 0.3):
        margins = torch.full((x.shape[0],), 0.4, device=dev)
        margins[2] = bad
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fkf.margin_cross_entropy(xg, wg, y, head, row_margins=margins, backend=backend)
        loss.backward()
        results.append((loss.detach(), xg.grad, wg.grad))
    assert torch.isfinite(results[0][2]).all()
    for got, want, what in zip(results[0], results[1], ("loss", "dx", "dW")):
        assert torch.equal(got, want), what


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("plus", [False, True, "official"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.slow
def test_elastic_reference_matches_oracle(kind, plus, reduction, margin_grad):
    x, w, y = rows(8)
    kw = dict(reduction=reduction, margin_grad=margin_grad)
    want, _ = elastic_oracle(x, w, y, kind, plus=plus, seed=11, std=0.1, **kw)
    assert_same(elastic_lib(y, kind, plus=plus, seed=11, std=0.1, **kw), want, x, w, f"Elastic {kind} plus={plus}")


@pytest.mark.parametrize("fallback", ["none", "monotonic", "easy_margin", "facexzoo", 0.2])
def test_elastic_arc_fallbacks(fallback):
    x, w, y = rows(9)
    want, _ = elastic_oracle(x, w, y, "arc", plus=False, seed=3, fallback=fallback, reduction="none")
    got = elastic_lib(y, "arc", plus=False, seed=3, fallback=fallback, reduction="none")
    assert_same(got, want, x, w, f"ElasticArcFace fallback={fallback}")


def test_elastic_margins_used():
    # cos kind, reduction none: each row's loss pins its margin; the three assignments differ on these rows, and
    # the library's draw equals the oracle's (the same seed), also as an explicit row_margins vector
    x, w, y = rows(10)
    losses = {}
    for plus in (False, True, "official"):
        want, margins = elastic_oracle(x, w, y, "cos", plus=plus, seed=5, reduction="none")
        got = elastic_lib(y, "cos", plus=plus, seed=5, reduction="none")(x, w)
        kit.assert_close(got, want(x, w), **TOL, what=f"plus={plus} row losses")
        explicit = fkf.margin_cross_entropy(x, w, y, "elastic_cosface", row_margins=margins, reduction="none",
                                            backend="reference")  # fmt: skip
        kit.assert_close(explicit, got, **TOL, what=f"plus={plus}: row_margins vs drawn")
        losses[plus] = got
    assert not torch.allclose(losses[True], losses["official"]) and not torch.allclose(losses[True], losses[False])


def test_elastic_plus_ties_go_to_the_lower_row():
    # rows 3 and 9 identical (same x, same label): equal target cosines; rank-matched gives row 3 the smaller
    # of their two margins. Checked per row through the cos kind (the row loss pins the margin).
    x, w, y = rows(27)
    x[9], y[9] = x[3], y[3]
    want, margins = elastic_oracle(x, w, y, "cos", plus=True, seed=8, std=0.1, reduction="none")
    assert margins[3] < margins[9]
    got = elastic_lib(y, "cos", plus=True, seed=8, std=0.1, reduction="none")
    assert_same(got, want, x, w, "ElasticCosFace+ with a tie")


def test_elastic_draws_one_value_per_row_and_valid_rows_take_them_in_order():
    # B = 20 with 3 ignored rows: facekernels draws B = 20 values (no host sync to count the valid rows), valid row
    # r takes draw r. The official draws n_v = 17, which differs from 16 values on (torch.normal's vectorised
    # path): the margins equal the official ones only when no row is ignored (test_elastic_worked_example_*)
    x, w, y = rows(12, batch=20, ignore=(0, 5, 11))
    assert not torch.equal(O.elastic_draws(17, 0.35, 0.05, torch.Generator().manual_seed(4)),
                           O.elastic_draws(20, 0.35, 0.05, torch.Generator().manual_seed(4))[:17])  # fmt: skip
    want, margins = elastic_oracle(x, w, y, "cos", plus=False, seed=4, reduction="none")
    valid = y != -100
    first = O.elastic_draws(20, 0.35, 0.05, torch.Generator().manual_seed(4))[:17].double()
    assert torch.equal(margins[valid], first)
    got = elastic_lib(y, "cos", plus=False, seed=4, std=0.05, reduction="none")
    assert_same(got, want, x, w, "ElasticCosFace B=20, 3 ignored")


def test_elastic_default_generator_and_ignore_index():
    # generator=None draws from the default generator; the official ignore label -1
    x, w, y = rows(13, ignore=(1, 4), ignore_index=-1)
    torch.manual_seed(21)
    got = fkf.margin_cross_entropy(x, w, y, "elastic_arcface", ignore_index=-1, backend="reference")
    torch.manual_seed(21)
    draws = O.elastic_draws(13, 0.5, 0.05)[:11]
    margins = torch.full((13,), 0.5, dtype=F64)
    margins[[i for i in range(13) if int(y[i]) != -1]] = draws.double()
    want = O.elastic_loss(x, w, y, margins=margins, ignore_index=-1)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elastic_eval_uses_m_and_draws_nothing(kind):
    x, w, y = rows(14)
    g = torch.Generator().manual_seed(2)
    state = g.get_state()
    head, m, k = ELASTIC[kind]
    got = fkf.margin_cross_entropy(x, w, y, head, generator=g, training=False, plus=True, backend="reference")
    want = O.elastic_loss(x, w, y, margins=torch.full((13,), m, dtype=F64), kind=k)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    assert torch.equal(g.get_state(), state)


def test_elastic_modules():
    x, w, y = rows(15)
    for cls, kind in ((fk.ElasticArcFace, "arc"), (fk.ElasticCosFace, "cos")):
        head = cls(11, 29, plus=True, generator=torch.Generator().manual_seed(6), backend="reference").double()
        with torch.no_grad():
            head.weight.copy_(w)
        want, _ = elastic_oracle(x, w, y, kind, plus=True, seed=6)
        assert head(x, y).item() == pytest.approx(want(x, w).item(), rel=1e-9), kind
        head.eval()
        want = O.elastic_loss(x, w, y, margins=torch.full((13,), ELASTIC[kind][1], dtype=F64), kind=kind)
        assert head(x, y).item() == pytest.approx(want.item(), rel=1e-9), kind


# Sub-center ArcFace --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("easy_margin, fallback", [(False, None), (False, "none"), (True, None)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.slow
def test_subcenter_reference_matches_oracle(k, easy_margin, fallback, reduction, margin_grad):
    x, w, y = rows(16, k=k)
    kw = dict(s=64.0, m=0.5, k=k, easy_margin=easy_margin, reduction=reduction, margin_grad=margin_grad)
    opt = {} if fallback is None else dict(fallback=fallback)
    want = lambda a, b: O.subcenter_loss(a, b, y, fallback=fallback or "monotonic", **kw)
    assert_same(lib("subcenter_arcface", y, **kw, **opt), want, x, w, f"SubCenter k={k} easy={easy_margin}")


def test_subcenter_sum_reduction_and_module():
    x, w, y = rows(17, k=3)
    assert_same(lib("subcenter_arcface", y, k=3, reduction="sum"),
                lambda a, b: O.subcenter_loss(a, b, y, k=3, reduction="sum"), x, w, "SubCenter sum")  # fmt: skip
    head = fk.SubCenterArcFace(11, 29, k=3, backend="reference").double()
    assert tuple(head.weight.shape) == (87, 11)
    with torch.no_grad():
        head.weight.copy_(w)
    assert head(x, y).item() == pytest.approx(O.subcenter_loss(x, w, y, k=3).item(), rel=1e-9)


# inter-class filtering ------------------------------------------------------------------------------------

FILTER_HEADS = {
    "norm_softmax": ("norm_softmax", dict(s=64.0), dict()),
    "arcface": ("arcface", dict(s=64.0, m=0.5), dict(m=0.5)),
    "arcface_none": ("arcface", dict(s=64.0, m=0.5, fallback="none"), dict(m=0.5, fallback="none")),
    "arcface_easy": ("arcface", dict(s=30.0, m=0.5, easy_margin=True), dict(s=30.0, m=0.5, easy_margin=True)),
    "cosface": ("cosface", dict(s=64.0, m=0.35), dict(m=0.35)),
    "combined_arc": ("combined", dict(s=64.0, m1=1.0, m2=0.5, m3=0.0), dict(m1=1.0, m2=0.5, m3=0.0)),
    "combined": ("combined", dict(s=32.0, m1=0.9, m2=0.4, m3=0.15), dict(s=32.0, m1=0.9, m2=0.4, m3=0.15)),
}


@pytest.mark.parametrize("case", list(FILTER_HEADS))
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.slow
def test_filter_reference_matches_oracle(case, threshold, reduction, margin_grad):
    x, w, y = rows(18)
    head, kw, orc = FILTER_HEADS[case]
    common = dict(reduction=reduction, margin_grad=margin_grad)
    got = lib(head, y, interclass_filtering_threshold=threshold, **kw, **common)
    want = lambda a, b: O.filtered_loss(a, b, y, head=head, threshold=threshold, **orc, **common)
    assert_same(got, want, x, w, f"{case} filtered at {threshold}")


def test_filter_inputs_have_filtered_negatives_and_change_the_loss():
    # the inputs above do filter something at both thresholds (so the comparisons can fail)
    x, w, y = rows(18)
    cos = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    valid = y != -100
    negative = torch.ones_like(cos, dtype=torch.bool)
    negative[torch.arange(len(y))[valid], y[valid]] = False
    for th in (0.2, 0.4):
        assert int((negative[valid] & (cos[valid] > th)).sum()) >= 3
        plain = fkf.margin_cross_entropy(x, w, y, "arcface", backend="reference")
        filtered = fkf.margin_cross_entropy(x, w, y, "arcface", interclass_filtering_threshold=th,
                                            backend="reference")  # fmt: skip
        assert abs(plain.item() - filtered.item()) > 1e-3


def test_filter_modules():
    x, w, y = rows(19)
    for cls, head, orc in [(fk.NormSoftmax, "norm_softmax", {}), (fk.ArcFace, "arcface", {}),
                           (fk.CosFace, "cosface", {}), (fk.CombinedMargin, "combined", {})]:  # fmt: skip
        module = cls(11, 29, interclass_filtering_threshold=0.3, backend="reference").double()
        with torch.no_grad():
            module.weight.copy_(w)
        want = O.filtered_loss(x, w, y, head=head, threshold=0.3, **orc)
        assert module(x, y).item() == pytest.approx(want.item(), rel=1e-9), head


# ------------------------------------------------------------------- (c) the worked examples, library side

BACKENDS = kit.FLOAT64_BACKENDS


def fn(x, w, y, head, backend, **kw):
    return fkf.margin_cross_entropy(x, w, y, head, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_library_adaface_worked_example(backend):
    for t_alpha, want, mu, sigma in [(1.0, 67.8600276196, 1.6180339887, 0.8740320489),
                                     (0.01, 69.3833459442, 19.8161803399, 99.0087403205)]:  # fmt: skip
        mean, std = torch.tensor(20.0, dtype=F64), torch.tensor(100.0, dtype=F64)
        kw = dict(s=64.0, m=0.4, h=0.333, t_alpha=t_alpha, batch_mean=mean, batch_std=std)
        loss, dx, dw = grads(lambda a, b, kw=kw: fn(a, b, Y_EX, "adaface", backend, **kw), X_EX, W_EX)
        assert loss.item() == rel(want)
        assert mean.item() == pytest.approx(mu, abs=1e-10) and std.item() == pytest.approx(sigma, abs=1e-10)
    mean, std = torch.tensor(20.0, dtype=F64), torch.tensor(100.0, dtype=F64)
    kw = dict(s=64.0, m=0.4, h=0.333, t_alpha=1.0, batch_mean=mean, batch_std=std)
    _, dx, dw = grads(lambda a, b: fn(a, b, Y_EX, "adaface", backend, **kw), X_EX, W_EX)
    kit.assert_close(dx, ADA_DX, rtol=0, atol=1e-6, what="AdaFace dX")
    kit.assert_close(dw, ADA_DW, rtol=0, atol=1e-6, what="AdaFace dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_library_magface_worked_example(backend):
    for kw, want in [(dict(), 58.5157940548), (dict(easy_margin=False), 69.0198901674),
                     (dict(kind="cos", l_m=0.35, lambda_g=150.0), 79.5747502786),
                     (dict(lambda_g=0.0), 57.2785163870),
                     (dict(kind="cos", l_m=0.35, lambda_g=0.0), 74.2721317022)]:  # fmt: skip
        got = fn(X_MAG, W_EX, Y_EX, "magface", backend, **kw).item()
        assert got == rel(want), kw
    # the gradients (no official digits; the oracle's autograd, radial term included)
    for kw in (dict(), dict(easy_margin=False), dict(kind="cos", l_m=0.35, lambda_g=150.0)):
        assert_same(lambda a, b, kw=kw: fn(a, b, Y_EX, "magface", backend, **kw),
                    lambda a, b, kw=kw: O.magface_loss(a, b, Y_EX, **kw), X_MAG, W_EX, f"MagFace {kw}")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_library_elastic_worked_example(backend):
    def run(head, **kw):
        torch.manual_seed(0)
        return fn(X_EX, W_EX, Y_EX, head, backend, std=0.05, **kw).item()

    assert run("elastic_arcface", m=0.5, fallback="none") == rel(55.7431158407)
    assert run("elastic_arcface", m=0.5, plus=True, fallback="none") == rel(54.6178694569)
    assert run("elastic_arcface", m=0.5, plus="official", fallback="none") == rel(54.6178694569)
    assert run("elastic_cosface", m=0.35) == rel(68.1304260167)
    assert run("elastic_cosface", m=0.35, plus=True) == rel(70.9443674054)
    # the spec's default fallback on row 1 (theta + m > pi): the oracle's monotonic value
    draws = _official_draws(0.5)
    want = O.elastic_loss(X_EX, W_EX, Y_EX, margins=draws, kind="arc").item()
    assert run("elastic_arcface", m=0.5) == rel(want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_library_subcenter_worked_example(backend):
    loss, dx, dw = grads(lambda a, b: fn(a, b, Y_EX, "subcenter_arcface", backend, s=64.0, m=0.5, k=3), X_EX, W_SUB)
    assert loss.item() == rel(O.subcenter_loss(X_EX, W_SUB, Y_EX, k=3).item())
    assert loss.item() == rel(18.4951620659, 2e-9)  # official digits carry MXNet's 1e-10 (1.0e-9 relative)
    kit.assert_close(dx, SUB_DX, rtol=0, atol=1e-6, what="Sub-center dX")
    kit.assert_close(dw, SUB_DW, rtol=0, atol=1e-6, what="Sub-center dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_library_filter_worked_example(backend):
    arc = dict(m1=1.0, m2=0.5, m3=0.0)
    got = fn(X_EX, W_EX, Y_EX, "combined", backend, fallback="none", interclass_filtering_threshold=0.4, **arc)
    assert got.item() == rel(30.3166031158)
    # the capped official numbers (see test_oracle_filter_worked_example): the library's rows, capped, give them
    cos = dict(m1=1.0, m2=0.0, m3=0.4)
    for kw, th, want in [(dict(fallback="none", **arc), 0.0, 34.5389631969), (cos, 0.0, 34.5625614778),
                         (cos, 0.4, 34.5387763949)]:  # fmt: skip
        rows_ = fn(X_EX, W_EX, Y_EX, "combined", backend, interclass_filtering_threshold=th, reduction="none", **kw)
        assert rows_.clamp_max(ROW_CAP).mean().item() == rel(want)
    # and the spec's fallback (row 1: -1.229662 instead of -0.936563), against the oracle
    for th in (0.0, 0.4):
        got = fn(X_EX, W_EX, Y_EX, "arcface", backend, s=64.0, m=0.5, interclass_filtering_threshold=th)
        assert got.item() == rel(O.filtered_loss(X_EX, W_EX, Y_EX, head="arcface", threshold=th).item())


def cpu_case(case):
    """(library fn, oracle fn, x, w) of one new head on random rows, reduction none, for the cpu backend."""
    opts = dict(backend="cpu", reduction="none")
    if case == "adaface":
        x, w, y = adaface_rows(22)
        buffers = lambda: dict(batch_mean=torch.tensor(5.0, dtype=F64), batch_std=torch.tensor(2.0, dtype=F64))
        got = lambda a, b: fkf.margin_cross_entropy(a, b, y, "adaface", **buffers(), **opts)
        return got, lambda a, b: O.adaface_loss(a, b, y, batch_mean=5.0, batch_std=2.0, reduction="none")[0], x, w
    if case == "magface_hard":
        x, w, y = magface_rows(23)
        got = lambda a, b: fkf.margin_cross_entropy(a, b, y, "magface", easy_margin=False, **opts)
        return got, lambda a, b: O.magface_loss(a, b, y, easy_margin=False, reduction="none"), x, w
    if case in ("arc", "cos"):
        x, w, y = rows(24)
        head, m, k = ELASTIC[case]
        margins = O.elastic_margins(x, w, y, m=m, std=0.1, plus=True, generator=torch.Generator().manual_seed(9))
        got = lambda a, b: fkf.margin_cross_entropy(a, b, y, head, std=0.1, plus=True,
                                                    generator=torch.Generator().manual_seed(9), **opts)  # fmt: skip
        return got, lambda a, b: O.elastic_loss(a, b, y, margins=margins, kind=k, reduction="none"), x, w
    if case == "subcenter":
        x, w, y = rows(25, k=3)
        got = lambda a, b: fkf.margin_cross_entropy(a, b, y, "subcenter_arcface", k=3, **opts)
        return got, lambda a, b: O.subcenter_loss(a, b, y, k=3, reduction="none"), x, w
    x, w, y = rows(26)  # filtered CombinedMargin
    kw = dict(m1=1.0, m2=0.5, m3=0.0)
    got = lambda a, b: fkf.margin_cross_entropy(a, b, y, "combined", interclass_filtering_threshold=0.2, **kw, **opts)
    return got, lambda a, b: O.filtered_loss(a, b, y, head="combined", threshold=0.2, reduction="none", **kw), x, w


@pytest.mark.parametrize("case", ["adaface", "magface_hard", "arc", "cos", "subcenter", "filter"])
def test_cpu_backend_matches_oracle(case):
    # the compiled CPU kernels on the random rows above (float64 in, float64 accumulation)
    got, want, x, w = cpu_case(case)
    assert_same(got, want, x, w, f"cpu backend, {case}")


# ------------------------------------------------------------------------------------ (d) malformed options


@pytest.mark.parametrize(
    "head, kw, name",
    [
        ("elastic_arcface", dict(std=-0.1), "std"),
        ("elastic_cosface", dict(std=-0.1), "std"),
        ("elastic_arcface", dict(plus="bogus"), "plus"),
        ("adaface", dict(h=-0.5), "h"),
        ("magface", dict(l_a=110.0, u_a=10.0), "l_a"),
        ("magface", dict(l_a=50.0, u_a=50.0), "l_a"),
        ("magface", dict(l_m=0.9, u_m=0.5), "l_m"),
        ("magface", dict(kind="bogus"), "kind"),
        ("subcenter_arcface", dict(k=0), "k"),
        ("arcface", dict(interclass_filtering_threshold=-0.1), "interclass_filtering_threshold"),
        ("cosface", dict(interclass_filtering_threshold=-0.1), "interclass_filtering_threshold"),
        ("mv_softmax", dict(interclass_filtering_threshold=0.4), "interclass_filtering_threshold"),
        ("curricular", dict(interclass_filtering_threshold=0.4), "interclass_filtering_threshold"),
    ],
)
def test_malformed_options_raise_value_error(head, kw, name):
    x, w, y = rows(20, k=3 if head == "subcenter_arcface" else 1)
    extra = {}
    if head == "adaface":
        extra = dict(batch_mean=torch.tensor(20.0), batch_std=torch.tensor(100.0))
    if head == "curricular":
        extra = dict(t=torch.tensor(0.0))
    with pytest.raises(ValueError, match=name):
        fkf.margin_cross_entropy(x, w, y, head, backend="reference", **extra, **kw)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: fk.ElasticArcFace(4, 5, std=-0.05), "std"),
        (lambda: fk.ElasticCosFace(4, 5, plus="bogus"), "plus"),
        (lambda: fk.AdaFace(4, 5, h=-1.0), "h"),
        (lambda: fk.MagFace(4, 5, l_a=20.0, u_a=10.0), "l_a"),
        (lambda: fk.MagFace(4, 5, l_m=0.9, u_m=0.5), "l_m"),
        (lambda: fk.SubCenterArcFace(4, 5, k=0), "k"),
        (lambda: fk.ArcFace(4, 5, interclass_filtering_threshold=-1.0), "interclass_filtering_threshold"),
        (lambda: fk.NormSoftmax(4, 5, interclass_filtering_threshold=-1.0), "interclass_filtering_threshold"),
    ],
)
def test_malformed_module_options_raise_value_error(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: fk.SubCenterArcFace(4, 5, k="3"), "k"),
        (lambda: fk.AdaFace(4, 5, h="0.3"), "h"),
        (lambda: fk.MagFace(4, 5, easy_margin="yes"), "easy_margin"),
        (lambda: fk.ElasticArcFace(4, 5, std="0.05"), "std"),
        (lambda: fk.ElasticArcFace(4, 5, generator=123), "generator"),
        (lambda: fk.CosFace(4, 5, interclass_filtering_threshold="0.4"), "interclass_filtering_threshold"),
    ],
)
def test_wrong_types_raise_type_error(make, name):
    with pytest.raises(TypeError, match=name):
        make()


@pytest.mark.parametrize(
    "head, kw, name",
    [
        ("subcenter_arcface", dict(k="3"), "k"),
        ("adaface", dict(h="0.3"), "h"),
        ("magface", dict(easy_margin="yes"), "easy_margin"),
        ("magface", dict(lambda_g="35"), "lambda_g"),
        ("elastic_arcface", dict(std="0.05"), "std"),
        ("elastic_cosface", dict(generator=123), "generator"),
        ("cosface", dict(interclass_filtering_threshold="0.4"), "interclass_filtering_threshold"),
    ],
)
def test_wrong_types_raise_type_error_functional(head, kw, name):
    x, w, y = rows(20, k=3 if head == "subcenter_arcface" else 1)
    extra = dict(batch_mean=torch.tensor(20.0), batch_std=torch.tensor(100.0)) if head == "adaface" else {}
    with pytest.raises(TypeError, match=name):
        fkf.margin_cross_entropy(x, w, y, head, backend="reference", **extra, **kw)


def test_adaface_requires_its_buffers():
    x, w, y = rows(21)
    with pytest.raises((ValueError, TypeError), match="batch_mean"):
        fkf.margin_cross_entropy(x, w, y, "adaface", backend="reference")


def test_elastic_generator_state_resumes_into_a_head_built_without_one():
    # the saved generator state travels in state_dict(); a head built with generator=None gets a CPU generator
    # holding it, so the resumed run draws the same margins (the same loss) as the saving one
    saving = fk.ElasticArcFace(11, 29, std=0.2, generator=torch.Generator().manual_seed(3), backend="reference")
    x, _, y = rows(31)
    saving(x.float(), y)  # one step: the generator has moved on from its seed
    resumed = fk.ElasticArcFace(11, 29, std=0.2, backend="reference")
    resumed.load_state_dict(saving.state_dict())
    assert torch.equal(resumed(x.float(), y), saving(x.float(), y))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_negative_elastic_margin_never_takes_the_fallback(backend):
    # theta = 3.05 with the margin -0.1: theta + m = 2.95 < pi, so phi = cos(2.95), not the fallback (the
    # cosine test c <= cos(pi - m) alone would take this row: cos(3.05) < cos(pi + 0.1))
    theta = 3.05
    x = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=F64)
    w = torch.eye(2, dtype=F64)
    y = torch.tensor([0])
    got = fkf.margin_cross_entropy(x, w, y, "elastic_arcface", s=1.0, row_margins=torch.tensor([-0.1], dtype=F64),
                                   backend=backend)  # fmt: skip
    phi, other = math.cos(theta - 0.1), math.sin(theta)
    assert got.item() == pytest.approx(math.log(math.exp(phi) + math.exp(other)) - phi, rel=1e-12)
