"""Checkpoint interop (facekernels/convert.py) and Partial FC's sampling generator in the module state.

For each trainer's layout: round trips, a checkpoint saved in that layout (head and optimizer state after two
steps of the trainer's own head, re-implemented in tests/peers.py) that loads and continues with the same
third step, and the errors. The heads of heads-more (AdaFace, MagFace, ElasticFace, Sub-center ArcFace): our
module -> their layout (what their head's load_state_dict takes) -> ours, and a module loaded from their layout
giving the official code's numbers (heads-more's worked examples) and the functional form's on the transposed
weight. Then the generator: sample_classes directly, a module state_dict round trip, and a Partial FC head
resumed bit for bit (one gloo process).
"""

import inspect
import io

import kit
import peers
import pytest
import torch
import torch.distributed as dist

import facekernels as fk
from facekernels import convert
from facekernels.sharded import sample_classes, shard_range

BACKENDS = kit.FLOAT64_BACKENDS

D, C, B = 6, 9, 7


def _saved(obj):
    """obj after torch.save / torch.load (what a checkpoint file gives back)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, D, generator=g, dtype=torch.float64), torch.randint(0, C, (B,), generator=g))
            for _ in range(steps)]  # fmt: skip


# ------------------------------------------------------------------------------------------ layouts


def test_round_trips_and_pass_through():
    theirs = {"backbone.w": torch.randn(3, 3), "head.kernel": torch.randn(D, C), "head.t": torch.tensor([0.25])}
    ours = convert.from_curricularface(theirs, prefix="head.")
    assert set(ours) == {"backbone.w", "head.weight", "head.t"}
    assert ours["backbone.w"] is theirs["backbone.w"]  # other keys pass through untouched
    assert torch.equal(ours["head.weight"], theirs["head.kernel"].T) and ours["head.weight"].is_contiguous()
    assert ours["head.t"].shape == () and ours["head.t"].dtype == torch.float32 and ours["head.t"].item() == 0.25
    back = convert.to_curricularface(ours, prefix="head.")
    assert set(back) == set(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    assert back["head.t"].shape == (1,)

    for frm, to, key in [(convert.from_facexzoo, convert.to_facexzoo, "weight"),
                         (convert.from_adaface, convert.to_adaface, "kernel"),
                         (convert.from_pytorch_metric_learning, convert.to_pytorch_metric_learning, "W")]:  # fmt: skip
        theirs = {key: torch.randn(D, C)}
        ours = frm(theirs)
        assert set(ours) == {"weight"} and torch.equal(ours["weight"], theirs[key].T)
        back = to(ours)
        assert set(back) == {key} and torch.equal(back[key], theirs[key])


def test_our_heads_load_each_layout_strictly():
    kernel = torch.randn(D, C)
    arc = fk.ArcFace(D, C)
    arc.load_state_dict(convert.from_curricularface({"kernel": kernel}))
    assert torch.equal(arc.weight.detach(), kernel.T)
    cur = fk.CurricularFace(D, C)
    cur.load_state_dict(convert.from_facexzoo({"kernel": kernel, "t": torch.tensor([0.5])}))  # its CurricularFace
    assert cur.t.item() == 0.5 and cur.t.shape == ()
    mv = fk.MVSoftmax(D, C)
    mv.load_state_dict(convert.from_facexzoo({"weight": kernel}))
    assert torch.equal(mv.weight.detach(), kernel.T)
    cos = fk.CosFace(D, C)
    cos.load_state_dict(convert.from_pytorch_metric_learning({"W": kernel}))
    assert torch.equal(cos.weight.detach(), kernel.T)
    # AdaFace's own head: the norm statistics become 0-dim float32, the never-used t is dropped
    ada = convert.from_adaface({"kernel": kernel, "t": torch.zeros(1), "batch_mean": torch.tensor([20.0]),
                                "batch_std": torch.tensor([100.0])})  # fmt: skip
    assert set(ada) == {"weight", "batch_mean", "batch_std"} and ada["batch_std"].shape == ()
    back = convert.to_adaface(ada)
    assert set(back) == {"kernel", "t", "batch_mean", "batch_std"} and back["batch_mean"].shape == (1,)
    # AdaFace's ArcFace / CosFace heads have the kernel only
    arc.load_state_dict(convert.from_adaface({"kernel": kernel}))
    # writing ours out drops our extra state (no other trainer has it), an ElasticFace head's margin generator too
    assert set(convert.to_curricularface(cur.state_dict())) == {"kernel", "t"}
    assert set(convert.to_pytorch_metric_learning(arc.state_dict())) == {"W"}
    elastic = fk.ElasticArcFace(D, C, generator=torch.Generator().manual_seed(0)).state_dict()
    assert elastic["margin_generator._extra_state"].numel() > 0
    for to, key in [(convert.to_curricularface, "kernel"), (convert.to_facexzoo, "weight"),
                    (convert.to_adaface, "kernel"), (convert.to_pytorch_metric_learning, "W"),
                    (convert.to_magface, "weight"), (convert.to_elasticface, "kernel")]:  # fmt: skip
        assert set(to(elastic)) == {key}, to.__name__


def test_insightface_partial_fc_shards_load_unchanged():
    # PartialFC_V2 (arcface_torch/partial_fc_v2.py 60-71): rank r of `world` holds num_classes // world +
    # (r < num_classes % world) rows starting at num_classes // world * r + min(r, num_classes % world)
    for classes, world in [(10, 3), (7, 7), (1000, 8), (13, 2)]:
        for rank in range(world):
            num_local = classes // world + int(rank < classes % world)
            start = classes // world * rank + min(rank, classes % world)
            assert shard_range(classes, world, rank) == (start, num_local)
    # one rank's checkpoint entry "state_dict_softmax_fc" and its SGD state, in their layout: (num_local, d)
    shard = {"weight": torch.randn(C, D)}
    head = fk.ArcFace.like("insightface", D, C)
    head.load_state_dict(shard)  # strict: no key missing, none unexpected
    assert torch.equal(head.weight.detach(), shard["weight"])
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    momentum = torch.randn(C, D)
    opt.load_state_dict({"state": {0: {"momentum_buffer": momentum}},
                         "param_groups": [{**opt.state_dict()["param_groups"][0]}]})  # fmt: skip
    assert torch.equal(opt.state[head.weight]["momentum_buffer"], momentum)


# ------------------------------------------------------------- AdaFace, MagFace, ElasticFace, Sub-center ArcFace

# their head's parameters and buffers (name: shape) for C classes, d = D
THEIRS = {
    "adaface": dict(kernel=(D, C), t=(1,), batch_mean=(1,), batch_std=(1,)),  # head.py AdaFace
    "magface": dict(weight=(D, C)),  # models/magface.py MagLinear
    "elasticface": dict(kernel=(D, C)),  # utils/losses.py ElasticArcFace / ElasticCosFace
}
NEW_LAYOUTS = {  # our head (and the functional form's name), their layout, from_, to_
    "adaface": (fk.AdaFace, "adaface", convert.from_adaface, convert.to_adaface),
    "magface": (fk.MagFace, "magface", convert.from_magface, convert.to_magface),
    "elastic_arcface": (fk.ElasticArcFace, "elasticface", convert.from_elasticface, convert.to_elasticface),
    "elastic_cosface": (fk.ElasticCosFace, "elasticface", convert.from_elasticface, convert.to_elasticface),
}


def _their_head(layout):
    """A module with their head's state names and shapes: its strict load_state_dict takes what theirs takes."""
    module = torch.nn.Module()
    for name, shape in THEIRS[layout].items():
        module.register_buffer(name, torch.zeros(shape))
    return module


@pytest.mark.parametrize("name", list(NEW_LAYOUTS))
def test_new_heads_round_trip_through_their_layout(name):
    cls, layout, frm, to = NEW_LAYOUTS[name]
    head = cls(D, C)
    if layout == "elasticface":  # a margin generator, whose state their layout has no place for
        head.margin_generator.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in head.buffers():  # AdaFace's statistics away from their initial values
            value.mul_(0.75)
    ours = {"backbone.w": torch.randn(3), **{"head." + k: v for k, v in head.state_dict().items()}}
    theirs = to(ours, prefix="head.")
    assert theirs["backbone.w"] is ours["backbone.w"]
    _their_head(layout).load_state_dict({k[5:]: v for k, v in theirs.items() if k.startswith("head.")})
    key = next(iter(THEIRS[layout]))
    assert torch.equal(theirs["head." + key], head.weight.detach().T)

    back = frm(theirs, prefix="head.")
    assert back["backbone.w"] is ours["backbone.w"]
    other = cls(D, C)
    other.load_state_dict({k[5:]: v for k, v in back.items() if k.startswith("head.")})
    for k, v in other.state_dict().items():
        if not k.endswith("_extra_state"):
            assert torch.equal(v, head.state_dict()[k]) and v.dtype == head.state_dict()[k].dtype, k


@pytest.mark.parametrize("cls", [fk.ElasticArcFace, fk.ElasticCosFace])
def test_elastic_heads_load_theirs_strictly(cls):
    # their checkpoint has no generator state: as for every other head, it must load with strict=True
    cls(D, C).load_state_dict(convert.from_elasticface({"kernel": torch.randn(D, C)}))


# heads-more's worked examples (W rows = classes, x, y shared by the sections): the official code's losses, from
# a module loaded from their layout of W (not square: a missing transpose cannot load)
W_EX = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
X_EX = torch.tensor([[2.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
X_MAG = torch.tensor([[20.0, 10.0], [30.0, 40.0]], dtype=torch.float64)  # §2e: the same cosines, norms 22.4 and 50
Y_EX = torch.tensor([0, 2])
W_SUB = torch.tensor([[1, 0], [0, -1], [-1, 0], [0, 2], [1, 1], [-2, 1], [-1, -1], [1, -2], [0.5, 0.5]],
                     dtype=torch.float64)  # fmt: skip


def _adaface_ex():
    return {"kernel": W_EX.T, "t": torch.zeros(1), "batch_mean": torch.tensor([20.0]),
            "batch_std": torch.tensor([100.0])}  # fmt: skip


WORKED = [  # (head, their state dict converted to ours, x, official loss, rtol)
    # §1e; our float32 statistics against their float64 run: 1 ulp of the buffers, within 1e-8
    (lambda: fk.AdaFace(2, 3, t_alpha=1.0), lambda: convert.from_adaface(_adaface_ex()), X_EX, 67.8600276196, 1e-8),
    (lambda: fk.AdaFace(2, 3, t_alpha=0.01), lambda: convert.from_adaface(_adaface_ex()), X_EX, 69.3833459442, 1e-8),
    # §2e
    (lambda: fk.MagFace(2, 3), lambda: convert.from_magface({"weight": W_EX.T}), X_MAG, 58.5157940548, 1e-10),
    (lambda: fk.MagFace(2, 3, kind="cos", l_m=0.35, lambda_g=150.0),
     lambda: convert.from_magface({"weight": W_EX.T}), X_MAG, 79.5747502786, 1e-10),
    # §3e: torch.manual_seed(0) before the forward; the official code has no fallback
    (lambda: fk.ElasticArcFace(2, 3, fallback="none"), lambda: convert.from_elasticface({"kernel": W_EX.T}), X_EX,
     55.7431158407, 1e-10),
    (lambda: fk.ElasticCosFace(2, 3, plus=True), lambda: convert.from_elasticface({"kernel": W_EX.T}), X_EX,
     70.9443674054, 1e-10),
    # §4e: MXNet's fc7 (C k, d) is our layout, loaded as it is (their digits carry MXNet's 1e-10 inside the norm's
    # sqrt: 1.0e-9 relative)
    (lambda: fk.SubCenterArcFace(2, 3, fallback="none"), lambda: {"weight": W_SUB}, X_EX, 18.4951620659, 2e-9),
]  # fmt: skip


@pytest.mark.parametrize("i", range(len(WORKED)))
def test_their_checkpoint_gives_the_official_numbers(i):
    make_head, state_dict, x, want, rtol = WORKED[i]
    head = make_head().double()
    head.load_state_dict(state_dict())
    torch.manual_seed(0)
    assert head(x, Y_EX).item() == pytest.approx(want, rel=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(NEW_LAYOUTS))
def test_a_module_from_their_layout_equals_the_functional_form(name, backend):
    # a square kernel (d = C): loading it untransposed would not fail, only give other numbers
    cls, layout, frm, _ = NEW_LAYOUTS[name]
    g = torch.Generator().manual_seed(2)
    kernel = torch.randn(D, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 30  # norms inside MagFace's [l_a, u_a]
    y = torch.randint(0, D, (B,), generator=g)
    theirs, state = {next(iter(THEIRS[layout])): kernel}, {}
    if layout == "adaface":
        theirs.update(t=torch.zeros(1), batch_mean=torch.tensor([18.5]), batch_std=torch.tensor([4.0]))
        state = dict(batch_mean=torch.tensor(18.5), batch_std=torch.tensor(4.0))
    module = cls(D, D, backend=backend).double()
    if layout == "elasticface":  # the same draws for both
        module.margin_generator.generator = torch.Generator().manual_seed(5)
        state = dict(generator=torch.Generator().manual_seed(5))
    module.load_state_dict(frm(theirs))
    got = module(x, y)
    want = fk.functional.margin_cross_entropy(x, kernel.T, y, name, backend="reference", **state)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if layout == "adaface":  # the statistics read from their (1,) buffers, then updated alike
        assert (module.batch_mean.item(), module.batch_std.item()) == (state["batch_mean"].item(),
                                                                        state["batch_std"].item())  # fmt: skip


BAD = [
    (lambda: convert.from_curricularface({"weight": torch.zeros(D, C)}), KeyError, "no 'kernel'"),
    (lambda: convert.from_curricularface({"head.kernel": torch.zeros(D, C)}, prefix="x."), KeyError, "'x.kernel'"),
    (lambda: convert.from_curricularface([1, 2]), TypeError, "state_dict must be a mapping"),
    (lambda: convert.from_curricularface({"kernel": torch.zeros(D, C)}, prefix=1), TypeError, "prefix"),
    (lambda: convert.from_curricularface({"kernel": torch.zeros(D, C, 1)}), ValueError, "must be 2-D"),
    (lambda: convert.from_curricularface({"kernel": [[0.0]]}), TypeError, "must be a tensor"),
    (lambda: convert.from_curricularface({"kernel": torch.zeros(D, C), "t": torch.zeros(2)}), ValueError, "one number"),
    (lambda: convert.to_adaface({"weight": torch.zeros(C, D), "t": torch.zeros(())}), ValueError, "CurricularFace"),
    (lambda: convert.to_pytorch_metric_learning({"weight": torch.zeros(C, D), "t": torch.zeros(())}), ValueError,
     "CurricularFace"),  # fmt: skip
    (lambda: convert.to_curricularface({"weight": torch.zeros(C, D), "batch_mean": torch.zeros(())}), ValueError,
     "CurricularFace layout has no AdaFace head"),  # fmt: skip
    (lambda: convert.to_facexzoo({"weight": torch.zeros(C, D), "batch_std": torch.zeros(())}), ValueError, "AdaFace"),
    (lambda: convert.to_pytorch_metric_learning({"weight": torch.zeros(C, D), "batch_mean": torch.zeros(())}),
     ValueError, "AdaFace"),  # fmt: skip
    (lambda: convert.from_adaface({"kernel": torch.zeros(D, C), "batch_mean": torch.zeros(2)}), ValueError,
     r"\['batch_mean'\] must hold one number"),  # fmt: skip
    (lambda: convert.from_magface({"kernel": torch.zeros(D, C)}), KeyError, "MagFace layout: no 'weight'"),
    (lambda: convert.from_magface({"weight": torch.zeros(D)}), ValueError, r"\['weight'\] must be 2-D"),
    (lambda: convert.to_magface({"weight": torch.zeros(C, D), "batch_mean": torch.zeros(())}), ValueError,
     "MagFace repository has no AdaFace head"),  # fmt: skip
    (lambda: convert.to_magface({"W": torch.zeros(C, D)}), KeyError, "facekernels layout: no 'weight'"),
    (lambda: convert.from_elasticface({"weight": torch.zeros(D, C)}), KeyError, "ElasticFace layout: no 'kernel'"),
    (lambda: convert.from_elasticface({"kernel": torch.zeros(D, C)}, prefix="head."), KeyError, "'head.kernel'"),
    (lambda: convert.to_elasticface({"weight": torch.zeros(C, D), "t": torch.zeros(())}), ValueError,
     "ElasticFace repository has no CurricularFace head"),  # fmt: skip
    (lambda: convert.to_elasticface({"weight": [[0.0]]}), TypeError, r"\['weight'\] must be a tensor"),
    (lambda: convert.param_indices(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1),
                                   [torch.nn.Parameter(torch.zeros(3))]),
     ValueError, "not in the optimizer"),  # fmt: skip
    (lambda: convert.param_indices("sgd", []), TypeError, "optimizer"),
    (lambda: convert.transpose_optimizer_state({"momentum": 1}, [0]), TypeError, "optimizer_state"),
    (lambda: convert.transpose_optimizer_state({"state": {0: {"exp_avg": torch.zeros(2, 2, 2)}}, "param_groups": []},
                                               [0]), ValueError, "not a matrix"),  # fmt: skip
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments(i):
    fn, exc, words = BAD[i]
    with pytest.raises(exc, match=words):
        fn()


# ------------------------------------------------------------------------ checkpoints that continue

# (peer loss of (x, their weight, y, state) -> (loss, new state), their weight key, their layout is (d, C),
#  our head, converter, optimizer class and options, their state after two steps -> our head's buffers)
def _curricular_peer(x, kernel, y, state):
    loss, t = peers.curricularface(x, kernel, y, state["t"])
    return loss, {"t": t}


PEER_CASES = {
    "curricularface": dict(
        peer=_curricular_peer, key="kernel", transposed=True, convert=convert.from_curricularface,
        head=lambda backend: fk.CurricularFace.like("curricularface", D, C, backend=backend),
        opt=(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    ),
    "facexzoo_mv_arc": dict(
        peer=lambda x, w, y, st: (peers.facexzoo_mv_softmax(x, w, y, is_am=False), st), key="weight",
        transposed=True, convert=convert.from_facexzoo,
        head=lambda backend: fk.MVSoftmax.like("facexzoo", D, C, is_am=False, backend=backend),
        opt=(torch.optim.Adam, dict(lr=0.01)),
    ),
    "pytorch_metric_learning": dict(
        peer=lambda x, w, y, st: (peers.pml_arcface(x, w, y), st), key="W", transposed=True,
        convert=convert.from_pytorch_metric_learning,
        head=lambda backend: fk.ArcFace.like("pytorch-metric-learning", D, C, backend=backend),
        opt=(torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    ),
    "insightface": dict(
        # s = 32: every row's loss stays below insightface's floor -log(1e-30) = 69.08 (s (1 + 1) + log C)
        peer=lambda x, w, y, st: (peers.insightface(x, w, y, s=32.0, m1=1.0, m2=0.5, m3=0.0), st), key="weight",
        transposed=False, convert=lambda sd, prefix="": dict(sd),  # PartialFC_V2's layout is ours
        head=lambda backend: fk.CombinedMargin.like("insightface", D, C, s=32.0, backend=backend),
        opt=(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    ),
}


def _their_run(case, steps):
    """Two steps of the peer's head in its layout: a "backbone" (an embedding shift), then the head, both
    in one optimizer as the trainers do; returns their checkpoint dict."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(D, C, generator=g, dtype=torch.float64) * 0.1
    weight = torch.nn.Parameter(weight if case["transposed"] else weight.T.contiguous())
    shift = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
    opt_cls, opt_kw = case["opt"]
    opt = opt_cls([shift, weight], **opt_kw)
    state = {"t": 0.0}
    for x, y in steps:
        loss, state = case["peer"](x + shift, weight, y, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head = {"head." + case["key"]: weight.detach().clone()}
    if "t" in state and case["key"] == "kernel":
        head["head.t"] = torch.tensor([state["t"]], dtype=torch.float32)
    return _saved({"state_dict": {"backbone.shift": shift.detach().clone(), **head}, "optimizer": opt.state_dict()})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PEER_CASES))
def test_a_peer_checkpoint_loads_and_continues(name, backend):
    case = PEER_CASES[name]
    steps = _batches(3)
    ckpt = _their_run(case, steps[:2])

    # their third step
    theirs = _saved(ckpt)
    weight = torch.nn.Parameter(theirs["state_dict"]["head." + case["key"]])
    shift = torch.nn.Parameter(theirs["state_dict"]["backbone.shift"])
    opt_cls, opt_kw = case["opt"]
    opt = opt_cls([shift, weight], **opt_kw)
    opt.load_state_dict(theirs["optimizer"])
    state = {"t": float(theirs["state_dict"].get("head.t", torch.zeros(1)))}
    x, y = steps[2]
    want_loss, state = case["peer"](x + shift, weight, y, state)
    opt.zero_grad()
    want_loss.backward()
    opt.step()
    want_weight = weight.detach().T if case["transposed"] else weight.detach()

    # ours, from the converted checkpoint
    ours = case["convert"](ckpt["state_dict"], prefix="head.")
    head = case["head"](backend).double()
    head.load_state_dict({k[len("head."):]: v for k, v in ours.items() if k.startswith("head.")})
    shift = torch.nn.Parameter(ours["backbone.shift"].clone())
    opt = opt_cls([shift, head.weight], **opt_kw)
    indices = convert.param_indices(opt, [head.weight]) if case["transposed"] else []
    opt.load_state_dict(convert.transpose_optimizer_state(ckpt["optimizer"], indices))
    got_loss = head(x + shift, y)
    opt.zero_grad()
    got_loss.backward()
    opt.step()

    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got_loss, want_loss.detach(), **tol)
    torch.testing.assert_close(head.weight.detach(), want_weight, **tol)
    if name == "curricularface":
        assert head.t.item() == pytest.approx(state["t"], abs=1e-7)
    # and back out: their optimizer state in their layout again
    back = convert.transpose_optimizer_state(opt.state_dict(), indices)
    for key, value in back["state"][1].items():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            assert value.shape == ckpt["optimizer"]["state"][1][key].shape


def test_the_optimizer_state_needs_the_transpose():
    # guard: loading the optimizer state untransposed puts (d, C) moments on a (C, d) weight; torch does not
    # check, and the next step fails (or, for a square weight, silently scrambles the moments)
    case = PEER_CASES["curricularface"]
    ckpt = _their_run(case, _batches(2))
    head = case["head"]("reference").double()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(D, dtype=torch.float64)), head.weight], lr=0.1,
                          momentum=0.9)  # fmt: skip
    opt.load_state_dict(ckpt["optimizer"])
    head.weight.grad = torch.zeros_like(head.weight)
    opt.param_groups[0]["params"][0].grad = torch.zeros(D, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        opt.step()


# ---------------------------------------------------------------------- Partial FC sampling generator


def test_sample_classes_resumes_from_the_saved_generator_state():
    labels = torch.tensor([3, 17, 17, 40, 2, 8])
    valid = torch.ones(6, dtype=torch.bool)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        sample_classes(labels, valid, 0, 50, 0.3, gen)
    saved = _saved(gen.get_state())
    want = [sample_classes(labels, valid, 0, 50, 0.3, gen) for _ in range(2)]
    resumed = torch.Generator().manual_seed(999)
    resumed.set_state(saved)
    got = [sample_classes(labels, valid, 0, 50, 0.3, resumed) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(set(labels.tolist()) <= set(g.tolist()) and len(g) == 15 for g in got)


def test_head_state_dict_carries_the_generator():
    labels, valid = torch.tensor([3, 17, 40]), torch.ones(3, dtype=torch.bool)
    head = fk.ArcFace(D, 50)
    assert head.get_extra_state().numel() == 0  # no generator: an empty tensor, every value stays a tensor
    head.sample_generator = torch.Generator().manual_seed(5)  # what sample_seed= gives a sharded head
    sample_classes(labels, valid, 0, 50, 0.3, head.sample_generator)
    ckpt = _saved(head.state_dict())
    want = sample_classes(labels, valid, 0, 50, 0.3, head.sample_generator)

    for seeded in (None, 123):  # a head without a generator gets one; a differently seeded one is reset
        other = fk.ArcFace(D, 50)
        if seeded is not None:
            other.sample_generator = torch.Generator().manual_seed(seeded)
        other.load_state_dict(ckpt)
        assert torch.equal(sample_classes(labels, valid, 0, 50, 0.3, other.sample_generator), want)

    # a checkpoint without the extra state (another trainer's, an older one) loads strictly and leaves the
    # generator alone; an empty one (saved without a generator) too
    other = fk.ArcFace(D, 50)
    other.sample_generator = torch.Generator().manual_seed(5)
    before = other.sample_generator.get_state()
    other.load_state_dict({"weight": torch.zeros(50, D)})
    other.load_state_dict(fk.ArcFace(D, 50).state_dict())
    assert torch.equal(other.sample_generator.get_state(), before)
    with pytest.raises(ValueError, match="_extra_state"):
        other.load_state_dict({"weight": torch.zeros(50, D), "_extra_state": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="weight"):  # strict loading still reports what is really missing
        other.load_state_dict({"_extra_state": torch.zeros(0, dtype=torch.uint8)})


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@kit.needs_ext
def test_partial_fc_resume_is_bitwise(one_process_group):
    classes, steps = 61, _batches(5, seed=4)
    steps = [(x.float(), torch.randint(0, classes, (B,), generator=torch.Generator().manual_seed(i)))
             for i, (x, _) in enumerate(steps)]  # fmt: skip

    def make(seed):
        torch.manual_seed(0)
        head = fk.ArcFace(D, classes, s=16.0, backend="cpu", process_group=one_process_group, sample_rate=0.2,
                          sample_seed=seed)  # fmt: skip
        return head, torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)

    def run(head, opt, batches):
        losses = []
        for x, y in batches:
            loss = head(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    head, opt = make(seed=7)
    run(head, opt, steps[:2])
    ckpt = _saved({"head": head.state_dict(), "opt": opt.state_dict()})
    want = run(head, opt, steps[2:])

    resumed, opt = make(seed=8)  # another seed: only the checkpoint can make it draw the same classes
    resumed.load_state_dict(ckpt["head"])
    opt.load_state_dict(ckpt["opt"])
    assert torch.equal(run(resumed, opt, steps[2:]), want)
    assert torch.equal(resumed.weight, head.weight)

    # without the generator's state the resumed run samples other classes (the test can fail)
    resumed, opt = make(seed=8)
    resumed.load_state_dict({k: v for k, v in ckpt["head"].items() if k != "_extra_state"})
    opt.load_state_dict(ckpt["opt"])
    assert not torch.equal(run(resumed, opt, steps[2:]), want)


def test_factored_optimizer_state_is_swapped_not_transposed():
    """Adafactor keeps a row and a column statistic; converting (C, d) <-> (d, C) swaps them (issue 21, item 7):
    their run's state, converted, equals ours after the same steps, and the next steps stay equal."""
    g = torch.Generator().manual_seed(3)
    ours = torch.nn.Parameter(torch.randn(C, D, generator=g, dtype=torch.float64))
    theirs = torch.nn.Parameter(ours.detach().t().clone())
    opt_ours, opt_theirs = torch.optim.Adafactor([ours], lr=0.01), torch.optim.Adafactor([theirs], lr=0.01)
    grads = [torch.randn(C, D, generator=g, dtype=torch.float64) for _ in range(4)]
    for grad in grads[:2]:
        ours.grad, theirs.grad = grad.clone(), grad.t().clone()
        opt_ours.step()
        opt_theirs.step()
    converted = convert.transpose_optimizer_state(opt_theirs.state_dict(), [0])["state"][0]
    assert converted["row_var"].shape == (C, 1) and converted["col_var"].shape == (1, D)
    for key in ("row_var", "col_var"):
        torch.testing.assert_close(converted[key], opt_ours.state[ours][key], rtol=1e-12, atol=0)
    # a fresh optimizer of ours loads the converted state and continues as theirs
    resumed = torch.nn.Parameter(theirs.detach().t().clone())
    opt = torch.optim.Adafactor([resumed], lr=0.01)
    opt.load_state_dict(convert.transpose_optimizer_state(opt_theirs.state_dict(), [0]))
    for grad in grads[2:]:
        resumed.grad, theirs.grad = grad.clone(), grad.t().clone()
        opt.step()
        opt_theirs.step()
    torch.testing.assert_close(resumed.detach(), theirs.detach().t(), rtol=1e-12, atol=1e-15)
    # transformers' / fairseq's 1-D pair is swapped too; an unknown factored entry is refused, naming the key
    state = {"state": {0: {"exp_avg_sq_row": torch.ones(C), "exp_avg_sq_col": torch.zeros(D), "step": 3}},
             "param_groups": []}  # fmt: skip
    swapped = convert.transpose_optimizer_state(state, [0])["state"][0]
    assert swapped["exp_avg_sq_row"].shape == (D,) and bool((swapped["exp_avg_sq_col"] == 1).all())
    for entry, key in (({"row_var": torch.ones(C, 1)}, "row_var"), ({"v_row": torch.ones(C, 1)}, "v_row"),
                       ({"exp_avg": torch.ones(C, D), "v_col": torch.ones(D)}, "v_col")):  # fmt: skip
        with pytest.raises(ValueError, match=repr(key)):
            convert.transpose_optimizer_state({"state": {0: entry}, "param_groups": []}, [0])


def test_converters_strip_the_prefix_on_request():
    """A whole-model checkpoint's head loads into a standalone head with strip_prefix=True (strict)."""
    theirs = {"backbone.w": torch.zeros(3), "head.kernel": torch.randn(D, C), "head.t": torch.full((1,), 0.25)}
    head = fk.CurricularFace(D, C)
    head.load_state_dict(convert.from_curricularface(theirs, prefix="head.", strip_prefix=True), strict=True)
    assert torch.equal(head.weight, theirs["head.kernel"].t()) and head.t.item() == 0.25
    kept = convert.from_curricularface(theirs, prefix="head.")
    assert set(kept) == {"backbone.w", "head.weight", "head.t"}  # the default keeps every key
    ours = {"m.weight": torch.zeros(C, D), "m.batch_mean": torch.zeros(()), "m.batch_std": torch.ones(()),
            "x": torch.zeros(1)}  # fmt: skip
    out = convert.to_adaface(ours, prefix="m.", strip_prefix=True)
    assert set(out) == {"kernel", "batch_mean", "batch_std", "t"}
    assert "strip_prefix" in str(inspect.signature(convert.from_facexzoo))
    with pytest.raises(TypeError, match="strip_prefix"):
        convert.from_magface({"weight": torch.zeros(D, C)}, strip_prefix="yes")
