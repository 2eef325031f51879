"""HeadStats.rank and HeadStats.topk: the target's margin-free rank (issue 25, "Monitoring as trainers log it").

rank_i = the number of classes other than the target whose margin-free cosine (clamped, a class's max over its
sub-centers: the cosine the logits are built from, before any margin or MV / Curricular reweighting) beats the
target's cosine c_i (strictly greater; NaN counts as greater, as torch.topk ranks it). top-k = rank < k, the
official CurricularFace trainer's Prec@k (torch.topk of its margin-free logits s cos theta).

Every backend (reference, cpu, triton under the interpreter here) against a float64 oracle that materialises the
cosines in this file: exact counts where no class lies within the backend's rounding of the target's cosine,
and within the near-tie window elsewhere; exact ties built from exactly representable cosines; NaN rows;
ignored rows; sub-centers, MV-Softmax, CurricularFace, AdaFace's bound, filtering; bfloat16 / float16; 2 gloo
ranks (sharded and Partial FC); torch.topk's accuracy; and the issue's point, margin-included `correct` below
the margin-free top-1. The sm_90 compile of the kernel's RANK variant is checked at the end (slow).
"""

import json
import math
import os
import subprocess
import sys

import kit
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import facekernels as fk
from facekernels import _extension


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = kit.TRITON_DEVICE
BACKENDS = kit.HEAD_BACKENDS

# head -> (module, its arguments): plain, additive and angular margins, MV-Softmax and CurricularFace (the logits
# reweighted, the cosines not), sub-centers (a class's cosine is its best sub-center), AdaFace (cosines clamped
# to 1 - eps) and insightface's filtering (a filtered class's logit is 0, its cosine still ranks)
HEADS = {
    "arcface": (fk.ArcFace, {}),
    "cosface": (fk.CosFace, {}),
    "mv_am": (fk.MVSoftmax, dict(t=0.2, is_am=True)),
    "curricular": (fk.CurricularFace, dict(momentum=0.1)),
    "subcenter": (fk.SubCenterArcFace, dict(k=3)),
    "adaface": (fk.AdaFace, {}),
    "filter": (fk.ArcFace, dict(interclass_filtering_threshold=0.3)),
}


def _device(backend):
    return "cpu" if backend == "cpu" else DEVICE


@pytest.fixture
def small_tiles(monkeypatch):
    """CPU tiles of 8 classes (many tiles, a ragged last one, several threads' partial counts); Triton's kernel
    writes its partials into NaN / INT_MIN-poisoned buffers."""
    from facekernels.kernels import cpu

    monkeypatch.setattr(cpu, "CLASS_TILE", 8)
    if kit.triton_importable():
        from facekernels.kernels import triton as tk

        monkeypatch.setattr(tk, "POISON_OUTPUTS", True)


def _head(name, features, classes, backend, dtype):
    cls, kw = HEADS[name]
    head = cls(features, classes, backend=backend, **kw)
    if name == "curricular":
        head.t.fill_(0.15)
    head.return_stats = True
    head = head.to(_device(backend))
    head.weight = torch.nn.Parameter(head.weight.detach().to(dtype))  # the buffers (t, AdaFace's) stay float32
    return head


def _stats(head, x, w, y):
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
    return head(x.to(head.weight.device, head.weight.dtype), y.to(head.weight.device))[1]


def oracle_cosines(x, w, subcenters=1, bound=1.0):
    """(B, C) float64 margin-free class cosines of the inputs as they are (already rounded to their dtype):
    clamp(max over the class's sub-centers of x_hat . w_hat, -bound, bound)."""
    x64, w64 = x.double().cpu(), w.double().cpu()
    x_hat = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w_hat = w64 / w64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    raw = (x_hat @ w_hat.t()).view(x.shape[0], -1, subcenters).amax(dim=2)
    return raw.clamp(-bound, bound)


def rank_window(cos, y, tol):
    """Per row, the (lowest, highest) count a backend whose cosines are within ``tol`` of the oracle's may give:
    classes beating the target by more than tol must count, those within tol of it may."""
    c = cos.gather(1, y.clamp_min(0).unsqueeze(1))
    other = torch.arange(cos.shape[1]) != y.unsqueeze(1)
    return ((cos > c + tol) & other).sum(dim=1), ((cos > c - tol) & other).sum(dim=1)


def assert_rank(got, cos, y, valid, tol, what=""):
    got = got.cpu()
    assert got.dtype == torch.int64 and got.shape == y.shape, (got.dtype, got.shape)
    assert torch.all(got[~valid] == -1), f"{what}: ignored rows {got[~valid].tolist()}"
    lower, upper = rank_window(cos, y, tol)
    bad = valid & ((got < lower) | (got > upper))
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {int(valid.sum())} rows outside the oracle's window, "
                           f"rows {bad.nonzero().flatten().tolist()[:8]}: got {got[bad].tolist()[:8]}, "
                           f"want {lower[bad].tolist()[:8]}..{upper[bad].tolist()[:8]}")  # fmt: skip
    exact = valid & (lower == upper)
    # the test is not vacuous: rows without a near-tie (an exact count) are most rows at float32's rounding, and
    # still many at the reference's bfloat16 cosines (2^-6 among 700 classes: about half); some targets top-1
    assert int(exact.sum()) >= (0.8 if tol < 1e-4 else 0.35) * int(valid.sum()), f"{what}: {int(exact.sum())} exact"
    assert 0 < int((got[valid] == 0).sum()) < int(valid.sum()), f"{what}: ranks {got[valid].tolist()}"


def _tolerance(backend, dtype):
    """How far a backend's class cosines may lie from the float64 oracle's on the same rounded inputs: the
    reference forms them in the inputs' dtype; the kernels in float32 from exact products (tensor-float32 on a
    GPU for float32 inputs: 10-bit operands), float64 for float64."""
    if dtype == torch.float64:
        return 1e-12
    if backend == "reference":
        return {torch.float32: 1e-5, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}[dtype]
    if backend == "triton" and DEVICE == "cuda" and dtype == torch.float32:
        return 4e-3
    return 1e-5


DTYPES = {"reference": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
          "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
          "triton": (torch.float32, torch.bfloat16, torch.float16)}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", list(HEADS))
def test_rank_matches_the_float64_oracle(backend, head, small_tiles):
    # ragged shapes: 37 rows (ignored ones among them), 700 classes (Triton's forward at this batch: 640 paired
    # in 2 class splits whose counts the host sums, and a 60-class unpaired tail; 88 CPU tiles of 8, the last
    # ragged), 33 features
    dtypes = DTYPES[backend] if head in ("arcface", "subcenter", "curricular") else DTYPES[backend][:2]
    for i, dtype in enumerate(dtypes):
        name, k = head, HEADS[head][1].get("k", 1)
        g = torch.Generator().manual_seed(100 + i)
        x, w, y = kit.head_inputs(37, 700 * k, 33, dtype=dtype, near_frac=0.6, ignore_frac=0.15, generator=g)
        y = torch.where(y >= 0, y // k, y)  # 700 classes of k rows: near rows sit near one of their sub-centers
        module = _head(name, 33, 700, backend, dtype)
        stats = _stats(module, x, w, y)
        valid = y != -100
        cos = oracle_cosines(x, w, k, module.params.cos_bound)
        assert_rank(stats.rank, cos, y, valid, _tolerance(backend, dtype), what=f"{backend} {head} {dtype}")
        # the target cosine HeadStats reports is the one the rank is taken against
        c = cos.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
        kit.assert_close(stats.target_cosine.cpu()[valid], c[valid], rtol=0, atol=2 * _tolerance(backend, dtype),
                         what="target cosine")  # fmt: skip


# Exactly representable cosines (x = a multiple of e_1, w with power-of-two norms): every backend computes them
# exactly, so ties are exact ties. Classes: cos 1 (twice: a tie at the top), cos 0.5 (three times, one at
# another scale), cos 0.25, cos -0.5.
TIE_CLASSES = torch.zeros(7, 16)
TIE_CLASSES[0, 0] = 1.0  # cos 1
TIE_CLASSES[1, 0] = 4.0  # cos 1
TIE_CLASSES[2, :4] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # cos 0.5
TIE_CLASSES[3, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # cos 0.5
TIE_CLASSES[4, :4] = torch.tensor([2.0, 2.0, -2.0, 2.0])  # cos 0.5
TIE_CLASSES[5, :] = 1.0  # cos 0.25
TIE_CLASSES[6, :4] = torch.tensor([-1.0, 1.0, 1.0, 1.0])  # cos -0.5
TIE_COS = [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, -0.5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["arcface", "adaface", "curricular"])
def test_ties_do_not_beat_the_target(backend, dtype, head, small_tiles):
    # a class tied with the target does not beat it (strictly greater), the target column is left out by index:
    # the guard against counting >= (it would count 1, 2 or 2 tied classes) and against counting the target's
    # own column (one more on every row). AdaFace clamps at 1 - eps: both cos-1 classes clamp to one value.
    y = torch.arange(7).repeat(2)
    x = torch.zeros(14, 16)
    x[:, 0] = torch.tensor([1.0, 0.5, 4.0, 8.0, 0.25, 2.0, 1.0] * 2)
    want = torch.tensor([sum(c > TIE_COS[j] for c in TIE_COS) for j in y.tolist()])
    stats = _stats(_head(head, 16, 7, backend, dtype), x, TIE_CLASSES, y)
    assert torch.equal(stats.rank.cpu(), want), (stats.rank.tolist(), want.tolist())
    assert stats.topk(1).tolist() == [j < 2 for j in y.tolist()]
    assert stats.topk(2).tolist() == stats.topk(1).tolist()  # the third class is 2 behind, tied at rank 2
    assert stats.topk(3).tolist() == [j < 5 for j in y.tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_is_the_official_trainers_accuracy(backend, small_tiles):
    # CurricularFace's train.py: prec1, prec5 = accuracy(original_logits, labels, topk=(1, 5)), original_logits =
    # s cos theta before the margin: torch.topk of the margin-free logits, the label among the top k
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, w, y = kit.head_inputs(48, 200, 24, dtype=dtype, near_frac=0.4, generator=torch.Generator().manual_seed(5))
    stats = _stats(_head("curricular", 24, 200, backend, dtype), x, w, y)
    cos = oracle_cosines(x, w)
    top = (64.0 * cos).topk(5, dim=1).indices
    lower, upper = rank_window(cos, y, _tolerance(backend, dtype))
    clear = lower == upper  # no class within the rounding of the target: topk's order is the oracle's
    # 40 of the 48 rows at float32's 1e-5, 28 at the GPU's tensor-float32 tolerance (the H200, 2026-12-04)
    assert int(clear.sum()) >= 24
    for k in (1, 5):
        official = (top[:, :k] == y.unsqueeze(1)).any(dim=1)
        assert torch.equal(stats.topk(k).cpu()[clear], official[clear]), k
        assert 0 < int(official.sum()) < 48  # right and wrong rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_correct_includes_the_margin_top1_does_not(backend, small_tiles):
    # the numbers (0.465 margin included against 0.879 the official way): rows at target cosine ~0.7,
    # well above every other class (d = 64: random cosines ~0.125), are top-1 without the margin, but ArcFace's
    # m = 0.5 brings many targets' logits below the best other class's
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(9)
    w = torch.randn(100, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 100, (64,), generator=g)
    x = torch.nn.functional.normalize(w, dim=1)[y] + 0.13 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    stats = _stats(_head("arcface", 64, 100, backend, dtype), x.to(dtype), w.to(dtype), y)
    correct, top1 = stats.correct.float().mean().item(), stats.topk(1).float().mean().item()
    assert correct < 0.6 and top1 > 0.95, (correct, top1)
    assert not (stats.correct & ~stats.topk(1)).any()  # the margin only lowers the target's logit


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_is_never_topk(backend, small_tiles):
    # a NaN embedding: every cosine NaN, each counted as beating the target (torch.topk ranks NaN first)
    x, w, y = kit.head_inputs(5, 40, 8, dtype=torch.float32, near_frac=1.0)
    x[2, 3] = math.nan
    stats = _stats(_head("arcface", 8, 40, backend, torch.float32), x, w, y)
    assert stats.rank[2].item() == 39 and not stats.topk(39)[2] and not stats.correct[2]
    assert stats.topk(1)[[0, 1, 3, 4]].all()  # the others sit near their class


def test_topk_argument():
    stats = fk.HeadStats(torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.tensor([0, -1, 4]))
    assert stats.topk(1).tolist() == [True, False, False] and stats.topk(5).tolist() == [True, False, True]
    for bad in (0, -1, 1.0, True, None):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            stats.topk(bad)


@pytest.mark.parametrize("backend", kit.FUSED_BACKENDS)
def test_no_count_without_stats(backend, monkeypatch):
    # the rank is counted only when the stats are asked for: otherwise the kernels get no target cosines (the
    # C++ op returns an empty count; Triton launches the RANK=False compile, the one without stats)
    from facekernels._algorithm import _HeadRows

    seen = []
    real = _HeadRows.forward

    def spy(*args):
        out = real(*args)
        seen.append((args[-1] is not None, out[3].numel()))
        return out

    monkeypatch.setattr(_HeadRows, "forward", staticmethod(spy))
    launches = []
    if backend == "triton":
        from facekernels.kernels import triton as tk

        real_launch = tk._launch
        monkeypatch.setattr(tk, "_launch", lambda kernel, grid, *a, **meta: (launches.append(meta.get("RANK")),
                                                                              real_launch(kernel, grid, *a, **meta)))
    head = _head("arcface", 8, 20, backend, torch.float32)
    x, w, y = (a.to(head.weight.device) for a in kit.head_inputs(6, 20, 8, dtype=torch.float32))
    head.return_stats = False
    with torch.no_grad():
        head.weight.copy_(w)
    head(x, y)
    head.return_stats = True
    head(x, y)
    assert seen == [(False, 0), (True, 6)]
    if backend == "triton":
        assert [r for r in launches if r is not None] == [False, True], launches


@kit.needs_ext
def test_cpu_op_rank_variant_opcheck():
    ops = _extension.ops()
    x, w, y = kit.head_inputs(9, 21 * 3, 6, dtype=torch.float32)
    target = torch.where(torch.rand(9) < 0.3, -1, y // 3)
    args = (x, w, ops.inv_norms(x), ops.inv_norms(w), target, torch.rand(9) - 0.5, torch.rand(9) - 0.5, None, 64.0,
            0, 0.2, 0.999, 0.3, 3, 4, torch.rand(9) - 0.5)  # fmt: skip
    torch.library.opcheck(ops.margin_lse.default, args)
    assert ops.margin_lse(*args)[2].dtype == torch.int64
    with pytest.raises(ValueError, match="rank_cos must be a CPU tensor of shape"):
        ops.margin_lse(*args[:-1], torch.zeros(8))
    with pytest.raises(TypeError, match="rank_cos must be Float"):
        ops.margin_lse(*args[:-1], torch.zeros(9, dtype=torch.float64))


@kit.needs_triton
def test_triton_op_rank_variant_opcheck():
    from facekernels.kernels import triton as tk

    x, w, y = (a.to(DEVICE) for a in kit.head_inputs(7, 130, 64, dtype=torch.float32))
    target = torch.where(torch.rand(7, device=DEVICE) < 0.3, -1, y)
    phi, tau, target_cos = (torch.rand(7, device=DEVICE) - 0.5 for _ in range(3))
    args = (x, w, tk.inv_norms(x), tk.inv_norms(w), target, phi, tau, None, 64.0, 0, 0.2, 1.0, math.inf, 1,
            target_cos)  # fmt: skip
    torch.library.opcheck(torch.ops.facekernels.triton_margin_lse.default, args)


@pytest.mark.parametrize("backend", kit.FUSED_BACKENDS)
def test_stats_compile_fullgraph(backend, small_tiles):
    dev = _device(backend)
    head = _head("subcenter", 16, 50, backend, torch.float32)
    x, w, y = (a.to(dev) for a in kit.head_inputs(7, 150, 16, dtype=torch.float32))
    y = y // 3
    with torch.no_grad():
        head.weight.copy_(w)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if dev == "cpu" else "inductor")
    got, want = compiled(x, y)[1], head(x, y)[1]
    assert torch.equal(got.rank, want.rank) and torch.equal(got.correct, want.correct)


# ------------------------------------------------------------------------------------------ sharded, Partial FC

SHARDED = [("cpu", "arcface", 1.0), ("cpu", "subcenter", 1.0), ("cpu", "curricular", 0.4), ("cpu", "subcenter", 0.5),
           ("triton", "arcface", 1.0), ("triton", "arcface", 0.4)]  # fmt: skip


def _sharded_inputs(world, k):
    g = torch.Generator().manual_seed(11)
    x, w, y = kit.head_inputs(5 * world, 31 * k, 12, dtype=torch.float32, near_frac=0.6, ignore_frac=0.15,
                              generator=g)  # fmt: skip
    return x, w, torch.where(y >= 0, y // k, y)


def _worker(rank, world, store, out_dir):
    from facekernels.sharded import sample_classes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from facekernels.kernels import cpu

    cpu.CLASS_TILE = 4
    results = []
    for backend, name, rate in SHARDED:
        if backend == "triton" and not kit.TRITON_ON_CPU:  # the workers' tensors are CPU ones
            results.append(None)
            continue
        cls, kw = HEADS[name]
        k = kw.get("k", 1)
        x, w, y = _sharded_inputs(world, k)
        head = cls(12, 31, backend=backend, process_group=dist.group.WORLD, sample_rate=rate, sample_seed=rank,
                   **kw)  # fmt: skip
        head.return_stats = True
        with torch.no_grad():
            head.weight.copy_(w[head.class_start * k : (head.class_start + head.num_local) * k])
        stats = head(x[rank * 5 : (rank + 1) * 5], y[rank * 5 : (rank + 1) * 5])[1]
        sampled = None
        if rate < 1.0:  # the classes the head sampled: a generator replaying its draw
            replay = torch.Generator().manual_seed(rank)
            sampled = sample_classes(y, y != -100, head.class_start, head.num_local, rate, replay) + head.class_start
        results.append(dict(rank=stats.rank, correct=stats.correct, sampled=sampled))
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@kit.needs_ext
def test_sharded_and_partial_fc_ranks(tmp_path):
    # every rank counts its shard's classes (Partial FC: its sampled ones) and the counts are summed: the rank of
    # the global batch, the same on every rank, over the classes the step used
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for i, (backend, name, rate) in enumerate(SHARDED):
        if results[0][i] is None:
            continue
        k = HEADS[name][1].get("k", 1)
        x, w, y = _sharded_inputs(world, k)
        bound = fk.AdaFace(2, 2).params.cos_bound if name == "adaface" else 1.0
        cos = oracle_cosines(x, w, k, bound)
        valid = y != -100
        used = torch.arange(31)
        if rate < 1.0:  # the union of the ranks' samples (the positives among them): the columns the step used
            used = torch.cat([results[r][i]["sampled"] for r in range(world)])
            assert used.numel() < 31 and bool(torch.isin(y[valid], used).all())
            y = torch.where(valid, torch.searchsorted(used, y.clamp_min(0)), y)
            cos = cos[:, used]
        for r in range(world):
            assert torch.equal(results[r][i]["rank"], results[0][i]["rank"]), (backend, name, rate)
        assert_rank(results[0][i]["rank"], cos, y, valid, 1e-5, what=f"sharded {backend} {name} rate {rate}")


# ------------------------------------------------------------------------------------------ sm_90

_RANK_COMPILE = """
import json, math, sys, torch
from facekernels.benchmark import sm90
from facekernels.kernels import triton as tk
import triton
print(json.dumps({"triton": triton.__version__}))
sm90.use_h100_target()
meta = dict(device="meta")
for batch, features, dtype, negatives, k in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    classes = 999_983
    x = torch.empty(batch, features, dtype=dtype, **meta)
    w = torch.empty(classes * k, features, dtype=dtype, **meta)
    rows, cols = torch.empty(batch, **meta), torch.empty(classes * k, **meta)
    target, t = torch.empty(batch, dtype=torch.long, **meta), torch.empty((), **meta)
    tk.CAPTURED_LAUNCHES = []
    tk.margin_lse(x, w, rows, cols, target, rows, rows, t, 64.0, negatives, 0.2, 1.0, math.inf, k, target_cos=rows)
    for launch in tk.CAPTURED_LAUNCHES:
        facts = sm90.compile_launch(*launch)
        facts.update(batch=batch, features=features, dtype=str(dtype), subcenters=k)
        print(json.dumps(facts))
"""
# the RANK variants beside the launches tests/test_gpu_static.py compiles (C = 999,983: odd, as the JIT
# specialises on divisibility by 16): sub-centers, MV's and CurricularFace's negatives, both tile configurations
# (B = 256, 1024), every dtype
RANK_SHAPES = [(1024, 512, "bfloat16", 2, 1), (256, 512, "bfloat16", 0, 1), (1024, 128, "float16", 1, 1),
               (1024, 512, "float32", 2, 1), (1024, 512, "bfloat16", 0, 3)]  # fmt: skip


def _rank_compile(extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _RANK_COMPILE, json.dumps(RANK_SHAPES)], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines[0]["triton"], lines[1:]


def _check_rank_compile(version, launches):
    # one unpaired launch over every class (forward.py says why), then the splits' combine (no tl.dot)
    assert [f["kernel"] for f in launches] == ["_lse_partial_kernel", "_combine_lse_kernel"] * len(RANK_SHAPES)
    for f in launches:
        where = f"triton {version}: {f['kernel']} {f['dtype']} B={f['batch']} d={f['features']} {f['constexprs']}"
        assert not (f["spill_bytes"] or f["spill_instructions"]), f"{where}: spills {f['spill_bytes']} bytes"
        if f["kernel"] == "_combine_lse_kernel":
            continue
        assert f["constexprs"]["RANK"] is True and f["constexprs"]["PAIRED"] is False, where
        assert f["ptx_wgmma"] and not f["ptx_mma_sync"], f"{where}: {f['sass_mma']}"
        assert any(m.startswith("HGMMA") for m in f["sass_mma"]), f"{where}: {f['sass_mma']}"


def _compiler_or_skip():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this triton has no CUDA backend to compile with: {err}")


@pytest.mark.slow
@kit.needs_triton
def test_rank_variant_is_wgmma_without_spills_newest_triton():
    _compiler_or_skip()
    _check_rank_compile(*_rank_compile())


@pytest.mark.slow
@kit.needs_triton
def test_rank_variant_is_wgmma_without_spills_triton_360():
    _compiler_or_skip()
    path = os.environ.get("FACEKERNELS_TRITON_360", os.path.join(ROOT, ".ci-cache", "triton-3.6.0"))
    if not os.path.isdir(os.path.join(path, "triton")):
        pytest.skip(f"triton 3.6.0 is not installed at {path} (.ci/run installs it there)")
    version, launches = _rank_compile(path)
    assert version == "3.6.0", version
    _check_rank_compile(version, launches)
