"""The CUDA forward's per-row pre-pass (facekernels/kernels/triton: ``target_rows``, ``_target_rows_kernel`` and
``_update_t_kernel``) against a float64 oracle written here from the spec, with the torch of
facekernels/_rowmath.py (the definition it mirrors, float32) as the error yardstick: inverse norms, target cosines,
phi, phi' (times the clamp's derivative) and tau for every head the kernel covers, and CurricularFace's t update.
The heads' losses and gradients through it: tests/test_heads.py and tests/test_heads_lowp.py."""

import math

import kit
import pytest
import torch

from facekernels import _rowmath
from facekernels._params import SIN_THETA_EPS, AdaFaceMargins, Fallback, HeadParams, Negatives

triton = pytest.importorskip("triton")
tk = pytest.importorskip("facekernels.kernels.triton")
tl = triton.language
from facekernels.kernels.triton.head_math import target_logit  # noqa: E402 (needs triton)

DEVICE = kit.TRITON_DEVICE
EPS32 = torch.finfo(torch.float32).eps

# the covered heads' row math (HeadParams as the heads build them): every fallback but CLIP, linear and angular
# targets, a negative angular margin (no fallback threshold), straight-through, sub-centers, a cosine bound
CASES = {
    "arcface": HeadParams(s=64.0, m2=0.5, fallback=Fallback.MONOTONIC),
    "arc_negative_m2": HeadParams(s=64.0, m2=-0.2, fallback=Fallback.MONOTONIC),
    "easy_margin": HeadParams(s=64.0, m2=0.5, fallback=Fallback.POSITIVE),
    "facexzoo_offset": HeadParams(s=64.0, m2=0.5, fallback=Fallback.OFFSET, margin_am=0.35),
    "cosface": HeadParams(s=64.0, m3=0.35),
    "mv_am": HeadParams(s=32.0, m3=0.35, fallback=Fallback.ABOVE_M3, negatives=Negatives.MV, mv_t=0.2),
    "combined": HeadParams(s=64.0, m2=0.3, m3=0.2),
    "curricular": HeadParams(s=64.0, m2=0.5, fallback=Fallback.MONOTONIC, negatives=Negatives.CURRICULAR,
                             momentum=0.01),
    "straight_through": HeadParams(s=64.0, m2=0.5, fallback=Fallback.MONOTONIC, margin_grad="straight_through"),
    "subcenters": HeadParams(s=64.0, m2=0.5, fallback=Fallback.MONOTONIC, subcenters=3),
    "cos_bound": HeadParams(s=64.0, m2=0.4, cos_bound=0.9),
}


@triton.jit
def _logit_kernel(c_ptr, out_ptr, n, cos_m2, sin_m2, m3, threshold, offset, LINEAR: tl.constexpr,
                  FALLBACK: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr, BLOCK: tl.constexpr):
    """head_math.target_logit alone: (phi, phi', tau) of n cosines into out (3, n)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(c_ptr + i, mask=i < n, other=0.0)
    phi, dphi, tau = target_logit(c, cos_m2, sin_m2, m3, threshold, offset, LINEAR, FALLBACK, STRAIGHT_THROUGH)
    tl.store(out_ptr + i, phi, mask=i < n)
    tl.store(out_ptr + n + i, dphi, mask=i < n)
    tl.store(out_ptr + 2 * n + i, tau, mask=i < n)


def _inputs(p: HeadParams, dtype, batch=77, classes=13, features=45, seed=0, nan=True):
    """x (B, d), w (C k, d) in ``dtype``, targets (-1: not in w) and the valid rows, with rows along (row 1), against
    (row 2) and close to (row 3, outside a 0.9 bound) a target row of w, an ignored row (4); ``nan``: a NaN row (0),
    a NaN in the last sub-center of class 9, row 5's target (a NaN sub-center wins the max), and a NaN row whose
    label is outside w (6: c = 0)."""
    gen = torch.Generator().manual_seed(seed)
    x, w, y = kit.head_inputs(batch, classes * p.subcenters, features, generator=gen)
    y = y % classes
    target = torch.where(torch.rand(batch, generator=gen) < 0.15, -1, y)
    valid = torch.rand(batch, generator=gen) > 0.1
    target[1:4] = torch.tensor([2, 5, 7])
    k = p.subcenters
    w[5 * k + 1 : 5 * k + k] = w[5 * k] * 1.5  # class 5's sub-centers all along one direction: row 2 reaches -1
    # near-parallel, not parallel: a cosine of +-1 up to a rounding would make the clamp's derivative a coin toss
    x[1] = 3 * w[2 * k] + 0.1 * w[2 * k].norm() / math.sqrt(features) * torch.randn(features, generator=gen)
    x[2] = -2 * w[5 * k] + 0.1 * w[5 * k].norm() / math.sqrt(features) * torch.randn(features, generator=gen)
    x[3] = w[7 * k] + 0.3 * w[7 * k].norm() / math.sqrt(features) * torch.randn(features, generator=gen)
    if nan:
        x[0, 3] = math.nan
        w[9 * k + k - 1, 0] = math.nan
        target[5] = 9
        x[6, 0], target[6], valid[6] = math.nan, -1, True  # a label outside w (NaN row): c = 0
    target[4], valid[4], x[4] = -1, False, 0.0  # an ignored row, as the algorithm hands it over (zeroed)
    valid[:4] = True
    return x.to(dtype), w.to(dtype), target, valid


def _oracle_cosines(x, w, target, p: HeadParams):
    """float64 from the spec (docs/heads.md): inv_x, the target cosines c and whether the raw cosine lies inside
    the bound (the clamp's derivative)."""
    x64, w64 = x.double(), w.double()
    k, b = p.subcenters, p.cos_bound
    inv_x = 1 / x64.norm(dim=1).clamp_min(1e-12)
    w_hat = w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = target.clamp_min(0)
    raw = torch.stack([((x64 * inv_x[:, None]) * w_hat[rows * k + j]).sum(dim=1) for j in range(k)], dim=1)
    raw = torch.where(raw.isnan().any(dim=1), math.nan, raw.amax(dim=1))
    raw = torch.where(target >= 0, raw, 0.0)
    return inv_x, raw.clamp(-b, b), (target >= 0) & (raw > -b) & (raw < b)


def _oracle_logit(c, inside, p: HeadParams):
    """float64 from the spec: (phi, phi' times the clamp's derivative, tau) at the cosines c (float64). The kernel's
    own cosines go in, so that its phi' is not judged by the rounding of c (phi' changes by sin m2 / sin^3 theta
    per unit of c)."""
    theta = torch.acos(c)
    sin_theta = torch.sin(theta)
    phi_raw = torch.cos(theta + p.m2) - p.m3
    dphi_raw = torch.cos(torch.tensor(p.m2)) + c * math.sin(p.m2) / sin_theta.clamp_min(SIN_THETA_EPS)
    if p.m2 == 0:
        dphi_raw = torch.ones_like(c)
    phi, dphi = phi_raw, dphi_raw
    if p.fallback != Fallback.NONE:
        if p.fallback in (Fallback.MONOTONIC, Fallback.OFFSET):  # theta + m2 > pi takes the fallback
            use_raw = c > (math.cos(math.pi - p.m2) if p.m2 > 0 else -math.inf)
        else:
            use_raw = c > (p.m3 if p.fallback == Fallback.ABOVE_M3 else 0.0)
        offset = {Fallback.MONOTONIC: math.sin(math.pi - p.m2) * p.m2, Fallback.OFFSET: p.margin_am}.get(p.fallback, 0.0)
        phi = torch.where(use_raw, phi_raw, c - offset)
        dphi = torch.where(use_raw, dphi_raw, 1.0)
    if p.margin_grad == "straight_through":
        dphi = torch.ones_like(c)
    return torch.stack([phi, dphi * inside, phi_raw])  # NaN * 0: a NaN row stays NaN


def _torch_cosines(x, w, target, p: HeadParams):
    """inv_x, c and the clamp's derivative from facekernels/_rowmath.py's torch (float32): the definition the kernel
    mirrors."""
    inv_x, inv_w = tk.inv_norms(x), tk.inv_norms(w)
    return (inv_x, *_rowmath.target_cosine(x, w, target, inv_x, inv_w, p))


def _torch_logit(c, inside, p: HeadParams):
    logit = _rowmath.target_logit(c, p)
    return torch.stack([logit.phi, logit.dphi * inside.to(c.device), logit.tau])


def _assert_within(got, yardstick, want, what):
    """|got - want| within 4x the yardstick's error (the torch definition's, float32) plus 16 float32 ulps of the
    value's scale; NaN exactly where the oracle has NaN."""
    got, yardstick = got.detach().double().cpu(), yardstick.detach().double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().flatten().tolist()}, " \
                                                   f"expected at {want.isnan().nonzero().flatten().tolist()}"
    ok = ~want.isnan()
    bound = 4 * (yardstick - want).abs() + 16 * EPS32 * want.abs().clamp_min(1.0)
    err = (got - want).abs()[ok]
    assert (err <= bound[ok]).all(), f"{what}: largest error over its bound {(err / bound[ok]).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_target_rows_against_float64(case, dtype, monkeypatch):
    monkeypatch.setattr(tk, "POISON_OUTPUTS", True)
    p = CASES[case]
    x, w, target, valid = _inputs(p, dtype)
    x_dev, w_dev, target_dev, valid_dev = (a.to(DEVICE) for a in (x, w, target, valid))
    inv_w = tk.inv_norms(w_dev)
    t = torch.tensor(0.3, device=DEVICE)
    got = tk.KERNELS.target_rows(x_dev, w_dev, inv_w, target_dev, valid_dev, t, p, training=False)
    assert got is not None
    inv_x, c, rows, t_used = got
    want_inv_x, want_c, inside = _oracle_cosines(x, w, target, p)
    torch_inv_x, torch_c, _ = _torch_cosines(x_dev, w_dev, target_dev, p)
    _assert_within(inv_x, torch_inv_x, want_inv_x, f"{case} {dtype} inv_x")
    _assert_within(c, torch_c, want_c, f"{case} {dtype} c")
    # phi, phi', tau at the kernel's own cosines
    want_rows = _oracle_logit(c.double().cpu(), inside, p)
    _assert_within(rows, _torch_logit(c, inside, p), want_rows, f"{case} {dtype} phi / phi' / tau")
    # the cases reach what they are for: a fallback row, a row outside the bound, a NaN row
    if p.fallback in (Fallback.MONOTONIC, Fallback.OFFSET) and p.m2 > 0:
        assert (c.cpu() < math.cos(math.pi - p.m2)).any()
    if p.cos_bound < 1:
        assert rows[1, 3] == 0 and not inside[3]
    assert rows[0, :1].isnan().all() and rows[2, :1].isnan().all() and c[5].isnan() and c[6] == 0
    if p.uses_t:
        assert t_used is not t and t_used.item() == t.item() == pytest.approx(0.3)
    else:
        assert t_used is None


@pytest.mark.parametrize("valid_rows", ["some", "none", "nan"])
def test_curricular_t_update(valid_rows, monkeypatch):
    # t <- 0.01 mean(c over the valid rows) + 0.99 t (update_t_ on the torch rows' c): in place, t_used its new
    # value; without a valid row, or with a NaN one, t stays exactly as it was
    monkeypatch.setattr(tk, "POISON_OUTPUTS", True)
    p = CASES["curricular"]
    x, w, target, valid = _inputs(p, torch.float32, batch=70, seed=1, nan=False)
    if valid_rows == "none":
        valid[:] = False
    elif valid_rows == "nan":
        x[5, 0] = math.nan
        valid[5] = True
    x_dev, w_dev, target_dev, valid_dev = (a.to(DEVICE) for a in (x, w, target, valid))
    t = torch.tensor(0.3, device=DEVICE)
    want = t.clone()
    _, c, _ = _torch_cosines(x_dev, w_dev, target_dev, p)
    _rowmath.update_t_(want, c, valid_dev, p.momentum)
    inv_x, c_got, rows, t_used = tk.KERNELS.target_rows(x_dev, w_dev, tk.inv_norms(w_dev), target_dev, valid_dev, t,
                                                        p, training=True)  # fmt: skip
    if valid_rows == "some":
        assert want.item() != 0.3
        assert t.item() == pytest.approx(want.item(), rel=4 * EPS32, abs=0)
    else:
        assert t.item() == want.item() == torch.tensor(0.3).item()
    assert t_used.item() == t.item()


def test_heads_outside_the_kernel_are_left_to_torch():
    # the acos target (m1 != 1), the clipped angle and the per-row margins stay in _rowmath's torch
    covered = tk.covers_target_rows
    assert all(covered(p) for p in CASES.values())
    assert not covered(HeadParams(s=64.0, m1=2.0, m2=0.2))
    assert not covered(HeadParams(s=64.0, m2=0.5, fallback=Fallback.CLIP, clip_eps=1e-3))
    assert not covered(HeadParams(s=64.0, fallback=Fallback.CLIP, row_margins=AdaFaceMargins(0.4, 0.333, 0.01, 1e-3)))
    x, w, target, valid = _inputs(CASES["arcface"], torch.float32)
    args = [a.to(DEVICE) for a in (x, w)]
    got = tk.KERNELS.target_rows(*args, tk.inv_norms(args[1]), target.to(DEVICE), valid.to(DEVICE), None,
                                 HeadParams(s=64.0, m1=2.0), training=True)  # fmt: skip
    assert got is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_target_logit_mirror_on_a_grid_of_cosines(case, monkeypatch):
    # head_math.target_logit alone, on 2,001 cosines over [-1, 1] (both ends: sin(theta) = 0, phi' floored), the
    # fallback's threshold and its neighbours, and NaN: against the float64 oracle, torch's _rowmath as the yardstick
    p = CASES[case]
    fallback = _rowmath.has_fallback_branch(p)
    threshold, offset, _ = _rowmath.fallback_branch(p, p.m2, p.m3) if fallback else (0.0, 0.0, 0.0)
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64).float()
    edge = torch.tensor(threshold if math.isfinite(threshold) else 0.0, dtype=torch.float32)
    near = torch.stack([torch.nextafter(edge, torch.tensor(-2.0)), edge, torch.nextafter(edge, torch.tensor(2.0))])
    c = torch.cat([grid, near, torch.tensor([math.nan])])
    out = torch.full((3, c.numel()), math.nan, device=DEVICE)
    c_dev = c.to(DEVICE)
    _logit_kernel[(triton.cdiv(c.numel(), 256),)](c_dev, out, c.numel(), math.cos(p.m2), math.sin(p.m2), p.m3,
                                                   threshold, offset, LINEAR=p.target_is_linear, FALLBACK=fallback,
                                                   STRAIGHT_THROUGH=p.margin_grad == "straight_through", BLOCK=256)
    inside = torch.ones(c.numel(), dtype=torch.bool)
    want = _oracle_logit(c.double(), inside, p)
    _assert_within(out, _torch_logit(c_dev, inside, p), want, f"{case} target_logit")
    # the floor is reached (c = 1: sin(theta) = 0)
    assert out[1, :-1].abs().max() > 1e3 or p.target_is_linear or p.margin_grad == "straight_through"
