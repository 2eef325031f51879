"""The Triton heads' tile shapes, timed on a GPU: which (rows, classes, K step, warps, stages) makes the forward
(``_lse_partial_kernel``) and the fused backward (``_grad_logits_kernel``) fastest on this device.

tile_config / _fused_tiles (facekernels/kernels/triton/__init__.py) are the widest tiles that compile for sm_90
without spills: chosen statically, never timed before the H200 run of 2026-12-04, where the profile put the two
kernels at 5.2 and 8.3 ms of a 19.7 ms CurricularFace step (B = 1024, C = 1M, bf16) against 1.4 ms each for a
GEMM of their shape at the tensor cores' rate. The backward's variants force the fused recompute (``_fused``),
then time the path without it (cuBLAS's dots), at three row tiles of its elementwise kernel. Each variant's loss and gradients are compared with the default's
(a fast but wrong tile is reported as such).

    python bench/gpu_tile_sweep.py [--head CurricularFace] [--batch 1024] [--classes 1000000] [--seconds 80]
    TRITON_INTERPRET=1 python bench/gpu_tile_sweep.py --device cpu --batch 70 --classes 300  # plumbing only
"""

from __future__ import annotations

import argparse
import time

import torch
from gpu_step_profile import rel  # bench/, this script's folder, is on the path

# (block_b, block_c, block_k, num_warps, num_stages): the defaults first, then the most likely improvements
FORWARD = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 3),
           (128, 64, 64, 4, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4),
           (256, 128, 64, 8, 3)]  # fmt: skip
BACKWARD = [(128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 4), (128, 64, 64, 4, 3),
            (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (256, 64, 64, 8, 3)]  # fmt: skip


def timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=150, return_mode="median")

    def once(fn):  # the plumbing check: one call, wall time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return once


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head", default="CurricularFace")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seconds", type=float, default=80.0, help="stop starting variants after this long")
    args = p.parse_args()
    import facekernels
    from facekernels.kernels import triton as tk

    dev, dt = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    start = time.monotonic()
    stop_forward, stop = start + 0.4 * args.seconds, start + args.seconds  # the backward's kernel takes longer
    bench = timer(dev)
    gen = torch.Generator(dev).manual_seed(0)
    module = getattr(facekernels, args.head)(args.features, args.classes, backend="triton").to(dev, dt).train()
    x = torch.randn(args.batch, args.features, device=dev, dtype=dt, generator=gen).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.batch,), device=dev, generator=gen)
    t0 = module.t.clone() if hasattr(module, "t") else None

    def step():
        x.grad = None
        module.weight.grad = None
        if t0 is not None:
            module.t.copy_(t0)  # every variant sees the same t (CurricularFace moves it each training step)
        loss = module(x, labels)
        loss.backward()
        return loss

    def forward():
        with torch.no_grad():
            return module(x, labels)

    def grads():
        loss = step()
        return loss.detach().clone(), x.grad.clone(), module.weight.grad.clone()

    print(f"device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{args.head}, B={args.batch}, C={args.classes}, d={args.features}, {dt}")  # fmt: skip
    want = grads()
    real_tile_config, real_fused_tiles, real_block_c = tk.tile_config, tk._fused_tiles, tk.FUSED_BLOCK_C

    def report(kind, cfg, timed):
        try:
            ms = bench(timed)
            got = grads()
            errors = ", ".join(f"{n} {rel(g, w):.1e}" for n, g, w in zip(("loss", "dX", "dW"), got, want))
            print(f"  {kind} {cfg}: {ms:8.3f} ms   vs default: {errors}", flush=True)
        except Exception as e:  # noqa: BLE001 -- a tile that does not compile or run is a finding, not a stop
            print(f"  {kind} {cfg}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)

    print("forward (no_grad), tile_config = (block_b, block_c, block_k, warps, stages):")
    for cfg in FORWARD:
        if time.monotonic() > stop_forward:
            print("  (out of time)")
            break
        tk.tile_config = lambda batch, dtype, subcenters=1, c=cfg: tk.TileConfig(*c)
        try:
            report("forward", cfg, forward)
        finally:
            tk.tile_config = real_tile_config
    report("step", "as configured (the default)", step)
    print("training step (forward at the default tiles), the backward's fused recompute at _fused_tiles:")
    real_fused = tk._fused
    tk._fused = lambda subcenters: subcenters == 1
    try:
        for cfg in BACKWARD:
            if time.monotonic() > stop:
                print("  (out of time)")
                break
            tk._fused_tiles, tk.FUSED_BLOCK_C = (lambda batch, dtype, c=cfg: tk.TileConfig(*c)), cfg[1]
            try:
                report("step", cfg, step)
            finally:
                tk._fused_tiles, tk.FUSED_BLOCK_C = real_fused_tiles, real_block_c
        tk._fused = lambda subcenters: False
        report("step", "cuBLAS float32 dots + elementwise kernel (never fused)", step)
        real_rows = tk.GRAD_BLOCK_B
        for rows in (64, 32):  # the elementwise kernel's rows a step (default 128, what the H200 timed)
            tk.GRAD_BLOCK_B = rows
            try:
                report("step", f"never fused, elementwise kernel at {rows} rows", step)
            finally:
                tk.GRAD_BLOCK_B = real_rows
    finally:
        tk._fused = real_fused

if __name__ == "__main__":
    main()
