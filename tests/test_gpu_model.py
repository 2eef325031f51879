"""The step counter of facekernels/benchmark/sm90.py (what one training step asks of a GPU, counted on meta
tensors standing for CUDA ones) and the pieces of bench/gpu_model.py that could be wrong. No GPU, no timing."""

import pytest
import torch

from facekernels import _rowmath
from facekernels.benchmark import sm90
from facekernels.kernels import triton as tk


@torch.library.custom_op("fktest::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def _toy(a, b):
    """Known calls: 1 cuBLAS GEMM, 1 view, 1 allocation, 2 torch kernels, 1 Triton launch (5 runtime arguments,
    3 constexprs), 1 custom op dispatch whose body is 1 torch kernel, and 1 host sync (bool of a tensor)."""
    c = a @ b  # mm
    d = c.t()  # view
    e = torch.empty(3, 8, device="meta")  # allocation
    f = (d + e).sum()  # add, sum
    tk._launch(tk._inv_norm_kernel, (1,), a, e, 8, 4, 4, BLOCK_R=32, BLOCK_K=16, eps=1e-12)
    _twice(c)  # dispatch + mul
    return bool(f)


def test_counter_counts_a_toy_step_exactly():
    a, b = torch.empty(8, 4, device="meta"), torch.empty(4, 3, device="meta")
    with sm90.counting() as counter:
        assert _toy(a, b) is False  # the sync's stand-in
    got = counter.result
    assert [(c.kind, c.name) for c in got.calls] == [
        ("gemm", "aten.mm.default"), ("view", "aten.t.default"), ("alloc", "aten.empty.memory_format"),
        ("kernel", "aten.add.Tensor"), ("kernel", "aten.sum.default"), ("triton", "_inv_norm_kernel"),
        ("custom_op", "fktest::twice"), ("kernel", "aten.mul.Tensor"), ("sync", "aten._local_scalar_dense.default"),
    ]  # fmt: skip
    launch = got.calls[5]
    assert (launch.args, launch.constexprs, launch.launch[0]) == (5, 3, tk._inv_norm_kernel)
    assert got.calls[0].gemm == (1, 8, 3, 4, 4, 4)
    assert got.calls[3].bytes == 3 * 8 * 4 * 3 and got.calls[4].bytes == (3 * 8 + 1) * 4
    assert got.launches() == 5 and got.count("custom_op") == 1 and len(got.syncs) == 1
    assert tk.CAPTURED_LAUNCHES is None and not torch.empty(1, device="meta").is_cuda  # restored


@pytest.mark.parametrize("read", [lambda t: t.sum().item(), lambda t: bool(t.any()), lambda t: t.tolist(),
                                  lambda t: t.nonzero(), lambda t: t.cpu(), lambda t: int(t[0])])  # fmt: skip
def test_counter_sees_every_kind_of_host_sync(read):
    t = torch.empty(5, device="meta")
    with sm90.counting() as counter:
        read(t)
    assert len(counter.result.syncs) >= 1, counter.result.calls
    with pytest.raises(sm90.HostSyncError, match="host sync in the counted step"):
        with sm90.counting(on_sync="raise"):
            read(t)


def test_counter_rejects_a_bad_on_sync():
    with pytest.raises(ValueError, match="on_sync"):
        sm90.StepCounter(on_sync="ignore")


@pytest.fixture(scope="module")
def head_step():
    return sm90.count_step(1024, 1_000_000, 512, torch.bfloat16)


def test_head_step_counts_the_code_as_it_is(head_step):
    """CurricularFace, B = 1024, d = 512, C = 1M, bf16: every backward chunk makes one _grad_logits_kernel
    launch and its custom op dispatch, and at least its two GEMMs (dX and dW)."""
    chunk = tk.KERNELS.chunk_classes(1024, 1_000_000, torch.bfloat16)
    chunks = -(-1_000_000 // chunk)
    got = head_step
    assert got.by_name("triton", "backward")["_grad_logits_kernel"] == chunks
    assert got.by_name("triton", "forward")["_inv_norm_kernel"] == 2
    assert got.count("gemm", "backward") >= 2 * chunks
    assert got.launches() == got.launches("forward") + got.launches("backward")
    assert got.count("custom_op") <= chunks + 3


def test_head_step_sees_a_sync_added_to_the_step(head_step, monkeypatch):
    """A `.item()` added to the step's forward shows as one more sync, with the line that asked for it; with
    on_sync="raise" it raises there."""
    real = _rowmath.target_cosine

    def synced(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0].sum().item()
        return out

    monkeypatch.setattr("facekernels._algorithm.target_cosine", synced)
    got = sm90.count_step(256, 100_000, 512, torch.bfloat16)
    with pytest.raises(sm90.HostSyncError, match="host sync in the counted step"):
        sm90.count_step(256, 100_000, 512, torch.bfloat16, on_sync="raise")
    monkeypatch.undo()
    base = sm90.count_step(256, 100_000, 512, torch.bfloat16)
    assert len(got.syncs) == len(base.syncs) + 1
    added = [c for c in got.syncs if c.where.startswith("_algorithm.py")]
    assert len(added) == 1 and "margin_cross_entropy" in added[0].where, got.syncs
