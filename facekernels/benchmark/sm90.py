"""The Triton launches the GPU heads really make, compiled for an H100 (sm_90) without a GPU.

``capture`` runs the host code of ``facekernels.kernels.triton`` (the functions its ops call) on meta tensors of
the target shapes, with ``CAPTURED_LAUNCHES`` set, so every launch (kernel, grid, arguments, tiles, warps,
stages) is recorded instead of run: the configurations come from the code, not from a copy of them.
``compile_launch`` hands each launch to the kernel's own JIT (``JITFunction.warmup``: the JIT's specialisation
of pointers and integers, 16-byte divisibility included) against a stand-in CUDA driver that reports an sm_90
target, and reads the facts of the cubin with the cuobjdump that ships with triton: registers, spill bytes,
the MMA instructions of its SASS and of its PTX.

``count_step`` counts what one training step (forward + backward of a head) asks of a GPU: it runs the step on meta
tensors standing for CUDA tensors, with the Triton launches captured, under a TorchDispatchMode that sorts every
op into GPU launches (Triton, cuBLAS, other torch kernels), calls that launch nothing (views, allocations, host
ops), ``torch.library.custom_op`` dispatches and host syncs (``.item()``, ``bool(tensor)``, ``.tolist()``,
``nonzero``...: a meta tensor has no value to read, so each is recorded with where it happened, or raised).

Used by tests/test_gpu_static.py (every kernel holding a tl.dot lowers to wgmma with zero spills, on the newest
triton and on 3.6.0, the GPU machine's), tests/test_gpu_model.py (the step's counts) and by bench/gpu_model.py
(the model, a function of the counted calls). Run it as ``python -m facekernels.benchmark.sm90`` (without
TRITON_INTERPRET) for one JSON line per compiled variant, or ``python -m facekernels.benchmark.sm90 --count
[--head CurricularFace --batch 1024 --features 512 --classes 1000000 --dtype bf16 --backend triton]`` for the
counts of one step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Target shapes of the static check (issue "GPU heads at GEMM speed", item 4): B in {256, 1024}, d in {128, 256,
# 512}, every dtype and kernel variant, C = 1M and an odd C (the JIT specialises C on divisibility by 16).
BATCHES = (256, 1024)
FEATURES = (128, 256, 512)
REPORT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
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
    inverse norms, the per-row pre-pass (an angular margin with its fallback; MV-Softmax's variant a linear one;
    CurricularFace's with the t update), the log-sum-exp, and the logits gradient of the first and of the last
    backward chunk (chunks as the algorithm cuts them: facekernels/_algorithm.py)."""
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
        tk.inv_norms(w)
        valid = torch.empty(batch, dtype=torch.bool, **meta)
        tk.target_rows(x, w, cols, target, valid, t, 0.9, 0.4, 0.0, -0.9, 0.2, 1.0, variant.negatives == 1, True,
                       False, k, 0.01 if variant.negatives == 2 else None)  # fmt: skip
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


def report(batches=BATCHES, features=FEATURES, dtypes=REPORT_DTYPES, variants=VARIANTS, classes=CLASSES):
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


# ------------------------------------------------------------------------------------------ the step counter

# cuBLAS (or cuBLASLt) calls: one GEMM launch each (split-K's reduction, when cuBLAS picks it, is inside the call)
GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_scaled_mm",
                      "_addmm_activation", "_int_mm"})  # fmt: skip
# Ops that only take memory from the caching allocator (no kernel; a fill, if any, is a separate op)
ALLOC_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "empty_permuted",
                       "resize_", "resize_as_"})  # fmt: skip
# Ops whose result size or value the host must read from the device: a sync on CUDA (meta has no data)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive", "equal"})  # fmt: skip
# Ops that read rows / elements of their first tensor by index
GATHER_OPS = frozenset({"index_select", "gather", "embedding", "index", "take", "_unsafe_index"})
# Triton kernels that read rows of a tensor argument by index: {kernel: {argument: the argument holding the rows}}
GATHERING_KERNELS = {"_target_rows_kernel": {"W": "target_ptr", "inv_w_ptr": "target_ptr"}}
KINDS = ("triton", "gemm", "kernel", "custom_op", "view", "alloc", "host", "sync")
LAUNCH_KINDS = ("triton", "gemm", "kernel")


class HostSyncError(RuntimeError):
    """A counted step read a device value on the host (``on_sync="raise"``)."""


class Call(NamedTuple):
    """One counted call. ``kind``: "triton" (a Triton launch; ``args`` its runtime arguments, ``constexprs`` its
    compile-time ones), "gemm" (a cuBLAS call), "kernel" (any other torch op that launches a CUDA kernel: one
    per op is assumed), "custom_op" (a torch.library.custom_op dispatch: host cost only, its ops are counted
    too), "view" / "alloc" (no launch: metadata or caching-allocator work), "host" (no tensor result, or only
    CPU tensors), "sync" (a device -> host read)."""

    kind: str
    name: str
    phase: str
    args: int = 0
    constexprs: int = 0
    where: str = ""
    bytes: int = 0  # "kernel", "gemm": elements of its tensor inputs and outputs (broadcast dims once) x their sizes
    gemm: tuple = ()  # "gemm": (batch, m, n, k, operand bytes, output bytes)
    launch: tuple | None = None  # "triton": the captured (kernel, grid, args, meta)
    # GPU calls: the memory they touch, ((storage, first element, end), bytes, written) per tensor, for a cache
    # model (bench/gpu_model.py). A Triton launch writes the tensors allocated for it and not touched before.
    touches: tuple = ()


@dataclass
class StepCount:
    """The calls of one counted step, in order."""

    calls: list = field(default_factory=list)

    def count(self, kind: str, phase: str | None = None) -> int:
        return sum(1 for c in self.calls if c.kind == kind and phase in (None, c.phase))

    def launches(self, phase: str | None = None) -> int:
        """GPU kernel launches: Triton + cuBLAS + other torch kernels."""
        return sum(self.count(kind, phase) for kind in LAUNCH_KINDS)

    @property
    def syncs(self) -> list:
        return [c for c in self.calls if c.kind == "sync"]

    def by_name(self, kind: str, phase: str | None = None) -> collections.Counter:
        return collections.Counter(c.name for c in self.calls if c.kind == kind and phase in (None, c.phase))

    def summary(self) -> dict:
        phases = sorted({c.phase for c in self.calls})
        return {
            "launches": self.launches(),
            "launches_by_phase": {p: self.launches(p) for p in phases},
            **{kind: self.count(kind) for kind in KINDS},
            "triton_kernels": dict(self.by_name("triton")),
            "triton_args": sorted({(c.name, c.args, c.constexprs) for c in self.calls if c.kind == "triton"}),
            "gemm_ops": dict(self.by_name("gemm")),
            "torch_kernels": dict(self.by_name("kernel").most_common()),
            "custom_ops": dict(self.by_name("custom_op")),
            "sync_sites": [f"{c.name} at {c.where}" for c in self.syncs],
        }


def _caller() -> str:
    """The innermost facekernels frame outside this module: where a sync was asked for."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != here and os.sep + "facekernels" + os.sep in path:
            return f"{path.split(os.sep + 'facekernels' + os.sep, 1)[1]}:{frame.lineno} ({frame.name})"
    return "outside facekernels"


def _tensors(tree) -> list:
    return [a for a in torch.utils._pytree.tree_leaves(tree) if isinstance(a, torch.Tensor)]


class StepCounter(TorchDispatchMode):
    """Counts the calls of the code run inside it (see ``Call``); meta tensors stand for CUDA tensors.

    A ``torch.library.custom_op`` is counted once and then run through its own Python implementation (under
    this mode, so its ops and launches count too), as it runs on CUDA; its fake (meta) implementation is never
    used. A host sync is recorded with the facekernels line that asked for it and answered with a stand-in
    (0 / False, an empty ``nonzero``, zeros copied to the host), or, with ``on_sync="raise"``, raises
    HostSyncError there."""

    def __init__(self, on_sync: str = "record"):
        super().__init__()
        if on_sync not in ("record", "raise"):
            raise ValueError(f"on_sync must be 'record' or 'raise'; got {on_sync!r}")
        self.on_sync = on_sync
        self.phase = "step"
        self.result = StepCount()
        # storages (by address) allocated in the step, and touched by a GPU call since. No reference to a tensor
        # is kept: that would change what the step does (autograd copies a gradient that is referenced elsewhere
        # instead of taking it). A freed storage's address may come back for a new one, as the CUDA caching
        # allocator hands a freed block out again: an allocation starts its address afresh.
        self._allocated, self._touched = set(), set()

    def _touch(self, tensor: torch.Tensor, written: bool) -> tuple:
        storage = tensor.untyped_storage()._cdata
        self._touched.add(storage)
        start = tensor.storage_offset()
        end = start + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()) if n) + 1
        return (storage, start, end), _distinct_bytes(tensor), written

    def _add(self, kind, name, **extra):
        self.result.calls.append(Call(kind, name, self.phase, **extra))

    def launch(self, launch) -> tuple:
        """Count a Triton launch; returns it with stand-ins for its tensors (``_stand_in``), as it is kept."""
        kernel, grid, args, meta = launch
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.numel()]
        fresh = [a.untyped_storage()._cdata in self._allocated - self._touched for a in tensors]
        touches = tuple(self._touch(a, new) for a, new in zip(tensors, fresh))
        gathered = GATHERING_KERNELS.get(kernel.fn.__name__)
        if gathered:
            # rows read by index: as many rows as the index tensor has entries (times the sub-centers), not the
            # whole tensor
            names = list(inspect.signature(kernel.fn).parameters)
            by_id = {id(a): i for i, a in enumerate(tensors)}
            touches = list(touches)
            for source, index in gathered.items():
                a, rows = args[names.index(source)], args[names.index(index)]
                row_bytes = _distinct_bytes(a[:1]) if a.dim() > 1 else a.element_size()
                i = by_id[id(a)]
                touches[i] = (touches[i][0], min(touches[i][1], rows.numel() * meta.get("SUBCENTERS", 1) * row_bytes),
                              False)  # fmt: skip
            touches = tuple(touches)
        with _disable_current_modes():  # the stand-ins are not the step's: not counted
            launch = (kernel, grid, tuple(_stand_in(a) for a in args), meta)
        self._add("triton", kernel.fn.__name__, args=len(args), launch=launch, touches=touches,
                  constexprs=sum(1 for k in meta if k not in ("num_warps", "num_stages")))  # fmt: skip
        return launch

    def _sync(self, func, args, kwargs):
        where = _caller()
        self._add("sync", str(func), where=where)
        if self.on_sync == "raise":
            raise HostSyncError(f"host sync in the counted step: {func} at {where} (a device value read on the "
                                "host: .item(), bool(tensor), .tolist(), nonzero...)")  # fmt: skip
        name = func._schema.name.split("::")[1]
        if name == "_local_scalar_dense":
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0 if not (dtype.is_floating_point or dtype.is_complex) else 0.0
        if name == "nonzero":
            return torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
        if name == "masked_select":
            return args[0].new_empty(0)
        if name == "equal":
            return True
        if name in ("_to_copy", "copy_"):  # a copy to the host: zeros there
            out = args[0] if name == "copy_" else None
            if out is None:
                src = args[0]
                out = torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype, device="cpu")
            return out
        raise HostSyncError(f"host sync in the counted step: {func} at {where}, which has no stand-in value")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        qualname = func._schema.name
        namespace, name = qualname.split("::")
        if namespace not in ("aten", "prim", "prims"):
            from torch._library.custom_ops import OPDEFS

            self._add("custom_op", qualname)
            opdef = OPDEFS.get(qualname)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        to_host = (name in ("_to_copy", "copy_") and any(t.is_meta for t in inputs)
                   and (kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
                        or name == "copy_" and args[0].device.type == "cpu"))  # fmt: skip
        if name in SYNC_OPS or to_host:
            return self._sync(func, args, kwargs)
        meta_out = getattr(kwargs.get("out"), "is_meta", False)
        if qualname == "aten::addmm" and func._overloadname == "dtype_out" and meta_out:
            out = kwargs["out"]  # its result; torch 2.11's meta decomposition of this overload fails (on the H200)
        else:
            out = func(*args, **kwargs)
        results = _tensors(out)
        if name in GEMM_OPS:
            kind = "gemm"
        elif func.is_view or name in ("alias", "detach", "_unsafe_view", "lift_fresh", "set_"):
            kind = "view"
        elif name in ALLOC_OPS:
            kind = "alloc"
        elif not results or all(t.device.type == "cpu" for t in inputs + results):
            kind = "host"
        elif all(t.numel() == 0 for t in results):
            kind = "alloc"  # an empty result launches no kernel (e.g. autograd's zero gradient of an empty output)
        else:
            kind = "kernel"
        extra = {}
        if kind == "alloc":
            for t in results:
                self._allocated.add(t.untyped_storage()._cdata)
                self._touched.discard(t.untyped_storage()._cdata)
        if kind in ("gemm", "kernel"):
            written = {id(t) for t in results} | {id(t) for t in _tensors(kwargs.get("out"))}
            read = [t for t in inputs if id(t) not in written or name.endswith("_")]  # in place: read too
            touched = {id(t): t for t in read + results}.values()
            extra["touches"] = tuple(self._touch(t, id(t) in written) for t in touched if t.numel())
            if name in GATHER_OPS and results:
                # a gather reads as many of its source's elements as it writes, not the whole source
                source = extra["touches"][0]
                extra["touches"] = ((source[0], min(source[1], _distinct_bytes(results[0])), False),
                                    *extra["touches"][1:])  # fmt: skip
            extra["bytes"] = sum(t[1] for t in extra["touches"])
        if kind == "gemm":
            extra["gemm"] = _gemm_shape(name, args, results[0])
        self._add(kind, str(func), **extra)
        return out


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches of t: its elements, a broadcast (stride 0) dimension once."""
    return math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _gemm_shape(name: str, args, out: torch.Tensor) -> tuple:
    """(batch, m, n, k, operand element bytes, output element bytes) of a GEMM op."""
    a, b = {"addmm": args[1:3], "baddbmm": args[1:3], "addbmm": args[1:3], "addmv": args[1:3],
            "_addmm_activation": args[1:3]}.get(name, args[:2])  # fmt: skip
    batch = a.shape[0] if a.dim() == 3 else 1
    m = a.shape[-2] if a.dim() >= 2 else 1
    k = a.shape[-1]
    n = b.shape[-1] if b.dim() >= 2 else 1
    return batch, m, n, k, a.element_size(), out.element_size()


class _LaunchLog(list):
    """CAPTURED_LAUNCHES that also tells the counter, so that Triton launches are counted in order."""

    def __init__(self, counter: StepCounter):
        super().__init__()
        self._counter = counter

    def append(self, launch) -> None:
        super().append(self._counter.launch(launch))


def _stand_in(a):
    """A meta tensor with a's dtype, shape, strides and storage offset (all a compile reads of it: the offset
    decides the pointer's alignment), holding no reference to a. A kept launch must not keep the step's
    tensors alive: autograd takes a gradient that nothing else references and copies one that is (a kernel
    that writes a weight gradient would show an extra copy_ in the count that no GPU run makes)."""
    if not isinstance(a, torch.Tensor):
        return a
    end = a.storage_offset() + sum((n - 1) * st for n, st in zip(a.shape, a.stride()) if n) + (1 if a.numel() else 0)
    return torch.empty(end, dtype=a.dtype, device="meta").as_strided(a.shape, a.stride(), a.storage_offset())


@contextlib.contextmanager
def counting(on_sync: str = "record"):
    """``with counting() as counter:`` run code on meta tensors; ``counter.result`` holds its calls. Meta tensors
    stand for CUDA tensors while it is active: ``Tensor.is_cuda`` is True for them (so the code takes its CUDA
    branches: cuBLAS with a float32 result, no upcast copies), the triton backend accepts them and the input
    check lets them through; the Triton launches are captured (``tk.CAPTURED_LAUNCHES``), not run."""
    from .. import _validate
    from ..kernels import triton as tk

    counter = StepCounter(on_sync)
    saved = (tk.CAPTURED_LAUNCHES, _validate._check_not_meta)
    tk.CAPTURED_LAUNCHES = _LaunchLog(counter)
    _validate._check_not_meta = lambda name, x: None
    tk.KERNELS.compute_dtype = lambda embeddings, weight: torch.promote_types(embeddings.dtype, weight.dtype)
    torch.Tensor.is_cuda = property(lambda self: self.device.type in ("cuda", "meta"))
    try:
        with counter:
            yield counter
    finally:
        del torch.Tensor.is_cuda
        del tk.KERNELS.compute_dtype
        tk.CAPTURED_LAUNCHES, _validate._check_not_meta = saved


DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def count_step(batch: int = 1024, classes: int = 1_000_000, features: int = 512, dtype=torch.bfloat16,
               head: str = "CurricularFace", backend: str = "triton", on_sync: str = "record",
               optimizer: str | None = None, weight_dtype=None, **head_kwargs) -> StepCount:  # fmt: skip
    """The calls of one training step of ``head`` (a facekernels head class name) at this shape: forward
    (phase "forward") and backward of the mean loss (phase "backward"), in training mode, with meta tensors
    standing for CUDA ones (``counting``). ``backend="reference"`` counts the eager implementation.

    ``optimizer="sgd"``: with facekernels.optim.SGD (momentum 0.9, weight decay 5e-4) attached, the update
    fused into the backward (its calls: phase "update"), and its step() (phase "step"); ``"torch-sgd"``: torch.optim.SGD's step on the
    weight's gradient, and zero_grad. Either is counted at its second step (the first one creates the
    momentum). ``weight_dtype``: the head's weight (default ``dtype``; a float32 weight with bfloat16
    embeddings computes in float32)."""
    import facekernels

    if isinstance(dtype, str):
        dtype = DTYPE_NAMES[dtype]
    with torch.device("meta"):
        module = getattr(facekernels, head)(features, classes, backend=backend, **head_kwargs)
    module = module.to(weight_dtype or dtype).train()
    x = torch.empty(batch, features, dtype=dtype, device="meta", requires_grad=True)
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    settings = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = {None: lambda: None, "sgd": lambda: facekernels.optim.SGD(module, **settings),
           "torch-sgd": lambda: torch.optim.SGD(module.parameters(), **settings)}[optimizer]()  # fmt: skip
    with counting(on_sync) as counter:
        if optimizer == "sgd":
            update = opt._update_rows

            def tagged(*args, **kwargs):  # the fused update's calls: phase "update"
                phase, counter.phase = counter.phase, "update"
                try:
                    return update(*args, **kwargs)
                finally:
                    counter.phase = phase

            opt._update_rows = tagged
        for _ in range(2 if opt is not None else 1):
            counter.result = StepCount()
            counter.phase = "forward"
            loss = module(x, labels)
            counter.phase = "backward"
            loss.backward()
            if opt is not None:
                counter.phase = "step"
                opt.step()
                opt.zero_grad()
    return counter.result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="sm_90 facts of every launch (default), or the calls of one step")
    parser.add_argument("--count", action="store_true", help="count the calls of one forward + backward")
    parser.add_argument("--head", default="CurricularFace")
    parser.add_argument("--backend", default="triton", choices=("triton", "reference"))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dtype", choices=tuple(DTYPE_NAMES), default="bf16")
    args = parser.parse_args(argv)
    if args.count:
        counted = count_step(args.batch, args.classes, args.features, args.dtype, args.head, args.backend)
        print(json.dumps({"head": args.head, "backend": args.backend, "batch": args.batch, "classes": args.classes,
                          "features": args.features, "dtype": args.dtype, **counted.summary()}))  # fmt: skip
        return
    import triton

    print(json.dumps({"triton": triton.__version__}))
    for facts in report():
        print(json.dumps(facts))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
