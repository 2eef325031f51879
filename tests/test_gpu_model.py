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
    """CurricularFace, B = 1024, d = 512, C = 1M, bf16: every backward chunk makes two Triton launches (today
    _grad_logits_kernel and _dw_correction_kernel), at most one custom op dispatch, and at least its two GEMMs
    (dX and dW)."""
    chunk = tk.KERNELS.chunk_classes(1024, 1_000_000, torch.bfloat16)
    chunks = -(-1_000_000 // chunk)
    got = head_step
    assert got.count("triton", "backward") == 2 * chunks  # D, and the dW correction
    assert got.count("triton", "forward") >= 1
    assert got.count("gemm", "backward") >= 2 * chunks
    assert got.launches() == got.launches("forward") + got.launches("backward")
    assert got.count("custom_op") <= chunks + 3


def test_head_step_sees_a_sync_added_to_the_step(head_step, monkeypatch):
    """A `.item()` added to the step's forward shows as one more sync, with the line that asked for it; with
    on_sync="raise" it raises there."""
    real = _rowmath.reduce_row_losses

    def synced(*args, **kwargs):
        out = real(*args, **kwargs)
        out.sum().item()
        return out

    monkeypatch.setattr("facekernels._algorithm.reduce_row_losses", synced)
    got = sm90.count_step(256, 100_000, 512, torch.bfloat16)
    with pytest.raises(sm90.HostSyncError, match="host sync in the counted step"):
        sm90.count_step(256, 100_000, 512, torch.bfloat16, on_sync="raise")
    monkeypatch.undo()
    base = sm90.count_step(256, 100_000, 512, torch.bfloat16)
    assert len(got.syncs) == len(base.syncs) + 1
    added = [c for c in got.syncs if c.where.startswith("_algorithm.py")]
    assert len(added) == 1 and "fused_head_loss" in added[0].where, got.syncs


# ---- bench/gpu_model.py: the pieces that could be wrong ---------------------------------------------------

def _model():
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_model.py")
    spec = importlib.util.spec_from_file_location("gpu_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


M = _model()

# a loop of 10 trips (0x10 .. 0x50) between a prologue MOV and the EXIT; a NOP and the trailing self-branch
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FFMA R2, R3, R4, R5 ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, RZ, PT ;
        /*0030*/                   MUFU.EX2 R6, R2 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R88, gdesc[UR12], R88 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
        /*0080*/                   NOP;
"""


def test_issue_cycles_of_a_known_snippet():
    got = M.issue_cycles(SASS, lambda depth: 10)
    assert got.loops == [("0x10", "0x50", 1)]
    assert got.instructions == 1 + 5 * 10 + 1  # MOV, the loop's 5 x 10, EXIT
    # pipes per warp: MUFU 8 cycles x 10 = 80 beats the issue slot (52) and the ALU (MOV 2 + ISETP 2 x 10)
    assert got.pipes["xu"] == 80 and got.pipes["alu"] == 22 and got.pipes["fma"] == 10
    assert got.cycles == 80
    assert got.epilogue_cycles == 2  # outside the loop: MOV (half rate) and EXIT
    assert got.hgmma_flops == 10 * 2 * 64 * 128 * 16


def test_issue_cycles_counts_half_rate_pipes():
    # 40 compares and selects in a row: 80 cycles of the ALU, not 40 issue slots
    sass = "".join(f"/*{16 * i:04x}*/ ISETP.GE.AND P0, PT, R2, RZ, PT ;\n" for i in range(40))
    assert M.issue_cycles(sass, lambda depth: 1).cycles == 80


def test_nested_loops_multiply_their_trips():
    sass = """
        /*0000*/ FFMA R2, R3, R4, R5 ;
        /*0010*/ FFMA R2, R3, R4, R5 ;
        /*0020*/ @P0 BRA 0x10 ;
        /*0030*/ FFMA R2, R3, R4, R5 ;
        /*0040*/ @P1 BRA 0x0 ;
        /*0050*/ EXIT ;
    """
    got = M.issue_cycles(sass, lambda depth: {1: 3, 2: 5}[depth])
    # outer body: FFMA@0, FFMA@30, BRA@40 (3 x 3); inner: FFMA@10, BRA@20 (3 x 5 x 2); EXIT once
    assert got.instructions == 9 + 30 + 1
    assert got.epilogue_cycles == 10


def test_cublas_rate_reads_the_cited_points():
    for flops, rate in M.CUBLAS_POINTS:
        assert M.cublas_rate(flops) == pytest.approx(rate)
    rates = [M.cublas_rate(2 * n**3) for n in (512, 1024, 1536, 2048, 4096, 8192, 16384)]
    assert rates == sorted(rates)
    assert M.cublas_rate(2 * 2048**3, "tf32") == pytest.approx(677e12 / 2)


def test_gemm_with_few_output_tiles_splits_k():
    # dX = D @ W_chunk at B = 1024, d = 512, K = 8192: 8 x 2 output tiles on 132 SMs
    _, bound, l2 = M.gemm_time((1, 1024, 512, 8192, 2, 4), 0.0, 0.0)
    assert "split-K" in bound and l2 > 0
    _, bound, _ = M.gemm_time((1, 1024, 8192, 512, 2, 4), 0.0, 0.0)
    assert "split-K" not in bound


def _call(kind, touches=(), name="op", phase="backward", **extra):
    return sm90.Call(kind, name, phase, touches=tuple(touches), **extra)


def test_cache_traffic_hits_misses_and_write_back():
    mb = 1e6
    calls = [
        _call("kernel", [(("a",), 10 * mb, True)]),  # A written: resident, dirty, no HBM
        _call("kernel", [(("a",), 10 * mb, False)]),  # read while resident: L2
        _call("view"),  # no traffic
        _call("kernel", [(("w",), 60 * mb, False)]),  # larger than the cache: streams from HBM
        _call("kernel", [(("b",), 45 * mb, False)]),  # read from HBM; evicts A, which is dirty: written back
        _call("kernel", [(("a",), 10 * mb, False)]),  # A again: HBM; evicts nothing dirty... B is clean
    ]
    got = M.cache_traffic(calls, capacity=50 * mb)
    assert got[0] == [10 * mb, 0.0]
    assert got[1] == [10 * mb, 0.0]
    assert 2 not in got
    assert got[3] == [60 * mb, 60 * mb]
    assert got[4] == [45 * mb, 45 * mb + 10 * mb]
    assert got[5] == [10 * mb, 10 * mb]


def test_host_time_sums_the_counted_calls():
    host = {"kernel": 5e-6, "gemm": 7e-6, "view": 1e-6, "alloc": 2e-6, "host": 0.5e-6, "custom_op": 30e-6,
            "triton:_k (3 args + 1 constexprs / options)": 20e-6}  # fmt: skip
    calls = [_call("kernel")] * 3 + [_call("gemm")] * 2 + [_call("view")] * 4 + [_call("alloc")] + \
            [_call("custom_op")] * 2 + [_call("triton", name="_k")] * 2 + [_call("sync")]  # fmt: skip
    got = sum(M.host_cost(c, host) for c in calls)
    launches = 3 + 2 + 2
    want = 3 * 5e-6 + 2 * 7e-6 + 4 * 1e-6 + 2e-6 + 2 * 30e-6 + 2 * 20e-6 + launches * M.DRIVER_LAUNCH
    assert got == pytest.approx(M.HOST_SCALE * want)  # the GPU machine's host, fitted to its run


def test_wall_time_is_host_or_gpu_per_stretch_between_syncs():
    ct = M.CallTime
    times = [ct("kernel", "a", "f", gpu=10e-6, host=30e-6), ct("sync", "s", "f", 0.0, 0.0),
             ct("gemm", "b", "b", gpu=100e-6, host=20e-6), ct("view", "v", "b", 0.0, 5e-6)]  # fmt: skip
    got = M.wall_time(times)
    want = 30e-6 + 100e-6 + 2 * M.KERNEL_BOUNDARY + M.SYNC_LATENCY
    assert got["wall"] == pytest.approx(want) and got["launches"] == 2 and got["syncs"] == 1


def test_update_bytes_fused_against_unfused():
    got = M.update_bytes(10_000_000, 512)
    n = 10_000_000 * 512
    assert got["unfused"] == n * 4 * 6  # dW written; dW, W, momentum read; W, momentum written
    assert got["fused"] == n * 4 * 4  # W, momentum read and written; dW stays in L2


def test_a_gather_touches_what_it_reads_not_its_whole_source():
    w = torch.empty(100_000, 64, device="meta")
    rows = torch.zeros(8, dtype=torch.long, device="meta")
    with sm90.counting() as counter:
        w.index_select(0, rows)
    (call,) = counter.result.calls
    assert call.touches[0][1] == 8 * 64 * 4 and call.bytes < 100_000 * 4


def test_the_pre_pass_kernel_touches_the_target_rows_not_the_whole_weight(head_step):
    # _target_rows_kernel reads W's rows of the B targets (GATHERING_KERNELS), not W: 1024 rows of 512 bfloat16
    (call,) = [c for c in head_step.calls if c.name == "_target_rows_kernel"]
    sizes = sorted(size for _, size, written in call.touches if not written)
    assert sizes[-1] == sizes[-2] == 1024 * 512 * 2  # x and W's target rows
    assert sum(sizes) < 3 * 1024 * 512 * 2


def test_bilinear_fit_of_the_traced_bytes_extrapolates_exactly():
    # inductor's traced bytes at four small shapes give torch.compile's traffic at the target shape
    gm = _model()
    exact = lambda b, c: 100 + 7 * b + 3 * c + 39 * b * c  # noqa: E731
    f = gm.bilinear(gm.INDUCTOR_SHAPES, [exact(b, c) for b, c in gm.INDUCTOR_SHAPES])
    assert f.per_pair == pytest.approx(39)
    assert f(1024, 1_000_000) == pytest.approx(exact(1024, 1_000_000), rel=1e-12)


def test_float32_gemms_at_highest_precision_run_without_tensor_cores():
    assert M.cublas_rate(2 * 8192**3, "fp32") == pytest.approx(0.8 * M.FP32_PEAK)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        slow, _, _ = M.gemm_time((1, 4096, 4096, 4096, 4, 4), 0.0, 0.0)
        torch.set_float32_matmul_precision("high")
        fast, _, _ = M.gemm_time((1, 4096, 4096, 4096, 4, 4), 0.0, 0.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert slow > 3 * fast


def test_count_step_tags_the_fused_update():
    got = sm90.count_step(256, 20_000, 64, torch.float32, optimizer="sgd")
    assert got.launches("update") > 0 and got.count("kernel", "step") == 0
    unfused = sm90.count_step(256, 20_000, 64, torch.float32, optimizer="torch-sgd")
    assert unfused.launches("update") == 0 and unfused.launches("step") > 0


def test_counting_does_not_change_the_step():
    """The counter holds no reference to the tensors it sees: autograd takes a gradient nobody else holds and
    copies one that is referenced elsewhere, so a reference would add a copy to the counted step."""
    x = torch.empty(64, 8, device="meta", requires_grad=True)
    w = torch.empty(8, 8, device="meta", requires_grad=True)
    with sm90.counting() as counter:
        (x @ w).sum().backward()
    assert "aten.copy_.default" not in counter.result.by_name("kernel"), counter.result.calls
    assert "aten.clone.default" not in counter.result.by_name("kernel"), counter.result.calls


def test_measured_steps_are_printed_beside_the_estimate(tmp_path):
    # a GPU's results.csv (facekernels-bench's schema) under bench/results: its time at the model's shape is
    # printed with its ratio to the estimate; CPU rows, other shapes and non-numbers (OOM) are not
    header = ("kernel,provider,mode,metric,unit,x_name,x_value,y_p50,y_p20,y_p80,config,dtype,device,torch_version,"
              "triton_version,facekernels_commit,timestamp,note\n")  # fmt: skip
    rows = ['arcface,triton,full,time,ms,C,1000,30,29,31,"{""B"": 8, ""d"": 4}",bfloat16,NVIDIA X,2,3,abc,t,',
            'arcface,triton,full,time,ms,C,2000,OOM,OOM,OOM,"{""B"": 8, ""d"": 4}",bfloat16,NVIDIA X,2,3,abc,t,',
            'arcface,compile,full,time,ms,C,1000,5,5,5,"{""B"": 8, ""d"": 4}",bfloat16,CPU Y,2,3,abc,t,']  # fmt: skip
    (tmp_path / "gpu-1").mkdir()
    (tmp_path / "gpu-1" / "results.csv").write_text(header + "\n".join(rows) + "\n")
    measured = M.measured_steps(str(tmp_path))
    assert measured == {("arcface", "triton", "bfloat16", 8, 4, 1000): (30.0, "NVIDIA X", "gpu-1")}
    walls = {"fused (backend='triton')": 0.010, "eager (backend='reference')": 0.020}
    text = M.measured_text("ArcFace", 8, 4, 1000, torch.bfloat16, walls, measured)
    assert text.strip() == "MEASURED fused: 30.00 ms on NVIDIA X (bench/results/gpu-1) = 3.00 x this estimate"
    assert "no GPU measurement of curricular" in M.measured_text("CurricularFace", 8, 4, 1000, torch.bfloat16,
                                                                 walls, measured)  # fmt: skip
