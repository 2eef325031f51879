"""Class-sharded heads (facekernels/sharded.py) in 2 and 4 gloo processes on CPU, against the single-process
head on the concatenated batch (backend "cpu" in float32, and the float64 reference as the oracle): loss,
d(local embeddings) (= world x the single-process rows), dW shards and CurricularFace's t over several steps,
with C not divisible by the world size, labels mostly on one shard, ignored rows, and Partial FC sampling.

Process start-up is the cost, so one spawned group runs every scenario of its world size and saves its
results; the comparisons run here, in the test process."""

import os

import kit
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import facekernels as fk
from facekernels import heads
from facekernels import functional as fkf
from facekernels.sharded import sample_classes, shard_range

pytestmark = [kit.needs_ext,
              pytest.mark.slow]  # gloo process groups of 2 and 4 processes per test

T0 = 0.15
# The cases of kit.CASES that run sharded: the oracle's, and these of docs/heads.md "More heads" with their
# margins overridden where this file's inputs need it: they keep the norms they are drawn with (~1-5 at d = 7), so
# MagFace's band is [2, 8] here, not [3, 10]. AdaFace starts from statistics near those norms (ADAFACE_STATS) so
# that z clips at both ends; ElasticFace draws from a generator seeded alike on every rank and in the
# single-process head.
MORE_CASES = {name: dict(kit.CASES[name].margins, **override) for name, override in {
    "adaface": {}, "magface": dict(l_a=2.0, u_a=8.0), "magface_cos": dict(l_a=2.0, u_a=8.0), "elastic_arc_plus": {},
    "elastic_cos_official": {}, "subcenter": {}, "filter_arc": {}}.items()}  # fmt: skip
ADAFACE_STATS = (4.0, 2.0)


def _k(sc):
    """Rows of the weight per class (sub-centers)."""
    return kit.CASES[sc["case"]].k


def _scenario(name, case, classes, b_local=5, d=7, steps=1, reduction="mean", ignore_index=-100, ignore_frac=0.2,
              skew=0.0, sample_rate=1.0, seed=0, dtype=torch.float32, backend="cpu", training=True,
              margin_grad="exact", frozen=False):  # fmt: skip
    return dict(name=name, case=case, classes=classes, b_local=b_local, d=d, steps=steps, reduction=reduction,
                ignore_index=ignore_index, ignore_frac=ignore_frac, skew=skew, sample_rate=sample_rate,
                seed=seed, dtype=dtype, backend=backend, training=training, margin_grad=margin_grad,
                frozen=frozen)  # fmt: skip


# world 2: every head case once (C = 13: 7 + 6 classes), several CurricularFace steps, sum reduction,
# ignore_index inside the class range, labels mostly on one shard, Partial FC
SCENARIOS_2 = [_scenario(f"{case}", case, 13, seed=i) for i, case in enumerate(kit.ORACLE_CASES)] + [
    _scenario("curricular_steps", "curricular", 13, steps=4, seed=20),
    _scenario("mv_arc_steps_skew", "mv_arc", 13, steps=2, skew=0.9, seed=21),
    _scenario("cosface_sum", "cosface", 13, reduction="sum", seed=22),
    _scenario("arcface_ignore_in_range", "arcface", 13, ignore_index=3, ignore_frac=0.3, seed=23),
    _scenario("arcface_all_ignored", "arcface", 13, ignore_frac=1.0, seed=24),
    _scenario("arcface_sampled", "arcface", 41, sample_rate=0.3, seed=25),
    _scenario("curricular_sampled", "curricular", 41, sample_rate=0.4, steps=3, skew=0.7, seed=26),
    _scenario("arcface_sampled_all", "arcface", 13, sample_rate=0.99, seed=27),  # keeps all: the plain head
    _scenario("combined_none", "combined", 13, reduction="none", backend="auto", seed=28),
    _scenario("curricular_float64_eval", "curricular", 13, steps=2, dtype=torch.float64, training=False, seed=29),
    _scenario("arcface_straight_through_frozen", "arcface", 13, margin_grad="straight_through", frozen=True,
              seed=30),  # fmt: skip
]
# world 2 with the Triton kernels (under the interpreter here: small shapes, float32): every head type, C = 11
# (6 + 5 classes), CurricularFace over 2 steps, labels mostly on one shard, Partial FC sampling
SCENARIOS_TRITON = [
    _scenario(f"triton_{case}", case, 11, b_local=3, d=5, seed=60 + i, backend="triton")
    for i, case in enumerate(["norm_softmax", "arcface", "cosface", "combined_general", "mv_arc"])
] + [
    _scenario("triton_curricular_steps", "curricular", 11, b_local=3, d=5, steps=2, skew=0.8, seed=66,
              backend="triton"),  # fmt: skip
    _scenario("triton_arcface_sampled", "arcface", 29, b_local=3, d=5, sample_rate=0.3, seed=67, backend="triton"),
]
# world 2 and 4: the more heads, over 2 steps (AdaFace's statistics, ElasticFace's draws), Partial FC with
# sub-centers, and the Triton kernels
SCENARIOS_MORE_2 = [_scenario(f"{case}_more", case, 13, steps=2, seed=80 + i) for i, case in enumerate(MORE_CASES)] + [
    _scenario("subcenter_sampled", "subcenter", 41, sample_rate=0.3, seed=90),
    _scenario("magface_none_ignored", "magface", 13, reduction="none", ignore_frac=0.4, seed=91),
]
SCENARIOS_MORE_TRITON = [
    _scenario(f"triton_{case}_more", case, 11, b_local=3, d=5, steps=2, seed=100 + i, backend="triton")
    for i, case in enumerate(["adaface", "magface", "elastic_arc_plus", "subcenter", "filter_arc"])
]
# world 2 with the Triton kernels in bfloat16 / float16 (the interpreter computes bfloat16 through
# tests/interpreter_bf16.py): every head kind, CurricularFace and AdaFace over 2 steps, sub-centers, filtering and
# Partial FC; C = 37 (19 + 18 classes), d = 24. Bounded by the kernels' model (_check), as in test_heads_lowp.py.
SCENARIOS_LOWP = {
    dtype: [_scenario(f"triton_{name}_{dtype}", case, 37, b_local=4, d=24, seed=130 + i, dtype=getattr(torch, dtype),
                      backend="triton", **kw)  # fmt: skip
            for i, (name, case, kw) in enumerate([
                ("arcface", "arcface", {}), ("curricular_steps", "curricular", dict(steps=2, skew=0.8)),
                ("mv_am_none", "mv_am", dict(reduction="none")), ("adaface", "adaface", dict(steps=2)),
                ("elastic_cos", "elastic_cos_official", {}), ("magface", "magface", {}),
                ("subcenter", "subcenter", {}), ("filter_arc", "filter_arc", {}),
                ("arcface_sampled", "arcface", dict(sample_rate=0.3, margin_grad="straight_through"))])]
    for dtype in ("bfloat16", "float16")
}  # fmt: skip
SCENARIOS_MORE_4 = [
    _scenario(f"{case}_more_4", case, 10, b_local=4, skew=0.8, seed=110 + i)
    for i, case in enumerate(["adaface", "magface", "elastic_cos_official", "subcenter"])
]
# world 4: C = 10 (3, 3, 2, 2 classes), labels mostly on shard 0, one shard with no label at all
SCENARIOS_4 = [
    _scenario("arcface_4", "arcface", 10, b_local=4, skew=0.95, seed=40),
    _scenario("curricular_4", "curricular", 10, b_local=4, steps=3, skew=0.8, seed=41),
    _scenario("mv_am_4", "mv_am", 10, b_local=4, skew=0.8, seed=42),
    _scenario("combined_general_4", "combined_general", 10, b_local=3, seed=43),
    _scenario("cosface_sampled_4", "cosface", 37, b_local=4, sample_rate=0.25, steps=2, skew=0.5, seed=44),
]


def _inputs(sc, world, step):
    """The global batch (B, d), the full weight (C, d) and the labels of one step (the same on every rank)."""
    g = torch.Generator().manual_seed(1000 * sc["seed"] + step)
    batch, classes, d, k = world * sc["b_local"], sc["classes"], sc["d"], _k(sc)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64)
    w = torch.randn(classes * k, d, generator=torch.Generator().manual_seed(sc["seed"]), dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    if sc["skew"]:
        _, n0 = shard_range(classes, world, 0)
        on_first = torch.rand(batch, generator=g) < sc["skew"]
        y[on_first] = torch.randint(0, n0, (int(on_first.sum()),), generator=g)
    # targets near their class so that margins, fallbacks and hard negatives all occur
    near = torch.rand(batch, generator=g) < 0.5
    x[near] = w[y * k][near] * 3 + 0.6 * torch.randn(int(near.sum()), d, generator=g, dtype=torch.float64)
    y[torch.rand(batch, generator=g) < sc["ignore_frac"]] = sc["ignore_index"]
    return x.float(), w.float(), y


def _make_head(sc, classes, **kw):
    case = kit.CASES[sc["case"]]
    cls, margins = heads.module_class(case.head), MORE_CASES.get(sc["case"], case.margins)
    if cls in (fk.ElasticArcFace, fk.ElasticCosFace):
        margins = dict(margins, generator=torch.Generator().manual_seed(sc["seed"]))
    module = cls(sc["d"], classes, **margins, reduction=sc["reduction"], ignore_index=sc["ignore_index"],
                 margin_grad=sc["margin_grad"], **kw)  # fmt: skip
    if cls is fk.CurricularFace:
        module.t.fill_(T0)
    if cls is fk.AdaFace:
        module.batch_mean.fill_(ADAFACE_STATS[0])
        module.batch_std.fill_(ADAFACE_STATS[1])
    module.weight.requires_grad_(not sc["frozen"])
    return module.train(sc["training"])


def _backward(loss, sc, world):
    """loss.backward(), with a fixed random weighting of the rows for reduction="none"."""
    if loss.dim() == 0:
        loss.backward()
    else:
        g = torch.rand(loss.shape[0], generator=torch.Generator().manual_seed(sc["seed"]), dtype=loss.dtype)
        (loss * g).sum().backward()


def _worker(rank, world, store, scenarios, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from facekernels.kernels import cpu

    cpu.CLASS_TILE = 4  # many tiles, a ragged last one
    if any(sc["backend"] == "triton" for sc in scenarios):
        from facekernels.kernels import triton as triton_kernels

        triton_kernels.CHUNK_BYTES = 1  # backward chunks of one class tile
        triton_kernels.POISON_OUTPUTS = True
        if os.environ.get("TRITON_INTERPRET") == "1":  # a spawned process: conftest.py did not run here
            import interpreter_bf16

            interpreter_bf16.install()
    group = dist.group.WORLD
    results = {}
    for sc in scenarios:
        b = sc["b_local"]
        rate, seed = sc["sample_rate"], 1234 + rank
        head = _make_head(sc, sc["classes"], backend=sc["backend"], process_group=group, sample_rate=rate,
                          sample_seed=seed).to(sc["dtype"])  # fmt: skip
        # a second generator replaying the head's draws, to know which classes it sampled
        replay = torch.Generator().manual_seed(seed)
        steps = []
        for step in range(sc["steps"]):
            x, w, y = _inputs(sc, world, step)
            x, w = x.to(sc["dtype"]), w.to(sc["dtype"])
            k = _k(sc)
            head.weight.data.copy_(w[head.class_start * k : (head.class_start + head.num_local) * k])
            head.weight.grad = None
            x_local = x[rank * b : (rank + 1) * b].clone().requires_grad_()
            loss = head(x_local, y[rank * b : (rank + 1) * b])
            _backward(loss, sc, world)
            dw = torch.zeros_like(head.weight) if sc["frozen"] else head.weight.grad.clone()
            assert (head.weight.grad is None) == sc["frozen"]
            record = dict(loss=loss.detach(), dx=x_local.grad, dw=dw, class_start=head.class_start,
                          num_local=head.num_local)  # fmt: skip
            if sc["case"] == "curricular":
                record["t"] = head.t.clone()
            if sc["case"] == "adaface":
                record["batch_stats"] = torch.stack([head.batch_mean, head.batch_std])
            if rate < 1.0:
                valid = y != sc["ignore_index"]
                index = sample_classes(y, valid, head.class_start, head.num_local, rate, replay)
                record["sampled"] = index + head.class_start
                # reproducible: a fresh head with the same seed draws the same classes, hence the same loss
                again = _make_head(sc, sc["classes"], backend=sc["backend"], process_group=group, sample_rate=rate,
                                   sample_seed=seed)  # fmt: skip
                again.weight.data.copy_(head.weight.data)
                if step == 0:
                    record["loss_again"] = again(x_local.detach(), y[rank * b : (rank + 1) * b]).detach()
            steps.append(record)
        results[sc["name"]] = steps
    # monitoring: the per-row stats of the global batch, the same on every rank (compared in _check)
    stats_head = fk.ArcFace(33, 29, backend="cpu", process_group=group)
    stats_head.return_stats = True
    x, w, y = _stats_inputs(world)
    stats_head.weight.data.copy_(w[stats_head.class_start : stats_head.class_start + stats_head.num_local])
    results["stats"] = tuple(stats_head(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4])[1])
    # errors on one rank only: every rank raises the same error (no rank is left waiting in a collective until
    # the group's timeout, no abort inside gloo on unequal shapes or dtypes), with the label checks on and off
    head = fk.ArcFace(6, 9, backend="cpu", process_group=group)
    errors = []
    last = rank == world - 1
    for bad in ("batch", "label", "batch_unchecked", "dtype", "features", "float_labels"):
        fk.set_label_checks(bad != "batch_unchecked")
        b_local = 3 + (bad.startswith("batch") and last)
        x = torch.randn(b_local, 7 if bad == "features" and last else 6)
        y = torch.zeros(b_local, dtype=torch.long)
        if bad == "label" and rank == 0:
            y[1] = 9
        if bad == "dtype" and rank == 0:
            x = x.half()  # (float64 beside a float32 weight is refused on the rank itself)
        if bad == "float_labels" and last:
            y = y.float()
        try:
            head(x, y)
            errors.append(None)
        except (ValueError, TypeError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    fk.set_label_checks(True)
    results["errors"] = errors
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _stats_inputs(world):
    g = torch.Generator().manual_seed(7)
    x, w, y = kit.head_inputs(4 * world, 29, 33, dtype=torch.float32, near_frac=0.6, generator=g)
    y[1] = -100
    return x, w, y


def _spawn(world, scenarios, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), scenarios, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


def _single_process(sc, world, backend, dtype, sampled=None):
    """Per step (loss, dx, dW, t) of the unsharded head on the concatenated batch; with ``sampled`` (sorted
    global class ids per step), on those classes only (labels remapped), dW scattered back to (C, d)."""
    head = _make_head(sc, sc["classes"], backend=backend).to(dtype)
    k = _k(sc)
    out = []
    for step in range(sc["steps"]):
        x, w, y = _inputs(sc, world, step)
        x, w = x.to(sc["dtype"]), w.to(sc["dtype"])
        x, w = x.to(dtype).requires_grad_(), w.to(dtype)
        labels = y
        if sampled is not None:
            keep = sampled[step]
            valid = y != sc["ignore_index"]
            position = torch.searchsorted(keep, y.clamp_min(0))
            assert bool((keep[position.clamp_max(len(keep) - 1)][valid] == y[valid]).all()), "a positive was dropped"
            labels = torch.where(valid, position, y)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k)).view(-1)
            w_used = w[keep_rows].requires_grad_()
            sub = _make_head(sc, len(keep), backend=backend).to(dtype)
            if sc["case"] == "curricular":
                sub.t.copy_(head.t)
            sub.weight = torch.nn.Parameter(w_used)
            loss = sub(x, labels)
            _backward(loss, sc, world)
            dw = torch.zeros_like(w)
            dw[keep_rows] = sub.weight.grad
            t = sub.t.clone() if sc["case"] == "curricular" else None
            if t is not None:
                head.t.copy_(sub.t)
        else:
            head.weight = torch.nn.Parameter(w.clone())
            loss = head(x, labels)
            _backward(loss, sc, world)
            dw = head.weight.grad
            t = head.t.clone() if sc["case"] == "curricular" else None
        stats = torch.stack([head.batch_mean, head.batch_std]) if sc["case"] == "adaface" else None
        out.append(dict(loss=loss.detach(), dx=x.grad, dw=dw, t=t, batch_stats=stats))
    return out


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(results, scenarios, world):
    for sc in scenarios:
        name = sc["name"]
        sampled = None
        if sc["sample_rate"] < 1.0:
            sampled = [torch.cat([results[r][name][s]["sampled"] for r in range(world)]) for s in range(sc["steps"])]
        # float32 unless the scenario says; the single-process head of the same kernels ("auto" is "cpu" here).
        # bfloat16 / float16: the kernels' model instead (tests/test_heads_lowp.py): the float32 reference on the
        # rounded inputs with its cosine gradient rounded to bfloat16, dx and dW rounded to the dtype
        lowp = sc["dtype"] in (torch.bfloat16, torch.float16)
        if lowp:
            with kit.RoundCosineGrad():
                want32 = _single_process(sc, world, "reference", torch.float32, sampled)
            for step in want32:
                step["dx"], step["dw"] = step["dx"].to(sc["dtype"]), step["dw"].to(sc["dtype"])
        else:
            single = "triton" if sc["backend"] == "triton" else "cpu"
            want32 = _single_process(sc, world, single, sc["dtype"], sampled)
        want64 = _single_process(sc, world, "reference", torch.float64, sampled)
        b = sc["b_local"]
        # the floor of the error-ratio rule (kit.logit_floor): the single-process error alone can be small by luck,
        # as the sharded workers (1 thread) and this process (default threads) round the same product differently
        # (CurricularFace dx: 2.4e-6 here, 3.1e-5 under MKL_CBWR=COMPATIBLE, 5e-5 sharded on another machine)
        # (low precision: float32's, as the model is the float32 reference)
        floor32 = kit.logit_floor(_make_head(sc, sc["classes"]).params.s, torch.float32 if lowp else sc["dtype"])
        for step in range(sc["steps"]):
            for rank in range(world):
                got = results[rank][name][step]
                where = f"{name} step {step} rank {rank}"
                # the loss is identical on every rank
                assert torch.equal(got["loss"], results[0][name][step]["loss"]), where
                rows = slice(rank * b, (rank + 1) * b)
                k = _k(sc)
                shard = slice(got["class_start"] * k, (got["class_start"] + got["num_local"]) * k)
                # float32 against the float64 oracle by the error-ratio rule (tests/kit.py): the
                # sharded error <= 4 x the single-process float32 head's + floor x the largest value. A direct
                # match with the float32 head holds for the loss and t, not for every gradient element:
                # the sharded sums are reassociated.
                pairs = [("loss", got["loss"], want32[step]["loss"], want64[step]["loss"]),
                         ("dx", got["dx"], world * want32[step]["dx"][rows], world * want64[step]["dx"][rows]),
                         ("dw", got["dw"], want32[step]["dw"][shard], want64[step]["dw"][shard])]  # fmt: skip
                if sc["frozen"]:
                    pairs.pop()  # no weight gradient at all (checked in the worker)
                for what, value, low, exact in pairs:
                    err, err_low = _max_err(value, exact), _max_err(low, exact)
                    scale = exact.abs().max().item() if exact.numel() else 0.0
                    # low precision: a floor of one bfloat16 rounding of D (2^-8) at the largest gradient
                    floor = 2.0**-8 * scale if lowp and what != "loss" else floor32 * max(scale, 1.0)
                    assert err <= 4 * err_low + floor, f"{where} {what}: {err} vs {err_low}"
                if not lowp:  # (low precision: the model is the float32 reference, not the same kernels)
                    torch.testing.assert_close(got["loss"], want32[step]["loss"], rtol=floor32, atol=floor32)
                if sc["case"] == "curricular":
                    assert abs(got["t"].item() - want32[step]["t"].item()) <= 1e-6, where
                    assert abs(got["t"].item() - want64[step]["t"].item()) <= 1e-6, where
                if sc["case"] == "adaface":  # the global batch's statistics, the same as one process's
                    torch.testing.assert_close(got["batch_stats"], want64[step]["batch_stats"], rtol=1e-6, atol=0)
                if sampled is not None:
                    # only the sampled rows get a gradient; the rest are exactly zero
                    unsampled = torch.ones(got["num_local"], dtype=torch.bool)
                    unsampled[got["sampled"] - got["class_start"]] = False
                    unsampled = unsampled.repeat_interleave(k)
                    assert bool((got["dw"][unsampled] == 0).all()), where
                    if sc["sample_rate"] * got["num_local"] < got["num_local"] - 1:
                        assert bool(unsampled.any()), f"{where}: sampling kept every class"
                    if step == 0:
                        assert torch.equal(got["loss_again"], got["loss"]), f"{where}: not reproducible"
    x, w, y = _stats_inputs(world)
    want = fkf.margin_cross_entropy(x, w, y, "arcface", backend="reference", return_stats=True)[1]
    for rank in range(world):
        got = fk.HeadStats(*results[rank]["stats"])
        torch.testing.assert_close(got.target_cosine, want.target_cosine, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.correct, want.correct) and 0 < int(want.correct.sum())
    expected = ["same batch size", "labels must lie in [0, 9)", "same batch size", "same embeddings dtype",
                "6 features", "labels must be an int64"]  # fmt: skip
    for rank in range(world):
        for error, words in zip(results[rank]["errors"], expected, strict=True):
            assert error is not None and words in error, (rank, error, words)


@pytest.mark.parametrize("world, scenarios", [
    pytest.param(2, SCENARIOS_2, id="heads-2"),
    pytest.param(4, SCENARIOS_4, id="heads-4"),
    pytest.param(2, SCENARIOS_TRITON, id="triton-2", marks=kit.triton_on_cpu),
    pytest.param(2, SCENARIOS_MORE_2, id="more-heads-2"),
    pytest.param(4, SCENARIOS_MORE_4, id="more-heads-4"),
    pytest.param(2, SCENARIOS_MORE_TRITON, id="more-heads-triton-2", marks=kit.triton_on_cpu),
    pytest.param(2, SCENARIOS_LOWP["bfloat16"], id="triton-2-bfloat16", marks=kit.triton_on_cpu),
    pytest.param(2, SCENARIOS_LOWP["float16"], id="triton-2-float16", marks=kit.triton_on_cpu),
])  # fmt: skip
def test_sharded_heads_match_one_process(world, scenarios, tmp_path):
    _check(_spawn(world, scenarios, tmp_path), scenarios, world)


def test_shard_range_is_insightface_split():
    for classes, world in ((13, 2), (10, 4), (7, 7), (100, 3)):
        ranges = [shard_range(classes, world, r) for r in range(world)]
        assert sum(n for _, n in ranges) == classes
        assert all(start == prev + n for (start, _), (prev, n) in zip(ranges[1:], ranges[:-1], strict=True))
        assert ranges[0][0] == 0 and max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
        assert [n for _, n in ranges] == sorted((n for _, n in ranges), reverse=True)


def test_sampling_keeps_positives_and_is_seeded():
    labels = torch.tensor([3, 50, 51, 7, -100, 52, 99])
    valid = labels != -100
    first = sample_classes(labels, valid, 50, 30, 0.2, torch.Generator().manual_seed(5))
    again = sample_classes(labels, valid, 50, 30, 0.2, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert first.numel() == 6 and bool((first[1:] > first[:-1]).all())
    assert {0, 1, 2} <= set(first.tolist()) and bool((first < 30).all())
    # more positives than ceil(rate * num_local): all of them are kept
    many = sample_classes(torch.arange(50, 60), torch.ones(10, dtype=torch.bool), 50, 30, 0.1)
    assert many.tolist() == list(range(10))


def test_sharded_mode_has_no_reference_backend():
    with pytest.raises(fk.BackendUnavailableError, match="backend='reference'"):
        fk.ArcFace(8, 10, backend="reference", process_group=object())


def test_sample_rate_needs_a_process_group():
    with pytest.raises(ValueError, match="process_group"):
        fk.ArcFace(8, 10, sample_rate=0.5)
    with pytest.raises(ValueError, match="sample_rate"):
        fk.ArcFace(8, 10, sample_rate=0.0)


def test_nothing_the_head_holds_outlives_its_process_group(tmp_path):
    # a head and the graph of its last loss alive after destroy_process_group (as at the end of a training script)
    # must not keep the group alive: gloo frees it at interpreter exit then, and aborts the process ("terminate
    # called without an active exception") in about 1 run of 3 of examples/train_sharded_toy.py
    import gc
    import weakref

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = weakref.ref(dist.group.WORLD)
        head = fk.ArcFace(8, 13, backend="cpu", process_group=dist.group.WORLD, sample_rate=0.5, sample_seed=0)
        x = torch.randn(5, 8, requires_grad=True)
        loss = head(x, torch.randint(0, 13, (5,)))
        loss.backward()
        assert head.process_group is group()
    finally:
        dist.destroy_process_group()
    gc.collect()
    assert group() is None, [type(r).__name__ for r in gc.get_referrers(group())]
    with pytest.raises(RuntimeError, match="process group was destroyed"):
        head(x, torch.randint(0, 13, (5,)))
    assert loss.grad_fn is not None  # the graph is still there, without the group
