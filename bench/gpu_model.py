"""Roofline model of one forward + backward of a margin-softmax head on an H100 SXM: an ESTIMATE, not a
measurement (no GPU has timed these kernels yet).

Usage: ``python bench/gpu_model.py [--batch 1024] [--features 512] [--classes 1000000 10000000] [--dtype bf16]
[--compile]``. With ``--compile`` (a process without TRITON_INTERPRET) each Triton kernel's line also shows its
sm_90 build facts (registers, spills, the MMA instruction: facekernels/benchmark/sm90.py); a kernel that spills
or misses wgmma is then modelled at mma.sync speed.

What it counts, per Triton kernel and per cuBLAS call of the fused path, and per pass of eager PyTorch and of
torch.compile(eager): tensor-core FLOPs, bytes between L2 and the SMs (from the tile sizes the code launches:
each (row block, class tile) pair streams its two operand tiles over the K = d loop), HBM bytes, and
exponentials. A kernel's time is the largest of FLOPs / (peak x efficiency), L2 bytes / L2 bandwidth, HBM bytes /
HBM bandwidth and exponentials / MUFU rate (each resource overlaps the others: a roofline, not a sum).

The tile configurations and the chunk size are read from the code (facekernels/kernels/triton: the launches
captured on meta tensors by sm90.capture), not copied here. The hardware figures below are assumptions, each
with its source; the L2 bandwidth is the least certain, so the total is also printed at 5.5 and 10 TB/s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from facekernels.benchmark import sm90  # noqa: E402
from facekernels.kernels import triton as tk  # noqa: E402

# ---- H100 SXM5 (assumptions) -------------------------------------------------------------------------------
TENSOR_PEAK = {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12}  # dense FLOP/s, NVIDIA H100 datasheet
CUBLAS_EFFICIENCY = 800 / 989  # a large bf16 GEMM reaches ~800 TFLOP/s (the figure)
WGMMA_EFFICIENCY = 0.70  # a Triton wgmma main loop with a fused epilogue: assumed, below cuBLAS
MMA_SYNC_EFFICIENCY = 0.35  # a kernel on mma.sync (or spilling): assumed, about half
HBM_BW = 3.35e12 * 0.9  # HBM3 3.35 TB/s peak (datasheet), ~90% reachable by streaming kernels
L2_BW = 7.2e12  # L2 -> SM: ~5.5 TB/s measured on H100 PCIe (chipsandcheese, 2023: 114 SMs, 1.755 GHz)
#                  scaled to SXM's 132 SMs at 1.98 GHz; uncertain, hence the sensitivity lines
MUFU_RATE = 16 * 132 * 1.98e9  # ex2 per second: 16 per clock per SM (4 per SM sub-partition)
GPU_GAP = 2e-6  # per kernel / cuBLAS call on the GPU: the bubble between back-to-back kernels (assumed)
HOST_OP = 6e-6  # per torch op / launch on the host (eager dispatch + launch, assumed): the host enqueues ahead
#                 of the GPU, so a step takes max(GPU time, host time)
CUBLAS_TILE = (256, 256)  # effective operand reuse of cuBLAS on Hopper (128 x 256 tiles, 2-CTA multicast)


@dataclass
class Line:
    name: str
    flops: float = 0.0
    precision: str = "bf16"
    efficiency: float = WGMMA_EFFICIENCY
    l2_bytes: float = 0.0
    hbm_bytes: float = 0.0
    exps: float = 0.0
    calls: int = 1
    facts: str = ""

    def time(self, l2_bw: float = L2_BW) -> float:
        t = max(
            self.flops / (TENSOR_PEAK[self.precision] * self.efficiency) if self.flops else 0.0,
            self.l2_bytes / l2_bw,
            self.hbm_bytes / HBM_BW,
            self.exps / MUFU_RATE,
        )
        return max(t, self.calls * GPU_GAP)

    def bound(self, l2_bw: float = L2_BW) -> str:
        parts = {"tensor": self.flops / (TENSOR_PEAK[self.precision] * self.efficiency) if self.flops else 0.0,
                 "L2": self.l2_bytes / l2_bw, "HBM": self.hbm_bytes / HBM_BW, "MUFU": self.exps / MUFU_RATE}
        return max(parts, key=parts.get)


def _gemm(name, m, n, k, elem, out_elem, calls=1, precision="bf16", resident_in=False, resident_out=False):
    """One cuBLAS GEMM (m x k) @ (k x n) (or ``calls`` of them adding up to it): operand traffic through L2 at
    cuBLAS's tile reuse; the (m x k) operand and the output cross HBM unless they are L2-resident chunk
    buffers (``resident_in`` / ``resident_out``); the (k x n) operand is read from HBM once."""
    tm, tn = CUBLAS_TILE
    l2 = (m * k * math.ceil(n / tn) + n * k * math.ceil(m / tm)) * elem + m * n * out_elem
    hbm = (0 if resident_in else m * k * elem) + n * k * elem + (0 if resident_out else m * n * out_elem)
    return Line(name, flops=2.0 * m * n * k, precision=precision, efficiency=CUBLAS_EFFICIENCY, l2_bytes=l2,
                hbm_bytes=hbm, calls=calls)


def _tiled(name, launch, rows, classes, features, elem, passes_w_from_hbm=1.0, extra_hbm=0.0, exps=0.0,
           precision="bf16", calls=1):
    """A Triton tl.dot kernel over (rows x classes): over its K loop a program streams its BLOCK_B x d tile of x
    once per class step (BLOCK_C classes, 2 x BLOCK_C when PAIRED) and each BLOCK_C x d tile of W once per
    row block, all from L2; W comes from HBM about once (row blocks run together), x stays in L2."""
    kernel, grid, args, meta = launch
    bb, bc = meta["BLOCK_B"], meta["BLOCK_C"]
    step = bc * (2 if meta.get("PAIRED") else 1)
    l2 = (rows * math.ceil(classes / step) + classes * math.ceil(rows / bb)) * features * elem
    return Line(name, flops=2.0 * rows * classes * features, precision=precision, l2_bytes=l2,
                hbm_bytes=passes_w_from_hbm * classes * features * elem + extra_hbm, exps=exps, calls=calls,
                facts=f"tile {bb} x {bc}{' x 2 paired' if meta.get('PAIRED') else ''} x {meta['BLOCK_K']}, "
                      f"{meta['num_warps']} warps, {meta['num_stages']} stages")  # fmt: skip


def fused_lines(batch, classes, features, dtype):
    """The fused path as the code launches it: tiles, grids and chunk size from the captured launches."""
    elem = torch.tensor([], dtype=dtype).element_size()
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32"}[dtype]
    launches = sm90.capture(batch, classes, features, dtype, sm90.Variant(2))
    forward = next(launch for launch in launches if launch[0].fn.__name__ == "_lse_partial_kernel")
    chunk = tk.KERNELS.chunk_classes(batch, classes, dtype)
    chunks = math.ceil(classes / chunk)
    gemm_elem = tk._gemm_dtype(dtype).itemsize
    gemm_precision = "bf16" if gemm_elem == 2 else "tf32"
    bc = batch * classes
    # the chunk's float32 dots, D and W chunk stay in L2 between the calls that write and read them (their
    # sizes: CHUNK_BYTES + half that + chunk x d): their traffic is L2 traffic, not HBM
    lines = [
        Line("inv_norms (x and W)", hbm_bytes=(batch + classes) * features * elem, calls=2),
        Line("target cosine, phi, t (torch, O(B d))", hbm_bytes=2 * batch * features * elem, calls=12),
        _tiled("forward: _lse_partial_kernel", forward, batch, classes, features, elem, exps=bc,
               precision=precision),  # fmt: skip
        Line("forward: combine splits, loss (torch)", hbm_bytes=batch * 66 * 8, calls=6),
        _gemm(f"backward: cuBLAS dots = X @ W_chunk^T (fp32 out) x {chunks}", batch, classes, features, elem, 4,
              calls=chunks, precision=precision, resident_out=True),
        Line(f"backward: _grad_logits_kernel, sum of k x {chunks}", l2_bytes=bc * (4 + gemm_elem), exps=bc,
             calls=2 * chunks,
             facts=f"elementwise {tk.GRAD_BLOCK_B} x {tk.GRAD_BLOCK_C}, {tk.GRAD_WARPS} warps"),
        _gemm(f"backward: cuBLAS dX += D @ W_chunk x {chunks}", batch, features, classes, gemm_elem, 4,
              calls=2 * chunks,
              precision=gemm_precision, resident_in=True),
        _gemm(f"backward: cuBLAS dW_chunk = D^T @ X x {chunks}", classes, features, batch, gemm_elem, elem,
              calls=chunks, precision=gemm_precision, resident_in=True),
        Line(f"backward: dW rank-1 correction (addcmul_) x {chunks}", l2_bytes=3 * classes * features * elem,
             hbm_bytes=classes * features * elem, calls=chunks),
        Line("backward: dx normalisation (torch, O(B d))", hbm_bytes=6 * batch * features * 4, calls=6),
    ]
    if dtype == torch.float16:
        lines.append(Line("backward: X, W chunk cast to bfloat16 for the GEMMs",
                          l2_bytes=2 * classes * features * elem, calls=2 * chunks))  # fmt: skip
    return lines, launches


def eager_lines(batch, classes, features, dtype, compiled=False):
    """Eager PyTorch (facekernels.reference) or torch.compile of it: the three GEMMs at cuBLAS speed plus the
    passes over the (B, C) logits. Eager: normalised copy of W, and per elementwise op a read and a write of
    (B, C) (clamp, gather / scatter of the target, scale, log-sum-exp, and their backward: ~16 passes at the
    logits' dtype, float32 where autocast or the reduction upcasts). torch.compile fuses the elementwise chain:
    one write by the GEMM, one read by the fused softmax forward, a read and a write in the backward's fused
    softmax gradient (4 passes)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    bc = batch * classes
    passes = 4 if compiled else 16
    precision = "tf32" if dtype == torch.float32 else "bf16"
    prefix = "torch.compile" if compiled else "eager"
    return [
        Line(f"{prefix}: normalise W (copy)", hbm_bytes=(2 if compiled else 4) * classes * features * elem, calls=4),
        _gemm(f"{prefix}: cuBLAS logits = x_hat @ w_hat^T", batch, classes, features, elem, elem, precision=precision),
        Line(f"{prefix}: {passes} passes over the (B, C) logits", hbm_bytes=passes * bc * elem, exps=2 * bc,
             calls=passes),
        _gemm(f"{prefix}: cuBLAS dX = G @ w_hat", batch, features, classes, elem, elem, precision=precision),
        _gemm(f"{prefix}: cuBLAS dW = G^T @ x_hat", classes, features, batch, elem, elem, precision=precision),
        Line(f"{prefix}: normalisation backward of W", hbm_bytes=(3 if compiled else 6) * classes * features * elem,
             calls=3),
    ]


def _attach_facts(lines, launches):
    """--compile: the sm_90 facts of each captured Triton launch, and the mma.sync / spill penalty."""
    sm90.use_h100_target()
    for launch in launches:
        facts = sm90.compile_launch(*launch)
        for line in lines:
            if facts["kernel"] in line.name:
                ok = facts["ptx_wgmma"] and not facts["spill_bytes"]
                line.facts += (f"; sm_90: {facts['registers']} regs, {facts['spill_bytes']} B spilled, "
                               f"{','.join(facts['sass_mma']) or 'no MMA'}")  # fmt: skip
                if line.flops and not ok:
                    line.efficiency = MMA_SYNC_EFFICIENCY


def report(batch, classes, features, dtype, compile_facts=False):
    fused, launches = fused_lines(batch, classes, features, dtype)
    if compile_facts:
        _attach_facts(fused, launches)
    floor = 6.0 * batch * classes * features / (TENSOR_PEAK["bf16"] * CUBLAS_EFFICIENCY)
    out = [f"ESTIMATE (roofline model, not measured) — H100 SXM, B = {batch}, d = {features}, C = {classes:,}, "
           f"{str(dtype).removeprefix('torch.')}", ""]
    out.append(f"{'kernel / call':58} {'ms':>8} {'bound':>6}  {'TFLOP':>7} {'L2 GB':>7} {'HBM GB':>7}  notes")
    totals = {}
    for title, lines in (("fused (backend='triton')", fused),
                         ("eager PyTorch (backend='reference')", eager_lines(batch, classes, features, dtype)),
                         ("torch.compile(eager)", eager_lines(batch, classes, features, dtype, compiled=True))):
        out.append(f"-- {title}")
        for line in lines:
            out.append(f"{line.name:58} {line.time() * 1e3:8.3f} {line.bound():>6}  {line.flops / 1e12:7.1f} "
                       f"{line.l2_bytes / 1e9:7.1f} {line.hbm_bytes / 1e9:7.2f}  {line.facts}")  # fmt: skip
        total = _total(lines)
        totals[title] = lines
        host = sum(line.calls for line in lines) * HOST_OP
        out.append(f"{'   total (estimate)':58} {total * 1e3:8.3f}   = {total / floor:.2f} x the 3-GEMM floor "
                   f"(host: {sum(line.calls for line in lines)} calls, {host * 1e3:.2f} ms)")
    out.append("")
    out.append(f"3-GEMM floor: 6 B C d = {6 * batch * classes * features / 1e12:.2f} TFLOP at "
               f"{TENSOR_PEAK['bf16'] * CUBLAS_EFFICIENCY / 1e12:.0f} TFLOP/s = {floor * 1e3:.2f} ms")
    for bw in (5.5e12, 10e12):
        t = _total(fused, bw)
        out.append(f"sensitivity: fused total at L2 {bw / 1e12:.1f} TB/s: {t * 1e3:.2f} ms = {t / floor:.2f} x floor")
    return "\n".join(out), _total(fused) / floor


def _total(lines, l2_bw=L2_BW):
    """GPU time of the lines in sequence, or the host's time to enqueue them if that is longer."""
    return max(sum(line.time(l2_bw) for line in lines), sum(line.calls for line in lines) * HOST_OP)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="add the sm_90 build facts of each Triton kernel")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for classes in args.classes:
        text, _ = report(args.batch, classes, args.features, dtype, args.compile)
        print(text + "\n")


if __name__ == "__main__":
    main()
