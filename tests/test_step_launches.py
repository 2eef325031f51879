"""What one training step of the GPU head asks of the host and the GPU, counted without a GPU
(facekernels/benchmark/sm90.py's ``count_step``: meta tensors standing for CUDA ones): a ratchet on the GPU
launches (Triton + cuBLAS + torch kernels) of forward + backward, no host sync, no custom-op dispatch per backward
chunk. Issue 20's goal is <= 300 launches at B = 1024 and <= 150 at B = 256 (CurricularFace, d = 512, C = 1M,
bfloat16); the limits below are what the code reaches now: lower them as launches go, never raise them."""

import pytest
import torch

from facekernels.benchmark import sm90
from facekernels.kernels import triton as tk

# (batch, launches at most): counted at this commit (issue 20 before it: 1244 and 416, with one host sync; 639
# and 491 with L2-sized backward chunks; 179 and 171 before the forward's partials went to one buffer and one
# combine kernel and the target cosine lost its sub-center ops without sub-centers; 155 and 147 before the
# target logit stopped computing d phi / d m2, m3 for heads without per-row margins; 146 and 138 before the
# forward's per-row pre-pass went into _target_rows_kernel and _update_t_kernel)
RATCHET = {1024: 88, 256: 80}


@pytest.fixture(scope="module", params=sorted(RATCHET))
def step(request):
    batch = request.param
    return batch, sm90.count_step(batch, 1_000_000, 512, torch.bfloat16, head="CurricularFace")


def test_launches_do_not_grow(step):
    batch, got = step
    summary = got.summary()
    assert got.launches() <= RATCHET[batch], (
        f"B={batch}: {got.launches()} GPU launches per forward + backward, the ratchet is {RATCHET[batch]}: "
        f"{summary['launches_by_phase']}, GEMMs {summary['gemm_ops']}, Triton {summary['triton_kernels']}, "
        f"torch kernels {summary['torch_kernels']}"
    )


def test_no_host_sync_and_no_dispatch_per_chunk(step):
    batch, got = step
    chunk = tk.KERNELS.chunk_classes(batch, 1_000_000, torch.bfloat16)
    chunks = -(-1_000_000 // chunk)
    assert not got.syncs, got.summary()["sync_sites"]  # each with the facekernels line that read the device
    # the custom ops left are the forward's (W's inverse norms, the pre-pass, the log-sum-exp): none per chunk
    assert got.count("custom_op", "backward") == 0 and got.count("custom_op") <= 3, got.by_name("custom_op")
    # per chunk: the kernel that recomputes the logits and writes D, A += D W (addmm), D^T X, the fused
    # correction: four launches
    assert got.by_name("triton", "backward")["_grad_logits_kernel"] == chunks
    assert got.launches("backward") <= 4 * chunks + 20, got.by_name("kernel", "backward")


def test_a_sync_added_to_the_backward_fails(monkeypatch):
    """A host read added to the backward's chunk loop (here the kernel's launcher) makes the count raise: the
    tests above fail on it."""
    real = tk.grad_chunk

    def synced(*args, **kwargs):
        d, correction = real(*args, **kwargs)
        bool(correction.sum())
        return d, correction

    monkeypatch.setattr(tk, "grad_chunk", synced)
    with pytest.raises(sm90.HostSyncError, match="host sync in the counted step"):
        sm90.count_step(256, 100_000, 512, torch.bfloat16, head="CurricularFace", on_sync="raise")


def test_fused_sgd_keeps_the_backward_chunks():
    """On a GPU the fused optimizer (issue 23) updates each chunk the Triton backward makes: its CPU bound of 4 MiB
    of weight rows would split every chunk in four, and each split pays the update's launches again."""
    shape = (256, 100_000, 512, torch.bfloat16)
    plain = sm90.count_step(*shape, weight_dtype=torch.float32)
    fused = sm90.count_step(*shape, optimizer="sgd", weight_dtype=torch.float32)
    kernels = {name for name in plain.summary()["triton_kernels"] if "grad_logits" in name}
    assert kernels, plain.summary()["triton_kernels"]
    for name in kernels:
        assert fused.summary()["triton_kernels"][name] == plain.summary()["triton_kernels"][name], name
