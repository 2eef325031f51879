"""Ranks of a class-sharded head that are set up differently get the same clear error on every rank, before any
other collective (facekernels/sharded.py, fingerprint): a different s or num_classes gave each rank its own
loss or left a class on no rank, ElasticArcFace with one rank in eval() hung in the margins' broadcast, and a
rank whose embeddings need no gradient left the others waiting in the backward's all-reduce.

One spawned gloo group per world size runs every case (process start-up is the cost). The group has a 60 s
timeout and the test joins it under a deadline, so a case that hangs fails instead of blocking the suite."""

import datetime
import os
import time

import kit
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import facekernels as fk

pytestmark = [kit.needs_ext,
              pytest.mark.slow]  # gloo process groups of 2 and 4 processes per test

D, B_LOCAL = 6, 4
GROUP_TIMEOUT_S = 60
JOIN_DEADLINE_S = 240


def _arcface(**kw):
    return fk.ArcFace(D, kw.pop("num_classes", 13), **kw)


# case -> (make the head of the odd rank out, make everyone else's, the field the error names); the odd rank
# is the last one. Each head is built with process_group=WORLD by the worker.
CASES = {
    "s": (lambda **g: _arcface(s=32.0, **g), lambda **g: _arcface(s=64.0, **g), "s: 64.0, "),
    "num_classes": (lambda **g: _arcface(num_classes=13, **g), lambda **g: _arcface(num_classes=11, **g),
                    "num_classes: 11, "),  # fmt: skip
    "reduction": (lambda **g: _arcface(reduction="sum", **g), lambda **g: _arcface(**g), "reduction: 'mean', "),
    "m": (lambda **g: _arcface(m=0.4, **g), lambda **g: _arcface(m=0.5, **g), "m: 0.5, "),
    "k": (lambda **g: fk.SubCenterArcFace(D, 13, k=2, **g), lambda **g: fk.SubCenterArcFace(D, 13, k=3, **g),
          "k: 3, "),  # fmt: skip
    "head": (lambda **g: fk.CosFace(D, 13, **g), lambda **g: _arcface(**g), "head: 'ArcFace', "),
    "sample_rate": (lambda **g: _arcface(sample_rate=0.5, **g), lambda **g: _arcface(**g), "sample_rate: 1.0, "),
    # eval() on the odd rank (set by the worker): ElasticFace's training ranks used to wait in the broadcast of
    # their draws forever; AdaFace's buffers moved on the training ranks only
    "elastic_eval": (lambda **g: fk.ElasticArcFace(D, 13, **g), lambda **g: fk.ElasticArcFace(D, 13, **g),
                     "training: True, "),  # fmt: skip
    "adaface_eval": (lambda **g: fk.AdaFace(D, 13, **g), lambda **g: fk.AdaFace(D, 13, **g), "training: True, "),
    # the odd rank's embeddings do not require grad (set by the worker)
    "no_grad_embeddings": (lambda **g: _arcface(**g), lambda **g: _arcface(**g),
                           "embeddings.requires_grad: True, "),  # fmt: skip
}


def _worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))  # fmt: skip
    try:
        torch.set_num_threads(1)
        group = dist.group.WORLD
        odd = rank == world - 1
        g = torch.Generator().manual_seed(rank)
        results = {}
        for name, (make_odd, make, _) in CASES.items():
            head = (make_odd if odd else make)(backend="cpu", process_group=group)
            if name.endswith("_eval") and odd:
                head.eval()
            x = torch.randn(B_LOCAL, D, generator=g).requires_grad_(not (name == "no_grad_embeddings" and odd))
            y = torch.randint(0, 11, (B_LOCAL,), generator=g)
            try:
                head(x, y).backward()
                results[name] = None
            except ValueError as err:
                results[name] = str(err)
        # ranks that agree still train, and agree on the loss
        head = _arcface(backend="cpu", process_group=group)
        loss = head(torch.randn(B_LOCAL, D, generator=g, requires_grad=True), torch.randint(0, 13, (B_LOCAL,)))
        loss.backward()
        results["agreeing_loss"] = loss.detach()
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group_results(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"agreement{world}")
    context = mp.spawn(_worker, args=(world, str(out / "store"), str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + JOIN_DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank group did not finish within {JOIN_DEADLINE_S} s (a rank hung)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return world, [torch.load(out / f"{r}.pt") for r in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_set_up_differently_all_raise_the_same_error_naming_the_field(group_results, case):
    world, results = group_results
    messages = [r[case] for r in results]
    assert all(m is not None for m in messages), f"{case}: no error on ranks {[i for i, m in enumerate(messages)]}"
    assert len(set(messages)) == 1, f"{case}: ranks raised different errors: {messages}"
    field = CASES[case][2]
    assert field in messages[0] and "must set up its head alike" in messages[0], messages[0]


def test_ranks_that_agree_train_and_share_the_loss(group_results):
    world, results = group_results
    losses = [r["agreeing_loss"] for r in results]
    assert all(torch.isfinite(loss) and torch.equal(loss, losses[0]) for loss in losses)
