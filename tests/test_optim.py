"""The optimizers fused into the heads' backward (facekernels/optim.py) against torch's own SGD / AdamW
(single-tensor form, foreach=False) on the unfused head's gradient: the independent oracle.

Several steps, fresh random inputs every step, C = 203, d = 37, B = 29 (no multiple of any block), the update
chunks made small (optim.UPDATE_CHUNK_BYTES) so that every backward has many chunks and a ragged last one. The cpu
backend runs float64: rel <= 1e-12 (and bit for bit when the kernel's class tiles coincide with the unfused
call's). The triton backend takes no float64 (TypeError): it runs float32 under the interpreter, against the
unfused float32 head with torch's optimizer (tight) and, by the error-ratio rule, against the float64 reference
head with torch's optimizer.
"""

import datetime
import os

import kit
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import facekernels as fk
from facekernels import optim as fo
from facekernels.kernels import cpu as cpu_kernels

pytestmark = kit.needs_ext

B, C, D = 29, 203, 37
STEPS = 5
TRITON_DEVICE = kit.TRITON_DEVICE
OPTIMIZERS = {
    "sgd_momentum": ("SGD", dict(lr=0.5, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": ("SGD", dict(lr=0.5, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "sgd_dampening": ("SGD", dict(lr=0.5, momentum=0.9, weight_decay=5e-4, dampening=0.3)),
    "sgd_plain": ("SGD", dict(lr=0.5)),
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=5e-2)),
    "adamw_betas": ("AdamW", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6)),
}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # update chunks of 47 classes at d = 37 float64: 5 chunks over 203 classes, the last one ragged
    monkeypatch.setattr(fo, "UPDATE_CHUNK_BYTES", D * 8 * 47)


def _make(backend="cpu", dtype=torch.float64, head_cls=fk.ArcFace, device="cpu", **kwargs):
    return head_cls(D, C, backend=backend, **kwargs).to(device, dtype)


def _pair(kind, backend="cpu", dtype=torch.float64, oracle_backend=None, oracle_dtype=None, device="cpu",
          **head_kwargs):  # fmt: skip
    """(fused head, its optimizer, unfused head, torch's optimizer), the heads with the same weight."""
    name, options = OPTIMIZERS[kind]
    fused = _make(backend, dtype, device=device, **head_kwargs)
    fused.weight.data.normal_(0, 0.05)
    plain = _make(oracle_backend or backend, oracle_dtype or dtype, device=device, **head_kwargs)
    plain.weight.data.copy_(fused.weight.data)
    fused_opt = getattr(fo, name)(fused, **options)
    torch_opt = getattr(torch.optim, name)(plain.parameters(), foreach=False, **options)
    return fused, fused_opt, plain, torch_opt


def _batch(dtype, generator=None, batch=B):
    x = torch.randn(batch, D, dtype=torch.float64, generator=generator)
    y = torch.randint(0, C, (batch,), generator=generator)
    return x.to(dtype), y


def _train(head, opt, batches, fused, dtype=None):
    device = head.weight.device
    for x, y in batches:
        head(x.to(device, dtype or x.dtype), y.to(device)).backward()
        if fused:
            assert head.weight.grad is None  # the (C, d) gradient never exists
        opt.step()
        opt.zero_grad()


def _rel(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-300)).item()


def _assert_same_state(fused, fused_opt, plain, torch_opt, rel):
    assert _rel(fused.weight.detach(), plain.weight.detach()) <= rel
    got, want = fused_opt.state[fused.weight], torch_opt.state[plain.weight]
    assert set(got) == set(want), f"state keys {sorted(got)} != torch's {sorted(want)}"
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].device == value.device, key
        if key == "step":
            assert float(got[key]) == float(value)
        else:
            assert _rel(got[key], value) <= rel, key


# ----------------------------------------------------------------------------------------------- cpu, float64


@pytest.fixture(params=[True, False], ids=["host_skip", "where_commit"])
def commit_path(request, monkeypatch):
    """Both ways a chunk's update is committed: in place after a host read of its finite flag (CPU tensors),
    and the GPU's no-sync path (copies, torch.where), run here on CPU tensors."""
    monkeypatch.setattr(fo, "HOST_SKIP_ON_CPU", request.param)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_cpu_float64_matches_torch(kind, commit_path):
    fused, fused_opt, plain, torch_opt = _pair(kind)
    batches = [_batch(torch.float64) for _ in range(STEPS)]
    _train(fused, fused_opt, batches, True)
    _train(plain, torch_opt, batches, False)
    _assert_same_state(fused, fused_opt, plain, torch_opt, 1e-12)
    assert not bool(fused_opt.last_found_inf)


@pytest.mark.parametrize("kind", ["sgd_nesterov", "sgd_dampening", "adamw"])
def test_cpu_float64_bit_for_bit_when_tiles_coincide(kind, monkeypatch):
    # class tiles of 16 and update chunks of 48 classes: every class sits in the same kernel tile as in the
    # unfused call, so the gradients agree to the BLAS's rounding of the same tile products (bit for bit on one
    # machine; another GEMM path, e.g. ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE, differs by a few ulps),
    # and torch's update formulas must keep them there: 10x tighter than the general float64 test
    monkeypatch.setattr(cpu_kernels, "CLASS_TILE", 16)
    monkeypatch.setattr(fo, "UPDATE_CHUNK_BYTES", D * 8 * 48)
    fused, fused_opt, plain, torch_opt = _pair(kind)
    batches = [_batch(torch.float64) for _ in range(STEPS)]
    _train(fused, fused_opt, batches, True)
    _train(plain, torch_opt, batches, False)
    _assert_same_state(fused, fused_opt, plain, torch_opt, 1e-13)


def test_subcenters_and_ignored_rows(commit_path):
    # k = 3 rows per class (chunks of whole classes), a third of the rows ignored
    fused, fused_opt, plain, torch_opt = _pair("sgd_nesterov", head_cls=fk.SubCenterArcFace, k=3)
    batches = []
    for _ in range(3):
        x, y = _batch(torch.float64)
        y[torch.rand(B) < 0.3] = -100
        batches.append((x, y))
    _train(fused, fused_opt, batches, True)
    _train(plain, torch_opt, batches, False)
    _assert_same_state(fused, fused_opt, plain, torch_opt, 1e-12)


# ----------------------------------------------------------------------------------------- triton, float32


@pytest.mark.parametrize("kind", ["sgd_momentum", "sgd_nesterov", "adamw"])
def test_triton_float32_matches_torch(kind):
    with pytest.raises(TypeError, match="float64"):
        x, y = _batch(torch.float64)
        _make("triton", device=TRITON_DEVICE)(x.to(TRITON_DEVICE), y.to(TRITON_DEVICE))  # why this test runs float32
    fused, fused_opt, plain, torch_opt = _pair(kind, backend="triton", dtype=torch.float32, device=TRITON_DEVICE)
    _, _, exact, exact_opt = _pair(kind, oracle_backend="reference", oracle_dtype=torch.float64,
                                   device=TRITON_DEVICE)  # fmt: skip
    exact.weight.data.copy_(fused.weight.data.double())
    batches = [_batch(torch.float32) for _ in range(STEPS)]
    _train(fused, fused_opt, batches, True)
    _train(plain, torch_opt, batches, False)
    _train(exact, exact_opt, batches, False, dtype=torch.float64)
    # the same float32 chunks, torch's update on them: rounding apart (the gradients' relative rounding is the
    # logits' s u, kit.logit_floor: 2.7e-6 was seen against 2e-6 under another GEMM path)
    _assert_same_state(fused, fused_opt, plain, torch_opt, kit.logit_floor(fused.params.s, torch.float32))
    kit.assert_error_ratio(fused.weight, plain.weight, exact.weight, k=4.0, floor=1e-6, what="weight")
    for key in torch_opt.state[plain.weight]:
        if key != "step":
            kit.assert_error_ratio(fused_opt.state[fused.weight][key], torch_opt.state[plain.weight][key],
                                   exact_opt.state[exact.weight][key], k=4.0, floor=1e-6, what=key)  # fmt: skip


# ------------------------------------------------------------------------------- schedules, lr, checkpoints


def test_lr_scheduler_and_tensor_lr():
    fused, fused_opt, plain, torch_opt = _pair("sgd_momentum")
    fused_sched = torch.optim.lr_scheduler.ExponentialLR(fused_opt, gamma=0.5)
    torch_sched = torch.optim.lr_scheduler.ExponentialLR(torch_opt, gamma=0.5)
    for _ in range(STEPS):
        batch = [_batch(torch.float64)]
        _train(fused, fused_opt, batch, True)
        _train(plain, torch_opt, batch, False)
        fused_sched.step()
        torch_sched.step()
    assert fused_opt.param_groups[0]["lr"] == torch_opt.param_groups[0]["lr"] == 0.5 * 0.5**STEPS
    _assert_same_state(fused, fused_opt, plain, torch_opt, 1e-12)
    # a tensor lr, changed in place between steps: read at each backward (no sync, no rebuild)
    for kind in ("sgd_nesterov", "adamw"):
        fused, fused_opt, plain, torch_opt = _pair(kind)
        lr = torch.tensor(0.1, dtype=torch.float64)
        fused_opt.param_groups[0]["lr"] = lr
        for step in range(3):
            lr.fill_(0.1 / (step + 1))
            torch_opt.param_groups[0]["lr"] = 0.1 / (step + 1)
            batch = [_batch(torch.float64)]
            _train(fused, fused_opt, batch, True)
            _train(plain, torch_opt, batch, False)
        _assert_same_state(fused, fused_opt, plain, torch_opt, 1e-12)


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
def test_state_dict_round_trip(kind):
    # fused for 2 steps -> torch's optimizer for 2 -> fused again for 1, against torch's throughout
    fused, fused_opt, plain, torch_opt = _pair(kind)
    batches = [_batch(torch.float64) for _ in range(5)]
    _train(fused, fused_opt, batches[:2], True)
    _train(plain, torch_opt, batches[:2], False)
    name, options = OPTIMIZERS[kind]
    middle = _make()
    middle.load_state_dict(fused.state_dict())
    middle_opt = getattr(torch.optim, name)(middle.parameters(), foreach=False, **options)
    middle_opt.load_state_dict(fused_opt.state_dict())
    _train(middle, middle_opt, batches[2:4], False)
    _train(plain, torch_opt, batches[2:4], False)
    again = _make()
    again.load_state_dict(middle.state_dict())
    again_opt = getattr(fo, name)(again, **{**options, "lr": 123.0})  # the checkpoint's lr wins
    again_opt.load_state_dict(middle_opt.state_dict())
    _train(again, again_opt, batches[4:], True)
    _train(plain, torch_opt, batches[4:], False)
    _assert_same_state(again, again_opt, plain, torch_opt, 1e-12)


# ------------------------------------------------------------------------------------------ errors, frozen


def test_one_backward_per_step():
    head = _make()
    opt = fo.SGD(head, lr=0.1, momentum=0.9)
    x, y = _batch(torch.float64)
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    head(x, y).backward()
    before = head.weight.detach().clone()
    with pytest.raises(RuntimeError, match="second backward .* before SGD.step"):
        head(x, y).backward()
    assert torch.equal(head.weight.detach(), before)  # the second backward updated nothing
    opt.step()
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    head(x, y).backward()  # the next step's backward is fine
    opt.step()


def test_argument_errors():
    head = _make()
    with pytest.raises(TypeError, match="head must be a facekernels head"):
        fo.SGD(torch.nn.Linear(3, 4), lr=0.1)
    with pytest.raises(ValueError, match="backend is 'reference'"):
        fo.SGD(_make("reference"), lr=0.1)
    with pytest.raises(ValueError, match="nesterov=True requires"):
        fo.SGD(head, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr must be"):
        fo.SGD(head, lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        fo.AdamW(head, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="master_weights=True is for bfloat16"):
        fo.AdamW(head, master_weights=True)
    with pytest.raises(TypeError, match="grad_scaler must be"):
        fo.SGD(head, lr=0.1, grad_scaler=object())
    opt = fo.SGD(head, lr=0.1)
    with pytest.raises(ValueError, match="already has a fused optimizer"):
        fo.AdamW(head)
    opt.detach()
    fo.AdamW(head)  # attaches after detach()
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)


def test_frozen_and_eval_update_nothing():
    head = _make()
    opt = fo.SGD(head, lr=0.5, momentum=0.9, weight_decay=1e-2)
    before = head.weight.detach().clone()
    x, y = _batch(torch.float64)
    x.requires_grad_()
    head.weight.requires_grad_(False)  # frozen: no update, no state; the embeddings still get a gradient
    head(x, y).backward()
    assert x.grad is not None and torch.equal(head.weight, before) and len(opt.state) == 0
    opt.step()
    head.weight.requires_grad_(True)
    head.eval()  # eval: an ordinary head, its backward fills weight.grad and updates nothing
    head(x, y).backward()
    assert torch.equal(head.weight.detach(), before) and head.weight.grad is not None
    with pytest.raises(RuntimeError, match="without a backward"):
        opt.step()
    head.train()
    head.weight.grad = None
    head(x, y).backward()
    assert not torch.equal(head.weight.detach(), before)


# ------------------------------------------------------------------------------- non-finite, GradScaler


def test_nan_loss_leaves_weights_and_state_untouched(commit_path):
    for kind in ("sgd_momentum", "adamw"):
        fused, fused_opt, plain, torch_opt = _pair(kind)
        batch = _batch(torch.float64)
        _train(fused, fused_opt, [batch], True)
        weight = fused.weight.detach().clone()
        state = {k: v.clone() for k, v in fused_opt.state[fused.weight].items()}
        x, y = _batch(torch.float64)
        x[3, 5] = float("nan")
        fused(x, y).backward()
        fused_opt.step()
        assert bool(fused_opt.last_found_inf)
        assert torch.equal(fused.weight.detach(), weight)
        for key, value in state.items():
            if key != "step":  # AdamW's step count advances (module docstring)
                assert torch.equal(fused_opt.state[fused.weight][key], value), key


def test_grad_scaler_unscales_and_skips_non_finite_chunks(commit_path):
    head = _make(dtype=torch.float32)
    plain = _make(dtype=torch.float32)
    plain.weight.data.copy_(head.weight.data)
    scaler, plain_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16), torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = fo.SGD(head, lr=0.5, momentum=0.9, grad_scaler=scaler)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9, foreach=False)
    for _ in range(3):
        x, y = _batch(torch.float32)
        scaler.scale(head(x, y)).backward()
        scaler.step(opt)
        scaler.update()
        plain_scaler.scale(plain(x, y)).backward()
        plain_scaler.step(plain_opt)
        plain_scaler.update()
        plain_opt.zero_grad()
    assert _rel(head.weight.detach(), plain.weight.detach()) < 1e-5
    assert scaler.get_scale() == plain_scaler.get_scale()
    # a scale that overflows the gradient of the classes with large probabilities, not of the others: those
    # chunks are skipped (rows and momentum as they were), the rest updated, and the scaler backs off
    scaler.update(2.0**126)
    weight = head.weight.detach().clone()
    buf = opt.state[head.weight]["momentum_buffer"].clone()
    x, y = _batch(torch.float32)
    scaler.scale(head(x, y)).backward()
    scaler.step(opt)
    scaler.update()
    assert bool(opt.last_found_inf) and scaler.get_scale() == 2.0**125
    chunk = fo.UPDATE_CHUNK_BYTES // (D * 4)
    kept = [torch.equal(head.weight[c : c + chunk], weight[c : c + chunk]) for c in range(0, C, chunk)]
    moved = [not torch.equal(head.weight[c : c + chunk], weight[c : c + chunk]) for c in range(0, C, chunk)]
    assert any(kept) and any(moved)
    for c in range(0, C, chunk):
        if kept[c // chunk]:
            assert torch.equal(opt.state[head.weight]["momentum_buffer"][c : c + chunk], buf[c : c + chunk])
    # a scaler that the optimizer does not know about: refused (loudly; its update already ran)
    other = fo.SGD(_make(dtype=torch.float32), lr=0.1)
    other_scaler = torch.amp.GradScaler("cpu")
    other_scaler.scale(other._head(*_batch(torch.float32))).backward()
    with pytest.raises(RuntimeError, match="built without grad_scaler"):
        other_scaler.step(other)


def test_bfloat16_master_weights():
    # the float32 master copy and float32 momentum, against torch's SGD on a float32 copy fed the bf16 gradient
    head = _make(dtype=torch.bfloat16)
    plain = _make(dtype=torch.bfloat16)
    plain.weight.data.copy_(head.weight.data)
    opt = fo.SGD(head, lr=0.5, momentum=0.9, weight_decay=5e-4, master_weights=True)
    master = plain.weight.detach().float().requires_grad_()
    torch_opt = torch.optim.SGD([master], lr=0.5, momentum=0.9, weight_decay=5e-4, foreach=False)
    for _ in range(3):
        x, y = _batch(torch.bfloat16)
        head(x, y).backward()
        opt.step()
        plain(x, y).backward()
        master.grad = plain.weight.grad.float()
        plain.weight.grad = None
        torch_opt.step()
        plain.weight.data.copy_(master.detach())
    state = opt.state[head.weight]
    assert state["master_weight"].dtype == state["momentum_buffer"].dtype == torch.float32
    assert _rel(state["master_weight"], master.detach()) < 1e-5
    assert torch.equal(head.weight.detach(), state["master_weight"].to(torch.bfloat16))
    # a checkpoint keeps the float32 state float32 (torch would cast it to the weight's dtype)
    again = _make(dtype=torch.bfloat16)
    again_opt = fo.SGD(again, lr=0.5, momentum=0.9, master_weights=True)
    again_opt.load_state_dict(opt.state_dict())
    assert torch.equal(again_opt.state[again.weight]["master_weight"], state["master_weight"])


# ----------------------------------------------------------------------------------- sharded, 2 gloo ranks

WORLD = 2
SHARDED = {
    # name: (backend, dtype, kind, sample_rate)
    "cpu_sgd": ("cpu", torch.float64, "sgd_nesterov", 1.0),
    "cpu_adamw": ("cpu", torch.float64, "adamw", 1.0),
    "cpu_sgd_partial_fc": ("cpu", torch.float64, "sgd_momentum", 0.5),
    "cpu_adamw_partial_fc": ("cpu", torch.float64, "adamw", 0.5),
    "cpu_sgd_partial_fc_where": ("cpu", torch.float64, "sgd_nesterov", 0.5),  # the GPU's commit path
    "triton_sgd": ("triton", torch.float32, "sgd_momentum", 1.0),
}


def _global_batches(dtype, steps):
    # 13 rows per rank (every rank passes the same batch size), rank 0's first
    g = torch.Generator().manual_seed(99)
    return [_batch(dtype, g, batch=13 * WORLD) for _ in range(steps)]


def _sharded_worker(rank, store, out_dir, chunk_bytes):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        torch.set_num_threads(1)
        fo.UPDATE_CHUNK_BYTES = chunk_bytes
        results = {}
        for name, (backend, dtype, kind, rate) in SHARDED.items():
            steps = 2 if backend == "triton" else STEPS
            fo.HOST_SKIP_ON_CPU = not name.endswith("_where")
            heads = []
            for _ in range(2):
                device = TRITON_DEVICE if backend == "triton" else "cpu"  # gloo takes CUDA tensors too
                head = fk.ArcFace(D, C, backend=backend, process_group=dist.group.WORLD, sample_rate=rate,
                                  sample_seed=7 + rank).to(device, dtype)  # fmt: skip
                w = torch.randn(C, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.05
                head.weight.data.copy_(w[head.class_start : head.class_start + head.num_local])
                heads.append(head)
            opt_name, options = OPTIMIZERS[kind]
            fused_opt = getattr(fo, opt_name)(heads[0], **options)
            torch_opt = getattr(torch.optim, opt_name)(heads[1].parameters(), foreach=False, **options)
            local = [(x[rank * 13 : (rank + 1) * 13], y[rank * 13 : (rank + 1) * 13])
                     for x, y in _global_batches(dtype, steps)]  # fmt: skip
            _train(heads[0], fused_opt, local, True)
            _train(heads[1], torch_opt, local, False)
            results[name] = dict(
                start=heads[0].class_start, fused=heads[0].weight.detach(), plain=heads[1].weight.detach(),
                fused_state=dict(fused_opt.state[heads[0].weight]), torch_state=dict(torch_opt.state[heads[1].weight]),
            )  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim_sharded")
    mp.spawn(_sharded_worker, args=(str(out / "store"), str(out), D * 8 * 23), nprocs=WORLD, join=True)
    return [torch.load(out / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(SHARDED))
@pytest.mark.slow
def test_sharded_two_ranks(name, sharded_results):
    backend, dtype, kind, rate = SHARDED[name]
    # float32 (triton): the logits' s u (kit.logit_floor, as in the single-process test): 2e-6 held by luck
    # (2.2e-6 seen after issue 20's backward rework; chunking alone moves dW by 1.2e-6 before and after it)
    rel = 1e-12 if dtype == torch.float64 else kit.logit_floor(fk.ArcFace(D, C).params.s, torch.float32)
    for rank, res in enumerate(sharded_results):
        r = res[name]
        assert _rel(r["fused"], r["plain"]) <= rel, f"rank {rank}"
        assert set(r["fused_state"]) == set(r["torch_state"])
        for key, value in r["torch_state"].items():
            if key != "step":
                assert _rel(r["fused_state"][key], value) <= rel, (rank, key)
    if rate == 1.0 and dtype == torch.float64:
        # and the shards together are torch's optimizer on the single-process head over the global batch
        opt_name, options = OPTIMIZERS[kind]
        head = _make()
        head.weight.data.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.05)
        opt = getattr(torch.optim, opt_name)(head.parameters(), foreach=False, **options)
        _train(head, opt, _global_batches(torch.float64, STEPS), False)
        whole = torch.cat([res[name]["fused"] for res in sharded_results])
        assert _rel(whole, head.weight.detach()) <= 1e-12
