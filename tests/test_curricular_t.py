"""CurricularFace's t under gradient accumulation: ``update_t`` and ``frozen_t`` (default unchanged)."""

import kit
import pytest
import torch

import facekernels as fk

BACKENDS = kit.FLOAT64_BACKENDS
ALPHA = 0.1


def micro_batches(head, k=3, rows=(5, 4, 7)):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(rows[i], head.in_features, generator=g),
             torch.randint(0, head.num_classes, (rows[i],), generator=g)) for i in range(k)]  # fmt: skip


def mean_target_cosine(head, x, y):
    """The float64 mean of the target cosines of (x, y) under the head's weight."""
    x_hat = torch.nn.functional.normalize(x.double(), dim=1)
    w_hat = torch.nn.functional.normalize(head.weight.detach().double(), dim=1)
    return float((x_hat * w_hat[y]).sum(1).mean())


def ema(updates, means, t=0.0):
    """t after one update per entry of ``means`` (cycled), rounded to the float32 buffer each time."""
    for i in range(updates):
        t = float(torch.tensor(ALPHA * means[i % len(means)] + (1 - ALPHA) * t, dtype=torch.float32))
    return t


@pytest.mark.parametrize("backend", BACKENDS)
def test_once_per_step_under_accumulation(backend):
    head = fk.CurricularFace(6, 11, momentum=ALPHA, backend=backend)
    batches = micro_batches(head)
    mu = [mean_target_cosine(head, x, y) for x, y in batches]
    steps = 4
    for _ in range(steps):  # the weight does not move (no optimizer): the target cosines stay the same
        for i, (x, y) in enumerate(batches):
            with head.frozen_t(i > 0):
                loss = head(x, y) / len(batches)
                loss.backward()
            if i > 0:
                # every micro-batch of the step used the t of its first micro-batch
                with torch.no_grad():
                    assert torch.equal(loss, head.eval()(x, y) / len(batches))
                head.train()
    # one update per step, from the first micro-batch's mean: t_n = (1 - (1 - alpha)^n) mu_1 (in float32 steps)
    assert head.t.item() == pytest.approx(ema(steps, mu[:1]), abs=1e-7)
    assert head.t.item() == pytest.approx((1 - (1 - ALPHA) ** steps) * mu[0], rel=1e-5)
    assert head.update_t is True  # restored after each block


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_updates_on_every_training_forward(backend):
    head = fk.CurricularFace(6, 11, momentum=ALPHA, backend=backend)
    batches = micro_batches(head)
    mu = [mean_target_cosine(head, x, y) for x, y in batches]
    for _ in range(2):
        for x, y in batches:
            head(x, y)
    assert head.t.item() == pytest.approx(ema(2 * len(batches), mu), abs=1e-7)


def test_switch_and_context_manager():
    head = fk.CurricularFace(6, 11, momentum=ALPHA, backend="reference")
    x, y = micro_batches(head)[0]
    head.update_t = False
    head(x, y)
    assert head.t.item() == 0.0
    head.update_t = True
    with head.frozen_t(False):  # a false condition changes nothing
        head(x, y)
    t1 = head.t.item()
    assert t1 != 0.0
    with pytest.raises(RuntimeError, match="boom"), head.frozen_t():
        head(x, y)
        raise RuntimeError("boom")
    assert head.t.item() == t1 and head.update_t is True  # frozen inside, restored on the way out
    with head.frozen_t():
        with head.frozen_t(False):  # an inner block cannot unfreeze an outer one
            head(x, y)
        assert head.update_t is False
    assert head.t.item() == t1
    head.eval()
    head(x, y)  # eval mode never updates, whatever the switch
    assert head.t.item() == t1
    with pytest.raises(TypeError, match="update_t"):
        head.update_t = 1
    with pytest.raises(TypeError, match="frozen"), head.frozen_t("yes"):
        pass
