"""One training step of a GPU head, measured on a CUDA device: what sm90.count_step predicts without one.

For each batch size: the CUDA kernels one forward + backward launches (torch.profiler), against the count
made on meta tensors (facekernels.benchmark.sm90.count_step); the step's median time (do_bench, L2 flushed)
for the fused head, with backward chunks of 40 MiB (L2-sized), 160 MiB and 2.5 GiB beside the default, the step
replayed from a CUDA graph,
and the three bare GEMMs of its shapes (the floor); and the loss and gradients against the eager reference on
the same inputs (relative errors).

    python bench/gpu_step_profile.py [--head CurricularFace] [--batch 1024 256] [--classes 1000000]
"""

from __future__ import annotations

import argparse
import collections

import torch


def step_fn(module, x, labels):
    def step():
        x.grad = None
        module.weight.grad = None
        module(x, labels).backward()

    return step


def kernels_of(fn) -> dict:
    """{CUDA kernel name: [launches, GPU microseconds]} of one call of fn (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], acc_events=True) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy"):
            entry = kernels[e.name[:70]]
            entry[0] += 1
            entry[1] += e.device_time_total  # a kernel has no children: its own time, microseconds
    return dict(kernels)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    import facekernels
    from triton.testing import do_bench

    from facekernels.benchmark import sm90
    from facekernels.kernels import triton as tk

    p = argparse.ArgumentParser()
    p.add_argument("--head", default="CurricularFace")
    p.add_argument("--batch", type=int, nargs="+", default=[1024, 256])
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=512)
    args = p.parse_args()
    dev, dt, d, c = torch.device("cuda"), torch.bfloat16, args.features, args.classes
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.head}, d={d}, C={c}, bf16")
    for b in args.batch:
        torch.manual_seed(b)
        module = getattr(facekernels, args.head)(d, c, backend="triton").to(dev, dt).train()
        # a generator of its own: a failed graph capture leaves the default CUDA generator unusable (the H200 run
        # of 2026-12-04 stopped at the next torch.randn: "Offset increment outside graph capture")
        gen = torch.Generator(dev).manual_seed(b)
        x = torch.randn(b, d, device=dev, dtype=dt, generator=gen).requires_grad_(True)
        labels = torch.randint(0, c, (b,), device=dev, generator=gen)
        step = step_fn(module, x, labels)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        got = kernels_of(step)
        launches, busy_us = sum(n for n, _ in got.values()), sum(us for _, us in got.values())
        try:  # a counting failure must not cost the measurements (torch 2.11 failed in it once: sm90.py)
            predicted = sm90.count_step(b, c, d, dt, head=args.head)
            prediction = f"{predicted.launches()}, {predicted.summary()['launches_by_phase']}"
        except Exception as e:  # noqa: BLE001 -- report, do not stop the measurements
            prediction = f"not counted: {type(e).__name__}: {str(e)[:120]}"
        print(f"\nB={b}: CUDA kernels launched per step {launches} (meta-count prediction: {prediction}); "
              f"GPU busy {busy_us / 1e3:.2f} ms of the profiled step")
        print("  launches  GPU ms  kernel (the 15 that took longest)")
        for name, (n, us) in sorted(got.items(), key=lambda kv: -kv[1][1])[:15]:
            print(f"  {n:8d}  {us / 1e3:6.3f}  {name}")
        fused_ms = do_bench(step, warmup=50, rep=300, return_mode="median")
        # the backward's class chunks: L2-sized (40 MiB: many chunks, many host calls) up to far larger than the
        # default (fewer host calls, D through HBM): which wins is this GPU's and its host's to say
        default_bytes, by_chunk = tk.CHUNK_BYTES, []
        for budget in (40 * 2**20, 160 * 2**20, 2560 * 2**20):
            tk.CHUNK_BYTES = budget
            try:
                chunks = -(-c // tk.KERNELS.chunk_classes(b, c, dt))
                by_chunk.append(f"{budget >> 20} MiB: {do_bench(step, warmup=50, rep=300, return_mode='median'):.3f} "
                                f"ms ({chunks} chunks)")  # fmt: skip
            finally:
                tk.CHUNK_BYTES = default_bytes
        chunks = -(-c // tk.KERNELS.chunk_classes(b, c, dt))
        print(f"  step ms by CHUNK_BYTES: {default_bytes >> 20} MiB (default): {fused_ms:.3f} ms ({chunks} chunks); "
              + "; ".join(by_chunk))  # fmt: skip
        w = module.weight.detach()
        xd = x.detach()
        g = torch.randn(b, c, device=dev, dtype=dt, generator=gen) if b * c * 2 < 8 * 2**30 else None
        floor_ms = float("nan")
        if g is not None:  # logits X W^T, dX = G W, dW = G^T X
            floor_ms = do_bench(lambda: (xd @ w.t(), g @ w, g.t() @ xd), warmup=50, rep=300, return_mode="median")
            del g
        graph_ms = float("nan")
        try:  # the step replayed from a CUDA graph: no host launch cost (a graph needs static inputs)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph_ms = do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- report, do not stop the other measurements
            print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        print(f"  step ms: fused {fused_ms:.3f}, fused as CUDA graph {graph_ms:.3f}, 3 GEMMs {floor_ms:.3f}; "
              f"fused / floor {fused_ms / floor_ms:.2f}, graph / floor {graph_ms / floor_ms:.2f}")
        # correctness on the GPU against the eager reference (same weight, inputs)
        ref = getattr(facekernels, args.head)(d, c, backend="reference").to(dev, dt).train()
        ref.load_state_dict(module.state_dict())
        x.grad = None
        module.weight.grad = None
        loss = module(x, labels)
        loss.backward()
        gx, gw = x.grad.clone(), module.weight.grad.clone()
        xr = x.detach().clone().requires_grad_(True)
        loss_r = ref(xr, labels)
        loss_r.backward()
        print(f"  vs eager reference (bf16 both): loss rel {rel(loss, loss_r):.2e}, dX rel {rel(gx, xr.grad):.2e}, "
              f"dW rel {rel(gw, ref.weight.grad):.2e}")
        del module, ref, x, gx, gw
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
