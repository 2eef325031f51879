"""A model of one training step (forward + backward) of a margin-softmax head on an H100 SXM: an ESTIMATE, not a
measurement. The first GPU run (bench/results/h200-2026-12-04/NOTES.md: ArcFace at B = 1024, C = 1.28M, bf16,
47.0 ms on an H200) came out 3.2x slower than this model's figure then, and slower still at smaller C; the model
fits it only with host costs ~7.5x those measured here (HOST_SCALE, a fit until a profile checks it). It prints
every GPU measurement of the same shape committed under bench/results beside its estimate. It is a function of the calls the step makes, counted from the
code as it is (facekernels/benchmark/sm90.py ``count_step``: every Triton launch, cuBLAS GEMM, torch kernel,
view / allocation, custom_op dispatch and host sync of the step, on meta tensors standing for CUDA ones), so
that it re-derives its numbers when the code changes, and can disagree with what we expect.

Usage: ``python bench/gpu_model.py [--batch 1024 256] [--features 512] [--classes 1000000] [--dtype bf16]``
(a process without TRITON_INTERPRET: each Triton kernel is compiled for sm_90 and its SASS read).

GPU time of a call:
* Triton kernel: the largest of tensor-core time (its HGMMA instructions, read from its SASS, at WGMMA_EFF of
  the peak), issue time (``issue_cycles``: instructions per warp of its SASS, loops times their trip counts,
  half-rate pipes counted, x warps / (SMs x 4 schedulers x clock)), L2 traffic and HBM traffic. At one CTA per
  SM (registers) a warp's epilogue cannot overlap its own MMAs, and no other CTA's run beside it: then the
  tensor time and the issue time outside the K loop add.
* cuBLAS GEMM: FLOPs at a shape-dependent rate (``cublas_rate``: public H100 numbers), or its L2 / HBM traffic.
* other torch kernel: the bytes it touches, from L2 or HBM, at least GPU_MIN_KERNEL.
Where bytes come from: ``cache_traffic`` runs the step's memory touches through an LRU model of the 50 MB L2:
a tensor read again before the step has touched L2_BYTES of other data is an L2 hit, otherwise HBM; dirty data
goes back to HBM when evicted.

Host time: per kind of call, a cost MEASURED here (``measure_host``: a torch op, a view, an allocation, a
custom_op dispatch, each Triton kernel's launcher up to the driver with the driver stubbed) plus the published
CUDA driver cost of a launch (DRIVER_LAUNCH), summed over the step's counted calls. Wall time: per stretch of
the step between host syncs, the larger of host and GPU time; plus KERNEL_BOUNDARY per dependent kernel (one
stream: every kernel waits for the one before) and SYNC_LATENCY per sync.

The eager line is the reference backend's step counted the same way. The torch.compile line is the eager step's
GEMMs and inductor's other kernels as its CPU backend generates them (inductor's GPU kernels cannot be generated
without a GPU here), with the bytes inductor counts for them, traced at small shapes and extrapolated
(``inductor_trace``, ``compile_lines``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from facekernels.benchmark import sm90  # noqa: E402

# ---- H100 SXM5 (assumptions, each with its source) ---------------------------------------------------------
SMS = 132  # NVIDIA H100 datasheet (SXM5)
CLOCK = 1.83e9  # Hz: the clock at which the datasheet's 989 TFLOP/s dense bf16 holds (132 SMs x 4096 FLOP/clk)
TENSOR_PEAK = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12}  # dense FLOP/s, NVIDIA H100 datasheet
FP32_PEAK = 66.9e12  # FLOP/s without tensor cores (datasheet): cuBLAS float32 GEMMs at torch's default "highest"
# A Triton wgmma K loop's share of the tensor peak. FITTED: the H200 profile (bench/results/h200-2026-12-04b,
# profile.txt) timed _lse_partial_kernel at 5.2 ms for its 1.05 TFLOP with the epilogue (CurricularFace,
# B = 1024, C = 1M, bf16), which this model gives only at 0.24; 0.75 (near cuBLAS's large-shape rate, ~790 / 989)
# was assumed before a GPU ran it, and estimated that kernel at 2.3 ms.
WGMMA_EFF = 0.24
HBM_BW = 3.35e12 * 0.9  # HBM3 3.35 TB/s (datasheet), ~90 % reachable by streaming kernels
L2_BW = 7.2e12  # L2 -> SMs: ~5.5 TB/s measured on H100 PCIe (chipsandcheese 2023, 114 SMs at 1.755 GHz) scaled
#                 to SXM's 132 SMs at 1.98 GHz; the least certain constant
L2_BYTES = 50e6  # H100 SXM5 L2 (datasheet); as two 25 MB partitions it holds less for one SM: an upper bound
REGISTERS_PER_SM, SHARED_PER_SM = 65536, 228 * 1024  # sm_90 (CUDA programming guide, compute capability 9.0)
# cuBLAS bf16 rate by GEMM work (FLOPs): public H100 SXM figures, interpolated in log(FLOPs). 1024^3: ~177,
# 2048^3: ~677 TFLOP/s (the public numbers the issue's review cites), large shapes: ~790 (the maximum
# achievable matmul rate of H100 SXM bf16 in S. Bekman's ml-engineering "MAMF finder" tables). tf32: half.
CUBLAS_POINTS = ((2 * 1024**3, 177e12), (2 * 2048**3, 677e12), (2 * 8192**3, 790e12))
CUBLAS_TILE = (128, 256)  # a Hopper cuBLAS output tile; fewer tiles than SMs means split-K (an extra pass)
DRIVER_LAUNCH = 2.5e-6  # s of host time per cuLaunchKernel (published: 2-5 us, NVIDIA's "Getting Started with
#                         CUDA Graphs" blog, 2019; the low end for a current driver)
# The GPU machine's host against this one's: the first GPU run (bench/results/h200-2026-12-04) timed ArcFace,
# B = 1024, d = 512, bf16 at C = 10k, 160k and 1.28M (5.95, 9.89, 47.0 ms); this model, whose GPU time there is
# 0.39, 1.99 and 14.1 ms, fits them only with every host cost times 8.5, 7.3 and 7.1. FITTED, not measured per
# call: CUDA-graph replay and the chunk sweep of bench/gpu_step_profile.py on the next GPU run say whether the
# host is what is slow, and this constant is refitted from them.
HOST_SCALE = 7.5
GPU_MIN_KERNEL = 2e-6  # s: the shortest a kernel takes on the GPU (front end, one wave): assumed
KERNEL_BOUNDARY = 1e-6  # s per dependent kernel: the drain of one grid and ramp of the next: assumed
SYNC_LATENCY = 10e-6  # s per host sync (device -> host round trip after the queue drains): assumed
COMPILE_KERNELS = 35  # torch.compile of the reference: kernels besides the GEMMs, when it cannot be traced here

# SASS opcodes by pipe, cycles per warp instruction on one SM sub-partition (CUDA programming guide, compute
# capability 9.0 throughputs per SM per clock: 128 -> 1 cycle, 64 -> 2, 32 -> 4, 16 -> 8)
HALF_RATE = ("ISETP", "FSETP", "DSETP", "HSETP2", "SEL", "FSEL", "LOP3", "LOP", "PLOP3", "SHF", "SHL", "SHR",
             "IADD3", "IADD", "IMNMX", "FMNMX", "LEA", "PRMT", "MOV", "P2R", "R2P", "IABS", "FLO", "POPC", "BMSK",
             "SGXT", "F2FP", "I2FP", "IMAD", "IMUL", "VIADD", "VIMNMX", "FCHK")  # fmt: skip
QUARTER_RATE = ("SHFL",)
EIGHTH_RATE = ("MUFU", "F2F", "F2I", "I2F", "FRND")


# ---- SASS: issue cycles ------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def parse_sass(sass: str) -> list:
    """(address, opcode with modifiers, operands) of each instruction of a cuobjdump -sass listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_LINE.finditer(sass)]


def sass_loops(instructions) -> list:
    """(start, end) address ranges of the loops: a branch back to a lower address closes one."""
    loops = []
    for address, op, operands in instructions:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address:
                loops.append((int(target.group(1), 16), address))
    return sorted(set(loops))


def _pipe_cycles(op: str) -> tuple[str, int]:
    base = op.split(".")[0]
    if base in EIGHTH_RATE:
        return "xu", 8
    if base in QUARTER_RATE:
        return "shfl", 4
    if base in ("IMAD", "IMUL"):
        return "fmaheavy", 2
    if base in HALF_RATE:
        return "alu", 2
    if base in ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FSWZADD"):
        return "fma", 1
    return "issue", 1


@dataclass
class Issue:
    """A kernel's SASS per warp: instructions issued, cycles (the busiest of the issue slot and the pipes),
    the same outside the innermost loops (the epilogue), and its HGMMA FLOPs per warpgroup."""

    instructions: float = 0.0
    cycles: float = 0.0
    epilogue_cycles: float = 0.0
    hgmma_flops: float = 0.0
    loops: list = field(default_factory=list)
    pipes: dict = field(default_factory=dict)


def issue_cycles(sass: str, trips) -> Issue:
    """Cycles per warp of one program: each instruction weighted by the trip counts of the loops around it
    (``trips(depth)``: iterations of a loop at that nesting depth, 1 = outermost, per iteration of its
    parent), NOPs and the trailing self-branch left out. A pipe of half rate takes 2 cycles of its sub-
    partition per warp instruction; the warp's cycles are the most of the issue slot (1 a instruction) and
    each pipe's."""
    instructions = parse_sass(sass)
    loops = sass_loops(instructions)
    depth_of = {loop: 1 + sum(1 for o in loops if o != loop and o[0] <= loop[0] and loop[1] <= o[1]) for loop in loops}
    innermost = max(depth_of.values(), default=0)
    issue, epilogue, pipes, hgmma = 0.0, collections.Counter(), collections.Counter(), 0.0
    outer_pipes = collections.Counter()
    for address, op, operands in instructions:
        if op.startswith("NOP") or (op.startswith("BRA") and f"0x{address:x}" in operands):
            continue
        around = [loop for loop in loops if loop[0] <= address <= loop[1]]
        weight = math.prod(trips(depth_of[loop]) for loop in around)
        pipe, cycles = _pipe_cycles(op)
        issue += weight
        pipes[pipe] += weight * cycles
        if innermost == 0 or not any(depth_of[loop] == innermost for loop in around):
            epilogue["issue"] += weight
            outer_pipes[pipe] += weight * cycles
        shape = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
        if shape:
            m, n, k = (int(v) for v in shape.groups())
            hgmma += weight * 2 * m * n * k
    pipes["issue"] = issue
    outer_pipes["issue"] = epilogue["issue"]
    return Issue(issue, max(pipes.values(), default=0.0), max(outer_pipes.values(), default=0.0), hgmma,
                 [(hex(a), hex(b), depth_of[(a, b)]) for a, b in loops], dict(pipes))  # fmt: skip


def loop_trips(launch, features: int):
    """Trip counts by loop depth of a captured launch: the forward's class steps per program (outer) and its K
    steps (inner); for another kernel its innermost loops step over d by BLOCK_K, outer loops once."""
    kernel, grid, args, meta = launch
    k_steps = math.ceil(features / meta["BLOCK_K"]) if "BLOCK_K" in meta else 1
    name = kernel.fn.__name__

    def arg(arg_name):  # a runtime argument by its name in the kernel's signature (positions move)
        return args[list(inspect.signature(kernel.fn).parameters).index(arg_name)]

    if name == "_lse_partial_kernel":
        step = meta["BLOCK_C"] * (2 if meta.get("PAIRED") else 1)
        class_steps = math.ceil(arg("C") / step) / grid[1]  # the launch's classes over its splits
        return lambda depth: class_steps if depth == 1 else k_steps
    if name in ("_grad_logits_kernel", "_grad_logits_from_dots_kernel"):
        # a program owns its classes for every row: the outer loop steps over the rows, the inner one (the fused
        # recompute's) over d
        row_steps = math.ceil(arg("B") / meta["BLOCK_B"])
        return lambda depth: row_steps if depth == 1 else k_steps
    if name == "_inv_norm_kernel":
        return lambda depth: k_steps
    return lambda depth: k_steps if depth >= 1 else 1


# ---- per-call GPU time -------------------------------------------------------------------------------------


def cublas_rate(flops: float, precision: str = "bf16") -> float:
    """FLOP/s of one cuBLAS GEMM of this much work (CUBLAS_POINTS, log-linear between, flat outside); TF32 at
    half that; float32 without tensor cores ("highest") at most 80 % of FP32_PEAK."""
    x = math.log(max(flops, 1.0))
    points = [(math.log(f), r) for f, r in CUBLAS_POINTS]
    if x <= points[0][0]:
        rate = points[0][1] * flops / CUBLAS_POINTS[0][0]  # below 1024^3 launch-bound: time ~ constant
    elif x >= points[-1][0]:
        rate = points[-1][1]
    else:
        for (x0, r0), (x1, r1) in zip(points, points[1:]):
            if x <= x1:
                rate = r0 + (r1 - r0) * (x - x0) / (x1 - x0)
                break
    if precision == "fp32":  # no tensor cores: FP32 pipes at ~80 % (SIMT GEMMs saturate them at modest sizes)
        return min(rate, 0.8 * FP32_PEAK)
    return rate * (0.5 if precision == "tf32" else 1.0)


def gemm_time(gemm: tuple, l2_bytes: float, hbm_bytes: float) -> tuple[float, str, float]:
    """(seconds, bound, L2 bytes) of a cuBLAS call (batch, m, n, k, operand bytes, output bytes): its rate by
    work (the public rates include cuBLAS's own operand re-reads through L2, so those are not charged again);
    its compulsory bytes from L2 / HBM (cache_traffic); fewer output tiles (CUBLAS_TILE) than SMs -> split-K,
    whose float32 partials are written and read once more (through L2)."""
    batch, m, n, k, elem, out_elem = gemm
    flops = 2.0 * batch * m * n * k
    # float32 operands: TF32 tensor cores only when torch's float32 matmul precision allows it
    precision = "bf16" if elem != 4 else "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    tm, tn = CUBLAS_TILE
    tiles = batch * math.ceil(m / tm) * math.ceil(n / tn)
    split = max(1, min(SMS // max(tiles, 1), k // 256)) if tiles < SMS else 1
    l2 = l2_bytes + 2 * (split - 1) * batch * m * n * 4
    parts = {"tensor": flops / cublas_rate(flops, precision), "L2": l2 / L2_BW, "HBM": hbm_bytes / HBM_BW}
    bound = max(parts, key=parts.get)
    return max(parts[bound], GPU_MIN_KERNEL), bound + (f" split-K {split}" if split > 1 else ""), l2


def occupancy(registers: int, threads: int, shared: int) -> int:
    """CTAs per SM by registers (allocated per warp in units of 256: 8 per thread) and shared memory."""
    regs = math.ceil(registers / 8) * 8 * threads
    return max(1, min(REGISTERS_PER_SM // max(regs, 1), SHARED_PER_SM // max(shared, 1), 32))


@dataclass
class KernelFacts:
    """What the model needs of a compiled Triton launch: its SASS issue, registers and shared memory."""

    issue: Issue
    registers: int
    shared: int
    warps: int


def compile_facts(launch, features: int) -> KernelFacts:
    """Compile a captured launch for sm_90 (sm90.use_h100_target first) and read its SASS."""
    kernel, grid, args, meta = launch
    compiled = kernel.warmup(*args, grid=grid, **meta)
    facts = sm90.cubin_facts(compiled.asm["cubin"])
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([sm90._tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    return KernelFacts(issue_cycles(sass, loop_trips(launch, features)), facts["registers"],
                       compiled.metadata.shared, compiled.metadata.num_warps)  # fmt: skip


def triton_time(launch, facts: KernelFacts, l2_bytes: float, hbm_bytes: float, precision: str):
    """(seconds, bound, note) of a Triton launch: max(tensor, issue, L2, HBM), or tensor + epilogue issue at one
    CTA per SM."""
    kernel, grid, args, meta = launch
    programs = math.prod(grid)
    warps = facts.warps
    groups = warps / 4  # a warpgroup issues each HGMMA once for its 4 warps
    flops = facts.issue.hgmma_flops * groups * programs
    slots = SMS * 4 * CLOCK
    issue = programs * warps * facts.issue.cycles / slots
    epilogue = programs * warps * facts.issue.epilogue_cycles / slots
    tensor = flops / (TENSOR_PEAK[precision] * WGMMA_EFF) if flops else 0.0
    if flops and "BLOCK_B" in meta and "BLOCK_C" in meta:
        # operand tiles from L2: per K step a program loads BLOCK_B + BLOCK_C' rows of BLOCK_K for
        # 2 BLOCK_B BLOCK_C' BLOCK_K FLOPs (BLOCK_C' = 2 BLOCK_C when paired)
        bb, bc = meta["BLOCK_B"], meta["BLOCK_C"] * (2 if meta.get("PAIRED") else 1)
        elem = next(a.element_size() for a in args if isinstance(a, torch.Tensor))
        l2_bytes = max(l2_bytes, flops * elem * (bb + bc) / (2 * bb * bc))
    ctas = occupancy(facts.registers, warps * 32, facts.shared)
    parts = {"tensor": tensor, "issue": issue, "L2": l2_bytes / L2_BW, "HBM": hbm_bytes / HBM_BW}
    if flops and ctas == 1:
        parts["tensor+epilogue"] = tensor + epilogue
    bound = max(parts, key=parts.get)
    note = (f"{facts.issue.instructions:.0f} instr/warp, {facts.registers} regs, {ctas} CTA/SM, "
            f"{flops / 1e12:.2f} TFLOP")  # fmt: skip
    return max(parts[bound], GPU_MIN_KERNEL), bound, note, l2_bytes


# ---- memory: an LRU model of the L2 ----------------------------------------------------------------------


def cache_traffic(calls, capacity: float = L2_BYTES) -> dict:
    """{call index: (L2 bytes, HBM bytes)} of the step's GPU calls in order: a tensor read while resident is L2
    traffic, otherwise HBM; a written one becomes resident and dirty (no read from HBM); dirty data evicted is
    written back to HBM (charged to the call that evicts it, during which it happens); what is still dirty at
    the end is charged to the last call. A tensor larger than the cache streams through it."""
    resident = collections.OrderedDict()  # key -> (bytes, dirty)
    used = 0.0
    out = {}
    last = None
    for i, call in enumerate(calls):
        if call.kind not in sm90.LAUNCH_KINDS:
            continue
        l2 = hbm = 0.0
        for key, size, written in call.touches:
            l2 += size
            if key in resident:
                old, dirty = resident.pop(key)
                used -= old
                resident[key] = (size, dirty or written)
                used += size
                continue
            if written:
                if size > capacity:
                    hbm += size  # streams out
                    continue
            else:
                hbm += size
                if size > capacity:
                    continue
            resident[key] = (size, written)
            used += size
            while used > capacity:
                _, (old, dirty) = resident.popitem(last=False)
                used -= old
                hbm += old if dirty else 0.0
        out[i] = [l2, hbm]
        last = i
    if last is not None:
        out[last][1] += sum(size for size, dirty in resident.values() if dirty)
    return out


# ---- host: per-call costs measured here -------------------------------------------------------------------


def _timed(fn, repeats: int = 300) -> float:
    """Seconds per call: the least of 25 batches (the machine is shared: the least is the call's own cost)."""
    fn()
    samples = []
    for _ in range(25):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append((time.perf_counter() - t0) / repeats)
    return min(samples)


@torch.library.custom_op("fkmodel::noop17", mutates_args=())
def _noop17(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e: torch.Tensor, f: torch.Tensor,
            g: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor, s: float, n: int,
            t: float, u: float, v: float, w: int) -> torch.Tensor:  # fmt: skip
    return a.new_empty(0)


def _plain17(a, b, c, d, e, f, g, h, i, j, k, s, n, t, u, v, w):
    return a.new_empty(0)


def measure_host(launches=()) -> dict:
    """Host seconds per kind of call, measured on this machine's CPU (before DRIVER_LAUNCH is added): a torch
    op (an add of two 1-element CPU tensors: dispatch, allocation and a trivial kernel), a view (``t()``),
    an allocation (``torch.empty``), a custom_op dispatch (a 17-argument torch.library.custom_op whose body
    allocates an empty tensor, minus the same body called directly), and each Triton kernel's launch through
    its JIT (binding, specialisation key, cache lookup, launch metadata) with the compiled kernel's driver
    launcher replaced by a stub (sm90.use_h100_target must be active). Not the GPU machine's CPU: the H100's
    host may be faster."""
    a, b = torch.ones(1), torch.ones(1)
    tensors = [torch.ones(4) for _ in range(11)]
    scalars = (64.0, 2, 0.2, 1.0, math.inf, 1)
    out = {
        "kernel": _timed(lambda: torch.add(a, b)),
        "gemm": _timed(lambda: torch.mm(a.view(1, 1), b.view(1, 1))),
        "view": _timed(lambda: a.t()),
        "alloc": _timed(lambda: torch.empty(1)),
        "host": _timed(lambda: torch.promote_types(torch.float32, torch.bfloat16)),
        "custom_op": max(0.0, _timed(lambda: _noop17(*tensors, *scalars)) - _timed(lambda: _plain17(*tensors,
                                                                                                    *scalars))),
    }  # fmt: skip
    for kernel, grid, args, meta in launches:
        name = f"triton:{kernel.fn.__name__} ({len(args)} args + {len(meta)} constexprs / options)"
        if name in out:
            continue
        compiled = kernel.warmup(*args, grid=grid, **meta)
        # the driver's launcher and module: stubbed (no GPU); a loaded module is what launch_metadata checks
        compiled.module, compiled._run = "stub", (lambda *launch_args: None)
        out[name] = _timed(lambda: kernel[grid](*args, **meta), repeats=100)
    return out


# ---- the step ---------------------------------------------------------------------------------------------


@dataclass
class CallTime:
    kind: str
    name: str
    phase: str
    gpu: float
    host: float
    bound: str = ""
    l2: float = 0.0
    hbm: float = 0.0
    flops: float = 0.0
    note: str = ""


def host_cost(call, host: dict) -> float:
    """Host seconds of one counted call on the GPU machine: its kind's cost measured here, plus the driver's
    launch for a GPU launch, times HOST_SCALE."""
    if call.kind == "triton":
        measured = [v for k, v in host.items() if k.startswith(f"triton:{call.name} ")]
        return HOST_SCALE * ((measured[0] if measured else host["kernel"]) + DRIVER_LAUNCH)
    if call.kind == "sync":
        return 0.0
    return HOST_SCALE * (host[call.kind] + (DRIVER_LAUNCH if call.kind in ("gemm", "kernel") else 0.0))


def time_calls(count: sm90.StepCount, host: dict, facts: dict, precision: str, features: int) -> list:
    """A CallTime per counted call."""
    traffic = cache_traffic(count.calls)
    out = []
    for i, call in enumerate(count.calls):
        l2, hbm = traffic.get(i, (0.0, 0.0))
        gpu, bound, note, flops = 0.0, "", "", 0.0
        if call.kind == "gemm":
            gpu, bound, l2 = gemm_time(call.gemm, l2, hbm)
            flops = 2.0 * math.prod(call.gemm[:4])
        elif call.kind == "kernel":
            parts = {"L2": l2 / L2_BW, "HBM": hbm / HBM_BW}
            bound = max(parts, key=parts.get)
            gpu = max(parts[bound], GPU_MIN_KERNEL)
        elif call.kind == "triton":
            f = facts[_launch_key(call.launch)]
            gpu, bound, note, l2 = triton_time(call.launch, f, l2, hbm, precision)
            flops = f.issue.hgmma_flops * f.warps / 4 * math.prod(call.launch[1])
        out.append(CallTime(call.kind, call.name, call.phase, gpu, host_cost(call, host), bound, l2, hbm, flops,
                            note))  # fmt: skip
    return out


def _launch_key(launch) -> tuple:
    kernel, grid, args, meta = launch
    return (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in meta.items())),
            tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else type(a).__name__
                  for a in args))  # fmt: skip


def wall_time(times: list) -> dict:
    """Per stretch between host syncs, max(host, GPU); plus KERNEL_BOUNDARY per launch and SYNC_LATENCY per
    sync. Returns the parts."""
    stretches, host, gpu = [], 0.0, 0.0
    launches = syncs = 0
    for t in times:
        if t.kind == "sync":
            stretches.append((host, gpu))
            host = gpu = 0.0
            syncs += 1
            continue
        host += t.host
        gpu += t.gpu
        launches += t.kind in sm90.LAUNCH_KINDS
    stretches.append((host, gpu))
    total = sum(max(h, g) for h, g in stretches) + launches * KERNEL_BOUNDARY + syncs * SYNC_LATENCY
    return {"wall": total, "host": sum(h for h, _ in stretches), "gpu": sum(g for _, g in stretches),
            "launches": launches, "syncs": syncs}  # fmt: skip


_INDUCTOR_TRACE = r"""
import json, sys, torch, torch._inductor.config as config, torch._inductor.metrics as metrics
from torch._inductor.scheduler import ExternKernelSchedulerNode
torch._logging.set_logs(inductor_metrics=True)  # makes inductor count each fused kernel's buffer bytes
import facekernels as fk
config.fx_graph_cache = False
batch, classes, features, dtype = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
torch.manual_seed(0)
head = fk.CurricularFace(features, classes, backend="reference").train().to(dtype)
x, y = torch.randn(batch, features, dtype=dtype, requires_grad=True), torch.randint(0, classes, (batch,))
metrics.reset()
torch.compile(head)(x, y).backward()
fused = [4 * n for node, n in metrics.nodes_num_elem if not isinstance(node, ExternKernelSchedulerNode)]
print(json.dumps({"kernels": metrics.generated_kernel_count, "bytes": sum(fused)}))
"""
# the corners of the traced shapes (B, C): the bytes of inductor's kernels are fitted as a + b B + c C + e B C
INDUCTOR_SHAPES = ((64, 4096), (128, 4096), (64, 8192), (128, 8192))


def bilinear(corners, values):
    """f(B, C) = a + b B + c C + e B C through four values at the corners (B0, C0), (B1, C0), (B0, C1), (B1, C1);
    ``f.per_pair`` is e."""
    (b0, c0), (b1, _), (_, c1), _ = corners
    y00, y10, y01, y11 = values
    e = (y11 - y10 - y01 + y00) / ((b1 - b0) * (c1 - c0))
    b_coef = (y10 - y00) / (b1 - b0) - e * c0
    c_coef = (y01 - y00) / (c1 - c0) - e * b0
    a = y00 - b_coef * b0 - c_coef * c0 - e * b0 * c0

    def f(batch, classes):
        return a + b_coef * batch + c_coef * classes + e * batch * classes

    f.per_pair = e
    return f


def inductor_trace(features: int, dtype: torch.dtype):
    """(kernels, bytes(B, C), how known) of torch.compile of the reference head's forward + backward, traced by
    inductor's CPU backend in fresh processes at the four INDUCTOR_SHAPES, at this d and dtype: its loop nests
    besides the GEMMs (extern calls), each about one Triton kernel on a GPU, and the bytes they read and write
    (inductor's own count of each fused kernel's buffers), fitted bilinearly in B and C and extrapolated.
    COMPILE_KERNELS and 4 (B, C) passes (ASSUMED) when the trace fails here. The CPU backend's fusions are
    not necessarily the GPU's: a trace, not a measurement."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    name = str(dtype).removeprefix("torch.")
    try:
        traced = []
        for b, c in INDUCTOR_SHAPES:
            done = subprocess.run([sys.executable, "-c", _INDUCTOR_TRACE, str(b), str(c), str(features), name],
                                  capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
            traced.append(json.loads(done.stdout.strip().splitlines()[-1]))
        traffic = bilinear(INDUCTOR_SHAPES, [t["bytes"] for t in traced])
        how = (f"traced by inductor's CPU backend at (B, C) = {', '.join(f'({b}, {c})' for b, c in INDUCTOR_SHAPES)}, "
               f"d = {features}: {traffic.per_pair:.1f} bytes per (row, class)")  # fmt: skip
        return traced[0]["kernels"], traffic, how
    except Exception as err:  # noqa: BLE001 - a model's fallback, said in its output
        elem = dtype.itemsize
        return COMPILE_KERNELS, lambda batch, classes: 4 * batch * classes * elem, (
            f"ASSUMED (inductor trace failed here: {type(err).__name__}): 4 (B, C) passes")


def compile_lines(eager: list, batch: int, classes: int, kernels: int, traffic) -> list:
    """torch.compile of the reference: the eager step's GEMM calls as they are, and ``kernels`` other kernels
    (inductor's count) moving ``traffic(B, C)`` bytes through HBM (inductor_trace), charged as one line (the
    trace does not tell forward from backward), each other kernel at least GPU_MIN_KERNEL. Host: a launch each
    from inductor's generated wrapper (DRIVER_LAUNCH + the measured cost of a torch op for its Python)."""
    gemms = [t for t in eager if t.kind == "gemm"]
    moved = traffic(batch, classes)
    host = gemms[0].host if gemms else HOST_SCALE * (4e-6 + DRIVER_LAUNCH)  # a torch op's call and its launch
    fused = [CallTime("kernel", "compiled kernels' traced bytes", "step", moved / HBM_BW + GPU_MIN_KERNEL, host,
                      "HBM", hbm=moved)]  # fmt: skip
    rest = [CallTime("kernel", "compiled small kernel", "step", GPU_MIN_KERNEL, host, "launch")
            for _ in range(max(kernels - 1, 0))]  # fmt: skip
    return gemms + fused + rest


def model(batch: int, classes: int, features: int, dtype: torch.dtype, head: str = "CurricularFace",
          host: dict | None = None) -> dict:  # fmt: skip
    """{path: (times, wall parts)} for the fused path, eager reference and (traced) torch.compile."""
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32"}[dtype]
    fused = sm90.count_step(batch, classes, features, dtype, head)
    eager = sm90.count_step(batch, classes, features, dtype, head, backend="reference")
    launches = {_launch_key(c.launch): c.launch for c in fused.calls if c.kind == "triton"}
    facts = {key: compile_facts(launch, features) for key, launch in launches.items()}
    if host is None:
        host = measure_host(launches.values())
    out = {}
    for name, count in (("fused (backend='triton')", fused), ("eager (backend='reference')", eager)):
        times = time_calls(count, host, facts, precision, features)
        out[name] = (times, wall_time(times), count)
    if "inductor" not in host:
        host["inductor"] = inductor_trace(features, dtype)
    kernels, traffic, how = host["inductor"]
    compiled = compile_lines(out["eager (backend='reference')"][0], batch, classes, kernels, traffic)
    out[f"torch.compile(reference): {kernels} kernels + GEMMs, {how}"] = (compiled, wall_time(compiled), None)
    return out, host


def floor_time(batch: int, classes: int, features: int) -> float:
    """The 3-GEMM floor: 6 B C d FLOPs at cuBLAS's large-shape rate (CUBLAS_POINTS' last)."""
    return 6.0 * batch * classes * features / CUBLAS_POINTS[-1][1]


def summarise(times: list) -> list:
    """Rows grouped by (phase, kind, name): calls, GPU ms, host ms, bound, TFLOP, L2 GB, HBM GB, a note."""
    groups = collections.OrderedDict()
    for t in times:
        if t.kind in ("view", "alloc", "host"):
            key = (t.phase, t.kind, "(no launch)")
        elif t.kind == "kernel" and t.gpu <= GPU_MIN_KERNEL and "(B, C)" not in t.name:
            key = (t.phase, t.kind, "small torch kernels")
        else:
            key = (t.phase, t.kind, t.name)
        g = groups.setdefault(key, dict(calls=0, gpu=0.0, host=0.0, bounds=collections.Counter(), flops=0.0,
                                        l2=0.0, hbm=0.0, note=t.note))  # fmt: skip
        g["calls"] += 1
        g["gpu"] += t.gpu
        g["host"] += t.host
        g["bounds"][t.bound] += 1
        g["flops"] += t.flops
        g["l2"] += t.l2
        g["hbm"] += t.hbm
    return [(k, g) for k, g in groups.items()]


def report(batch: int, classes: int, features: int, dtype: torch.dtype, head: str = "CurricularFace",
           host: dict | None = None) -> tuple[str, dict, dict]:  # fmt: skip
    paths, host = model(batch, classes, features, dtype, head, host)
    floor = floor_time(batch, classes, features)
    lines = [f"ESTIMATE (model, not measured) - H100 SXM, {head}, B = {batch}, d = {features}, C = {classes:,}, "
             f"{str(dtype).removeprefix('torch.')}", ""]  # fmt: skip
    head_row = f"{'phase':9} {'kind':9} {'call':42} {'calls':>6} {'GPU ms':>8} {'host ms':>8} {'TFLOP':>6} " \
               f"{'L2 GB':>6} {'HBM GB':>7}  bound / notes"
    walls = {}
    for name, (times, parts, count) in paths.items():
        lines += [f"-- {name}", head_row]
        for (phase, kind, call), g in summarise(times):
            bound = ", ".join(f"{b or '-'} x{n}" if len(g["bounds"]) > 1 else (b or "-")
                              for b, n in g["bounds"].most_common(2))  # fmt: skip
            lines.append(f"{phase:9} {kind:9} {call[:42]:42} {g['calls']:6d} {g['gpu'] * 1e3:8.3f} "
                         f"{g['host'] * 1e3:8.3f} {g['flops'] / 1e12:6.2f} {g['l2'] / 1e9:6.1f} {g['hbm'] / 1e9:7.2f}"
                         f"  {bound}{'; ' + g['note'] if g['note'] else ''}")  # fmt: skip
        counted = "" if count is None else (f"; counted: {count.launches()} launches, {count.count('custom_op')} "
                                            f"custom_op dispatches, {count.count('view') + count.count('alloc')} "
                                            f"views / allocations, {len(count.syncs)} host syncs")  # fmt: skip
        lines.append(f"   wall (estimate) {parts['wall'] * 1e3:.2f} ms = {parts['wall'] / floor:.2f} x the 3-GEMM "
                     f"floor (GPU {parts['gpu'] * 1e3:.2f} ms, host {parts['host'] * 1e3:.2f} ms, "
                     f"{parts['launches']} kernel boundaries, {parts['syncs']} syncs{counted})")  # fmt: skip
        if count is not None:
            # HOST_SCALE is fitted to one GPU run; CUDA graphs replay a captured step with next to no host work
            for scale, why in ((1 / HOST_SCALE, "host costs as measured here (no HOST_SCALE)"),
                               (2.0, "host costs x 2 beyond HOST_SCALE"), (0.0, "host costs x 0 (a CUDA graph")):  # fmt: skip
                if scale == 0.0 and parts["syncs"]:
                    why += f", were the {parts['syncs']} sync(s) gone"
                why += ")" if scale == 0.0 else ""
                other = wall_time([dataclasses.replace(t, host=t.host * scale) for t in times if scale or
                                   t.kind != "sync"])  # fmt: skip
                lines.append(f"   sensitivity: {why}: {other['wall'] * 1e3:.2f} ms = {other['wall'] / floor:.2f} x")
        lines.append("")
        walls[name] = parts["wall"]
    lines.append(f"3-GEMM floor: 6 B C d = {6 * batch * classes * features / 1e12:.2f} TFLOP at "
                 f"{CUBLAS_POINTS[-1][1] / 1e12:.0f} TFLOP/s = {floor * 1e3:.2f} ms")  # fmt: skip
    return "\n".join(lines), walls, host


def constants_text(host: dict) -> str:
    rows = ["Constants (H100 SXM5; sources in bench/gpu_model.py):",
            f"  SMs {SMS}, clock {CLOCK / 1e9:.2f} GHz, tensor peak bf16 {TENSOR_PEAK['bf16'] / 1e12:.0f} TFLOP/s "
            f"(Triton wgmma at {WGMMA_EFF:.0%}), HBM {HBM_BW / 1e12:.2f} TB/s, L2 {L2_BW / 1e12:.1f} TB/s, "
            f"L2 {L2_BYTES / 1e6:.0f} MB",
            "  cuBLAS bf16 by work: " + ", ".join(f"{f / 1e9:.1f} GFLOP -> {r / 1e12:.0f} TFLOP/s"
                                                   for f, r in CUBLAS_POINTS),
            f"  driver launch {DRIVER_LAUNCH * 1e6:.1f} us (published), GPU min kernel {GPU_MIN_KERNEL * 1e6:.1f} us, "
            f"kernel boundary {KERNEL_BOUNDARY * 1e6:.1f} us, sync {SYNC_LATENCY * 1e6:.0f} us (assumed)",
            f"  host costs x {HOST_SCALE:g} (HOST_SCALE: fitted to the H200 run of 2026-12-04) of these, measured on "
            "this machine's CPU (+ driver launch for launches): "
            + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in host.items() if k != "inductor")]  # fmt: skip
    return "\n".join(rows)


# ---- issue 23: the fused optimizer's update bytes ---------------------------------------------------------


def update_bytes(classes: int, features: int, weight_bytes: int = 4, state_bytes: int = 4) -> dict:
    """HBM bytes of one SGD-with-momentum update of a (C, d) head, ESTIMATED per element:
    unfused: the backward writes dW (w), torch.optim.SGD reads dW, W and the momentum and writes W and the
    momentum (w + w + s + w + s); zero_grad(set_to_none=False) would write dW once more (not counted: torch's
    default frees it). Fused (facekernels.optim.SGD): the chunk's dW is in L2 (never written to HBM); W and
    the momentum are read and written (2 w + 2 s): the chunk's W was just read by the chunk's GEMMs, but the
    update runs after the chunk and the chunk's working set is about the L2, so it is counted as an HBM read."""
    n = classes * features
    unfused = n * (weight_bytes + 3 * weight_bytes + 2 * state_bytes)
    fused = n * (2 * weight_bytes + 2 * state_bytes)
    return {"unfused": unfused, "fused": fused}


def update_text(features: int = 512) -> str:
    rows = ["Fused optimizer update (issue 23), SGD with momentum, float32 head and momentum: ESTIMATE (HBM bytes "
            f"at {HBM_BW / 1e12:.2f} TB/s)"]
    for classes in (1_000_000, 10_000_000):
        b = update_bytes(classes, features)
        rows.append(f"  C = {classes:>10,}, d = {features}: unfused {b['unfused'] / 1e9:6.1f} GB "
                    f"{b['unfused'] / HBM_BW * 1e3:6.2f} ms; fused {b['fused'] / 1e9:6.1f} GB "
                    f"{b['fused'] / HBM_BW * 1e3:6.2f} ms; saved {(b['unfused'] - b['fused']) / 1e9:.1f} GB "
                    f"({(b['unfused'] - b['fused']) / HBM_BW * 1e3:.2f} ms)")  # fmt: skip
    return "\n".join(rows)


def counted_update_text(batch: int, classes: int, features: int, host: dict) -> str:
    """Issue 23 as the code does it: one step at bfloat16 embeddings and a float32 head (computed in float32),
    with facekernels.optim.SGD fused into the backward against torch.optim.SGD on the weight's gradient
    (momentum 0.9, weight decay 5e-4; sm90.count_step's second step), through the same model."""
    rows = [f"Counted SGD steps (issue 23), B = {batch}, d = {features}, C = {classes:,}, bfloat16 embeddings, "
            "float32 head: ESTIMATE"]  # fmt: skip
    facts = {}
    for optimizer, what in (("torch-sgd", "unfused: head backward + torch.optim.SGD"),
                            ("sgd", "fused: facekernels.optim.SGD in the backward")):  # fmt: skip
        count = sm90.count_step(batch, classes, features, torch.bfloat16, optimizer=optimizer,
                                weight_dtype=torch.float32)  # fmt: skip
        for c in count.calls:
            if c.kind == "triton" and _launch_key(c.launch) not in facts:
                facts[_launch_key(c.launch)] = compile_facts(c.launch, features)
        times = time_calls(count, host, facts, "tf32", features)
        parts = wall_time(times)
        hbm = sum(t.hbm for t in times)
        rows.append(f"  {what:46} wall {parts['wall'] * 1e3:7.2f} ms (GPU {parts['gpu'] * 1e3:.2f}, host "
                    f"{parts['host'] * 1e3:.2f}), HBM {hbm / 1e9:6.1f} GB, {count.launches()} launches, "
                    f"{len(count.syncs)} syncs")  # fmt: skip
        for phase in ("update", "step"):
            part = [t for t in times if t.phase == phase]
            if part:
                rows.append(f"    of which {phase:6}: {sum(t.kind in sm90.LAUNCH_KINDS for t in part):5d} launches, "
                            f"GPU {sum(t.gpu for t in part) * 1e3:.2f} ms, host {sum(t.host for t in part) * 1e3:.2f} "
                            f"ms, HBM {sum(t.hbm for t in part) / 1e9:.1f} GB (write-backs of earlier calls "
                            "included)")  # fmt: skip
    return "\n".join(rows)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measured_steps(root: str = RESULTS) -> dict:
    """{(head name, provider, dtype, B, d, C): (ms, device, folder)}: every GPU time of a head step committed
    under bench/results (facekernels-bench's results.csv; the latest folder wins), to print beside the model."""
    import csv
    import glob

    found = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "results.csv"))):
        with open(path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["metric"] != "time" or r["x_name"] != "C" or r["device"].startswith("CPU"):
                    continue
                try:
                    ms, config = float(r["y_p50"]), json.loads(r["config"])
                except ValueError:  # OOM, skipped(deadline), error: a result, not a time
                    continue
                key = (r["kernel"], r["provider"], r["dtype"], config["B"], config["d"], int(r["x_value"]))
                found[key] = (ms, r["device"], os.path.basename(os.path.dirname(path)))
    return found


def measured_text(head: str, batch: int, features: int, classes: int, dtype: torch.dtype, walls: dict,
                  measured: dict) -> str:  # fmt: skip
    """The model's fused / eager / torch.compile lines against what a GPU measured at the same shape, if any."""
    from facekernels._head_params import SPECS

    name = next((n for n, spec in SPECS.items() if spec.class_name == head), head.lower())
    providers = {"fused": "triton", "eager": "eager", "torch.compile": "compile"}
    lines = []
    for path, wall in walls.items():
        provider = next((p for prefix, p in providers.items() if path.startswith(prefix)), None)
        got = measured.get((name, provider, str(dtype).removeprefix("torch."), batch, features, classes))
        if got is not None:
            ms, device, folder = got
            lines.append(f"   MEASURED {path.split(' ')[0].rstrip(':')}: {ms:.2f} ms on {device} (bench/results/{folder}) = "
                         f"{ms / (wall * 1e3):.2f} x this estimate")  # fmt: skip
    return "\n".join(lines or [f"   (no GPU measurement of {name} at this shape in bench/results)"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--dtype", choices=tuple(sm90.DTYPE_NAMES), default="bf16")
    parser.add_argument("--head", default="CurricularFace")
    args = parser.parse_args(argv)
    sm90.use_h100_target()
    dtype = sm90.DTYPE_NAMES[args.dtype]
    host = None
    measured = measured_steps()
    for classes in args.classes:
        for batch in args.batch:
            text, walls, host = report(batch, classes, args.features, dtype, args.head, host)
            print(text)
            print(measured_text(args.head, batch, args.features, classes, dtype, walls, measured) + "\n")
    print(constants_text(host) + "\n")
    print(update_text(args.features) + "\n")
    print(counted_update_text(max(args.batch), args.classes[0], args.features, host))


if __name__ == "__main__":
    main()
