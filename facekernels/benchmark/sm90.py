"""The Triton launches the GPU heads really make, compiled for an H100 (sm_90) without a GPU.

``capture`` runs the host code of ``facekernels.kernels.triton`` (the functions its ops call) on meta tensors of
the target shapes, with ``CAPTURED_LAUNCHES`` set, so every launch (kernel, grid, arguments, tiles, warps,
stages) is recorded instead of run: the configurations come from the code, not from a copy of them.
``compile_launch`` hands each launch to the kernel's own JIT (``JITFunction.warmup``: the JIT's specialisation
of pointers and integers, 16-byte divisibility included) against a stand-in CUDA driver that reports an sm_90
target, and reads the facts of the cubin with the cuobjdump that ships with triton: registers, spill bytes,
the MMA instructions of its SASS and of its PTX.

Used by tests/test_gpu_static.py (every kernel holding a tl.dot lowers to wgmma with zero spills, on the newest
triton and on 3.6.0, the GPU machine's) and by bench/gpu_model.py (the roofline model). Run it as
``python -m facekernels.benchmark.sm90`` (without TRITON_INTERPRET) for one JSON line per compiled variant.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch

# Target shapes of the static check (issue "GPU heads at GEMM speed", item 4): B in {256, 1024}, d in {128, 256,
# 512}, every dtype and kernel variant, C = 1M and an odd C (the JIT specialises C on divisibility by 16).
BATCHES = (256, 1024)
FEATURES = (128, 256, 512)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CLASSES = (1_000_000, 999_983)


# The kernels' variants (their constexprs): every negatives kind; insightface's inter-class filtering; three
# sub-centers (Sub-center ArcFace). AdaFace's cosine bound and the per-row margins are runtime values of these.
class Variant(NamedTuple):
    negatives: int
    filter_threshold: float = math.inf
    subcenters: int = 1


VARIANTS = (Variant(0), Variant(1), Variant(2), Variant(0, filter_threshold=0.4), Variant(0, subcenters=3))


class _H100Driver:
    """The part of triton's CUDA driver that the JIT asks for when it only compiles (warmup): the current device,
    stream and target. Nothing is loaded or launched."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("meta")


def use_h100_target() -> None:
    """Make triton compile for an H100 in this process (no GPU needed; nothing can be launched after it)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for sm_90 needs a process without TRITON_INTERPRET=1")
    from triton.runtime import driver

    driver.set_active(_H100Driver())


def capture(batch: int, classes: int, features: int, dtype: torch.dtype, variant: Variant):
    """Every launch one forward + backward of the head makes at this shape (meta tensors, nothing runs): the
    inverse norms, the log-sum-exp, and the logits gradient of the first and of the last backward chunk (chunks
    as the algorithm cuts them: facekernels/_algorithm.py)."""
    from ..kernels import triton as tk

    meta = dict(device="meta")
    k = variant.subcenters
    x = torch.empty(batch, features, dtype=dtype, **meta)
    w = torch.empty(classes * k, features, dtype=dtype, **meta)
    rows, cols = torch.empty(batch, **meta), torch.empty(classes * k, **meta)
    target = torch.empty(batch, dtype=torch.long, **meta)
    t = torch.empty((), **meta)
    chunk = tk.KERNELS.chunk_classes(batch, classes * k, dtype) // k
    last = (classes - 1) // chunk * chunk
    options = (64.0, variant.negatives, 0.2, 1.0, variant.filter_threshold, k)
    tk.CAPTURED_LAUNCHES = []
    try:
        tk.inv_norms(x)
        tk.inv_norms(w)
        tk.margin_lse(x, w, rows, cols, target, rows, rows, t, *options)
        for c0 in sorted({0, last}):
            part = slice(c0 * k, (c0 + chunk) * k)
            tk.grad_logits(rows, x, w[part], rows, cols[part], target, rows, rows, rows, t, rows, *options)
        return tk.CAPTURED_LAUNCHES
    finally:
        tk.CAPTURED_LAUNCHES = None


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_facts(cubin: bytes) -> dict:
    """Registers, stack / local (spill) bytes and the MMA instructions of an sm_90 cubin, by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, shared, local = (int(v) for v in found.groups())
    return dict(registers=regs, spill_bytes=stack + local, static_shared=shared,
                sass_mma=sorted(set(re.findall(r"\b(HGMMA\.[\w.]+|HMMA\.[\w.]+)", sass))),
                spill_instructions=len(re.findall(r"\b(?:STL|LDL)\b", sass)))  # fmt: skip


def compile_launch(kernel, grid, args, meta) -> dict:
    """Compile one captured launch for sm_90 through the kernel's JIT (its own specialisation) and report it."""
    compiled = kernel.warmup(*args, grid=grid, **meta)
    ptx = compiled.asm["ptx"]
    facts = cubin_facts(compiled.asm["cubin"])
    facts.update(
        kernel=kernel.fn.__name__,
        grid=list(grid),
        uses_dot="tt.dot" in compiled.asm["ttir"],  # a tl.dot anywhere, helpers included
        ptx_wgmma="wgmma.mma_async" in ptx,
        ptx_mma_sync="mma.sync" in ptx,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        constexprs={k: v for k, v in meta.items() if k.isupper() or k.startswith("BLOCK")},
        dtypes=sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)}),
        variant=id(compiled),
    )
    return facts


def report(batches=BATCHES, features=FEATURES, dtypes=DTYPES, variants=VARIANTS, classes=CLASSES):
    """Facts of every launch at every target shape (one dict per launch; ``variant`` tells which compiled
    binary it reuses: the JIT caches a specialisation once)."""
    use_h100_target()
    out = []
    for b in batches:
        for d in features:
            for dtype in dtypes:
                for v in variants:
                    for c in classes:
                        for launch in capture(b, c, d, dtype, v):
                            facts = compile_launch(*launch)
                            facts.update(batch=b, features=d, dtype=str(dtype).removeprefix("torch."),
                                         negatives=v.negatives, filter=v.filter_threshold != math.inf,
                                         subcenters=v.subcenters, classes=c)  # fmt: skip
                            out.append(facts)
    return out


if __name__ == "__main__":
    import triton

    print(json.dumps({"triton": triton.__version__}))
    for facts in report():
        print(json.dumps(facts))
    sys.stdout.flush()
