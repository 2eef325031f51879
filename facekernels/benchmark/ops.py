"""What is benchmarked: one ``setup(provider, shape, mode, device)`` per op, returning the step that both the
timer and the peak-memory measurement run.

Providers of an op:
- its fused backends ("cpu" / "triton" for the heads, "cpu" / "cuda" for the triplet loss), called through
  the public ``facekernels.functional`` API, found at run time: a backend that raises
  ``BackendUnavailableError`` / ``ExtensionUnavailableError`` is reported as unavailable;
- "eager": the same functional call with ``backend="reference"`` (``facekernels.reference``, the baseline
  the tests use; no second copy of its math here);
- "compile": ``torch.compile`` of the reference function, compiled in ``setup`` (outside the timing);
- "gemm": only the matrix products the op cannot avoid, the floor every fused kernel is compared with;
- "pml" (triplet only): pytorch-metric-learning's miner + TripletMarginLoss, the library people use today.

- "fused_sgd" (heads, "optim" mode only): the head module with ``facekernels.optim.SGD``, the update fused into
  its backward (no weight gradient).

Modes: "forward" (the loss, graph built as in training), "backward" (backward of a loss computed in setup,
``retain_graph=True``), "full" (forward + backward), "optim" (heads: forward + backward + the optimizer step
of the head's weight, SGD with arcface_torch's momentum 0.9 and weight decay 5e-4: ``torch.optim.SGD`` after
the fused ("cpu" / "triton") or the reference ("eager") head, the fused update for "fused_sgd"; the momentum
exists before the measured step, so the memory is the rise beyond weight and momentum). Inputs are random (never zeros), weights drawn like
the modules' ``normal_(0, 0.01)``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import torch

from .. import functional as fkf
from .._backends import BackendUnavailableError
from .._extension import ExtensionUnavailableError
from .._params import TripletParams
from .._rowmath import MarginState
from .._head_params import SPECS, head_params
from ..heads import module_class
from ..reference import heads as ref_heads
from ..reference import triplet as ref_triplet

UNAVAILABLE_ERRORS = (BackendUnavailableError, ExtensionUnavailableError)
MODES = ("forward", "backward", "full", "optim")
# the head optimizer of the "optim" mode: arcface_torch's SGD on the head
SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TRIPLET_MARGIN = 0.2
GiB = 2**30


@dataclass(frozen=True)
class HeadShape:
    head: str
    batch: int
    features: int
    classes: int
    dtype: str = "float32"


@dataclass(frozen=True)
class TripletShape:
    batch: int
    features: int
    per_class: int  # K samples of each identity in the batch (B / K identities)
    mining: str = "semihard"
    dtype: str = "float32"


def _make_step(loss_fn, grads: list, mode: str, copies: int):
    """Turn ``loss_fn(i)`` (the loss on input set i) into the timed step of ``mode``, rotating input sets."""
    counter = iter(range(1 << 62))

    def clear(i):
        for g in grads[i]:
            g.grad = None

    if mode == "forward":

        def step():
            loss_fn(next(counter) % copies)

    elif mode == "full":

        def step():
            i = next(counter) % copies
            clear(i)
            loss_fn(i).backward()

    else:
        losses = [loss_fn(i) for i in range(copies)]

        def step():
            i = next(counter) % copies
            clear(i)
            losses[i].backward(retain_graph=True)

    return step


def _compile(fn, mode: str):
    if mode == "backward":
        # donated buffers forbid retain_graph=True, which the backward-only timing needs
        torch._functorch.config.donated_buffer = False
    # dynamic shapes: one compilation serves every size of a sweep (compiling each size on 2 CPU cores
    # costs 15-40 s apiece)
    return torch.compile(fn, dynamic=True)


def _probe_compile(device: torch.device) -> str | None:
    if device.type == "cpu":
        from torch._inductor import config

        compiler = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
        if shutil.which(compiler or "g++") is None:
            return f"torch.compile on CPU needs a C++ compiler; {compiler!r} is not on PATH"
    return None


def _probe_fused(run_tiny) -> str | None:
    """Why a fused backend cannot run (it raised BackendUnavailableError / ExtensionUnavailableError on a
    tiny input), or None. Any other failure is not unavailability: the cases run and record it as an error."""
    try:
        run_tiny()
    except UNAVAILABLE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001
        return None
    return None


def _warm(step):
    """Run the step once (torch.compile compiles here, outside the timing); ``step.compile_s`` says how long."""
    start = time.perf_counter()
    step()
    step.compile_s = time.perf_counter() - start
    return step


class HeadsOp:
    """Margin-softmax cross-entropy of one head on (embeddings (B, d), weight (C, d), labels (B,))."""

    name = "heads"
    x_name = "C"
    fused = {"cpu": "cpu", "cuda": "triton"}  # device type -> the fused backend of that device
    providers = ("cpu", "triton", "eager", "compile", "gemm", "fused_sgd")

    def supports(self, provider: str, mode: str) -> bool:
        """Whether (provider, mode) is a case: "optim" has no compile / gemm line; fused_sgd only "optim"."""
        if mode == "optim":
            return provider not in ("compile", "gemm")
        return provider != "fused_sgd"

    def kernel(self, shape: HeadShape) -> str:
        return shape.head

    def x_value(self, shape: HeadShape) -> int:
        return shape.classes

    def config(self, shape: HeadShape) -> dict:
        return {"B": shape.batch, "d": shape.features}

    def default_providers(self, device: torch.device) -> list:
        return [self.fused.get(device.type, "triton"), "eager", "compile", "gemm"]

    def input_bytes(self, shape: HeadShape) -> int:
        e = DTYPES[shape.dtype].itemsize
        return (shape.batch + self._rows(shape)) * shape.features * e

    @staticmethod
    def _rows(shape: HeadShape) -> int:
        """Rows of the weight: C, or C k with sub-centers."""
        return shape.classes * head_params(shape.head).subcenters

    def estimate_bytes(self, provider: str, shape: HeadShape, mode: str) -> int:
        """Bytes a step needs beyond its inputs, with margin: used only to refuse runs that would exhaust a
        CPU machine. Eager materialises about a dozen (B, C) matrices in the computation dtype (cos, its
        clamp, masks, logits, their scatter, softmax and gradients) plus normalised copies of W and their
        gradients (4 x W); the fused heads need the weight's gradient (1 x W) and O(B chunk) buffers (a
        margin of 1 GiB)."""
        e = DTYPES[shape.dtype].itemsize
        bc, cd = shape.batch * self._rows(shape), self._rows(shape) * shape.features
        per_bc = {"eager": 12, "compile": 6, "gemm": 3}.get(provider, 0)
        if mode == "optim":
            # the momentum (1 x W); torch's SGD also holds the gradient and its weight-decayed copy (2 x W)
            state = cd * e * (1 if provider == "fused_sgd" else 3)
            work = 2**30 if provider != "eager" else per_bc * bc * e + 4 * cd * e
            return state + work + self.input_bytes(shape)
        if provider in ("cpu", "triton"):
            return cd * e + 2**30 + self.input_bytes(shape)
        return per_bc * bc * e + 4 * cd * e + self.input_bytes(shape)

    def probe(self, provider: str, device: torch.device) -> str | None:
        """None when ``provider`` can run on ``device``, else the reason it cannot."""
        if provider == "fused_sgd":
            return self.probe(self.fused.get(device.type, "triton"), device)
        if provider in ("triton", "cpu"):
            if provider == "triton" and device.type != "cuda":
                return "the triton backend needs a CUDA device (it is not benchmarked under the interpreter)"
            return _probe_fused(lambda: self.setup(provider, HeadShape("arcface", 3, 8, 5), "forward", device)())
        if provider == "compile":
            return _probe_compile(device)
        if provider in ("eager", "gemm"):
            return None
        raise ValueError(f"unknown heads provider {provider!r}; choose from {self.providers}")

    def setup(self, provider: str, shape: HeadShape, mode: str, device: torch.device, copies: int = 1):
        dtype = DTYPES[shape.dtype]
        b, d, c = shape.batch, shape.features, shape.classes
        params = head_params(shape.head)
        xs = [torch.randn(b, d, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
        # in place: at tens of millions of classes a temporary copy of W would halve the largest C that fits
        ws = [torch.randn(self._rows(shape), d, device=device, dtype=dtype).mul_(0.01).requires_grad_()
              for _ in range(copies)]  # fmt: skip
        ys = [torch.randint(0, c, (b,), device=device) for _ in range(copies)]
        # the head's running state as its module starts it (CurricularFace's t, AdaFace's statistics: the
        # registry's); ElasticFace draws from the default generator
        initial = [SPECS[shape.head].initial_state(device) for _ in range(copies)]
        ts = [state.pop("t", None) for state in initial]
        states = [MarginState(**state) for state in initial]
        grads = [[x, w] for x, w in zip(xs, ws)]

        if mode == "optim":
            return self._optim_step(provider, shape, device, xs, ws, ys, ts, states)
        if provider == "gemm":
            return self._gemm_step(xs, ws, mode, copies)
        if provider in ("cpu", "triton", "eager"):
            backend = "reference" if provider == "eager" else provider

            def loss_fn(i):
                mean, std = states[i].batch_mean, states[i].batch_std
                return fkf.margin_cross_entropy(xs[i], ws[i], ys[i], shape.head, t=ts[i], batch_mean=mean,
                                                batch_std=std, backend=backend)  # fmt: skip

            return _make_step(loss_fn, grads, mode, copies)
        if provider == "compile":
            compiled = _compile(ref_heads.eager_margin_cross_entropy, mode)

            def loss_fn(i):
                return compiled(xs[i], ws[i], ys[i], params, ts[i], True, False, states[i])

            return _warm(_make_step(loss_fn, grads, mode, copies))
        raise ValueError(f"unknown heads provider {provider!r}; choose from {self.providers}")

    def _optim_step(self, provider, shape, device, xs, ws, ys, ts, states):
        """forward + backward + the head optimizer's step (SGD_OPTIONS), rotating the input sets; the gradients
        are set to None after each step (zero_grad), as in a training loop."""
        copies = len(xs)
        if provider == "fused_sgd":
            from .. import optim as fused_optim

            backend = self.fused.get(device.type, "triton")
            heads = []
            dtype = ws[0].dtype
            for i in range(copies):
                # the head draws its own weight, normal_(0, 0.01), the distribution of ws[i], which is freed first:
                # at tens of millions of classes two copies of W (or one on the host beside one on the device)
                # would halve the largest C that fits (the scale run's question)
                ws[i] = None
                with torch.device(device):
                    head = module_class(shape.head)(shape.features, shape.classes, backend=backend)
                heads.append(head.to(dtype))
            ws[:] = []
            opts = [fused_optim.SGD(head, **SGD_OPTIONS) for head in heads]

            def loss_fn(i):
                return heads[i](xs[i], ys[i])

        elif provider in ("cpu", "triton", "eager"):
            backend = "reference" if provider == "eager" else provider
            opts = [torch.optim.SGD([w], **SGD_OPTIONS) for w in ws]

            def loss_fn(i):
                mean, std = states[i].batch_mean, states[i].batch_std
                return fkf.margin_cross_entropy(xs[i], ws[i], ys[i], shape.head, t=ts[i], batch_mean=mean,
                                                batch_std=std, backend=backend)  # fmt: skip

        else:
            raise ValueError(f"provider {provider!r} has no 'optim' mode; use cpu, triton, eager or fused_sgd")
        counter = iter(range(1 << 62))

        def step():
            i = next(counter) % copies
            xs[i].grad = None
            loss_fn(i).backward()
            opts[i].step()
            opts[i].zero_grad()

        return step

    @staticmethod
    def _gemm_step(xs, ws, mode, copies):
        """The three GEMMs of any (B, C)-logit head: logits = x_hat W_hat^T, dX = G W_hat, dW = G^T x_hat."""
        with torch.no_grad():
            x_hats = [ref_heads.normalize_rows(x) for x in xs]
            w_hats = [ref_heads.normalize_rows(w) for w in ws]
            gs = [torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype) for x, w in zip(xs, ws)]
        del xs[:], ws[:]  # the gemm floor holds only the normalised operands
        if mode != "backward":
            del gs[:]
        counter = iter(range(1 << 62))

        def step():
            i = next(counter) % copies
            x_hat, w_hat = x_hats[i], w_hats[i]
            if mode == "forward":
                x_hat @ w_hat.t()
                return
            g = gs[i] if mode == "backward" else x_hat @ w_hat.t()  # full: the logits stand in for G
            g @ w_hat
            g.t() @ x_hat

        return step


class TripletOp:
    """Triplet loss with in-batch mining on embeddings (B, d) with K samples per identity."""

    name = "triplet"
    x_name = "B"
    fused = {"cpu": "cpu", "cuda": "cuda"}
    providers = ("cpu", "cuda", "eager", "compile", "gemm", "pml")

    def supports(self, provider: str, mode: str) -> bool:
        return mode != "optim"  # no parameters to update

    def kernel(self, shape: TripletShape) -> str:
        return f"triplet_{shape.mining}"

    def x_value(self, shape: TripletShape) -> int:
        return shape.batch

    def config(self, shape: TripletShape) -> dict:
        return {"d": shape.features, "K": shape.per_class}

    def default_providers(self, device: torch.device) -> list:
        return [self.fused.get(device.type, "cuda"), "eager", "compile", "gemm", "pml"]

    def input_bytes(self, shape: TripletShape) -> int:
        return shape.batch * shape.features * DTYPES[shape.dtype].itemsize

    def estimate_bytes(self, provider: str, shape: TripletShape, mode: str) -> int:
        """Eager: about a dozen (B, B) float/bool matrices plus the reference's chunked mining masks (2^24
        elements a chunk), and with mining="all" the list of every (a, p, n) triplet with its gathered
        distances and autograd buffers (~64 bytes each: 648M triplets, ~40 GB, at B = 4096, K = 40);
        pml builds (B, B, B) masks and an int64 list of every candidate triplet."""
        b = shape.batch
        base = 16 * b * b * 4 + 2**24 * 24 + self.input_bytes(shape) * 4
        if shape.mining == "all" and provider in ("eager", "compile"):
            base += 64 * b * max(shape.per_class - 1, 0) * max(b - shape.per_class, 0)
        if provider == "pml":
            candidates = b * max(shape.per_class - 1, 1) * b
            return 3 * b**3 + candidates * 8 * 6 + base
        if provider in ("cpu", "cuda"):
            return self.input_bytes(shape) * 4 + 4 * b * b
        return base

    def probe(self, provider: str, device: torch.device) -> str | None:
        if provider in ("cpu", "cuda"):
            return _probe_fused(lambda: self.setup(provider, TripletShape(8, 4, 2), "forward", device)())
        if provider == "compile":
            return _probe_compile(device)
        if provider == "pml":
            try:
                import pytorch_metric_learning  # noqa: F401
            except ImportError as err:
                return f"pytorch-metric-learning is not installed ({err})"
            return None
        if provider in ("eager", "gemm"):
            return None
        raise ValueError(f"unknown triplet provider {provider!r}; choose from {self.providers}")

    def setup(self, provider: str, shape: TripletShape, mode: str, device: torch.device, copies: int = 1):
        dtype = DTYPES[shape.dtype]
        b, k = shape.batch, shape.per_class
        es = [torch.randn(b, shape.features, device=device, dtype=dtype, requires_grad=True) for _ in range(copies)]
        # K samples of each of B / K identities, in shuffled order
        ys = [(torch.arange(b, device=device) // k)[torch.randperm(b, device=device)] for _ in range(copies)]
        grads = [[e] for e in es]

        if provider == "gemm":
            return self._gemm_step(es, mode, copies)
        if provider in ("cpu", "cuda", "eager"):
            backend = "reference" if provider == "eager" else provider

            def loss_fn(i):
                return fkf.triplet_margin_loss(es[i], ys[i], TRIPLET_MARGIN, shape.mining, backend=backend)

            return _make_step(loss_fn, grads, mode, copies)
        if provider == "compile":
            params = TripletParams(TRIPLET_MARGIN, shape.mining, "squared_euclidean", True, False, "mean")
            compiled = _compile(ref_triplet.eager_triplet_margin_loss, mode)

            def loss_fn(i):
                return compiled(es[i], ys[i], params)

            return _warm(_make_step(loss_fn, grads, mode, copies))
        if provider == "pml":
            loss_fn = self._pml_loss(es, ys, shape.mining)
            return _make_step(loss_fn, grads, mode, copies)
        raise ValueError(f"unknown triplet provider {provider!r}; choose from {self.providers}")

    @staticmethod
    def _pml_loss(es, ys, mining):
        """pytorch-metric-learning's usual recipe on the same distance (squared L2 of normalised rows).

        Its "semihard" is d(a,p) < d(a,n) < d(a,p) + margin (all such triplets), not FaceNet's one negative
        per pair, and "hard" is BatchHardMiner: the same work class, not the same triplets."""
        from pytorch_metric_learning import distances, losses, miners

        distance = distances.LpDistance(normalize_embeddings=True, p=2, power=2)
        if mining == "hard":
            miner = miners.BatchHardMiner(distance=distance)
        else:
            miner = miners.TripletMarginMiner(TRIPLET_MARGIN, type_of_triplets=mining, distance=distance)
        loss = losses.TripletMarginLoss(margin=TRIPLET_MARGIN, distance=distance)

        def loss_fn(i):
            return loss(es[i], ys[i], miner(es[i], ys[i]))

        return loss_fn

    @staticmethod
    def _gemm_step(es, mode, copies):
        """The Gram matrix E E^T (forward) and dE = (G + G^T) E (backward, one GEMM with G symmetric)."""
        with torch.no_grad():
            e_hats = [ref_heads.normalize_rows(e) for e in es]
            gs = [torch.randn(e.shape[0], e.shape[0], device=e.device, dtype=e.dtype) for e in es]
        del es[:]
        if mode != "backward":
            del gs[:]
        counter = iter(range(1 << 62))

        def step():
            i = next(counter) % copies
            e_hat = e_hats[i]
            if mode == "forward":
                e_hat @ e_hat.t()
                return
            g = gs[i] if mode == "backward" else e_hat @ e_hat.t()
            g @ e_hat

        return step


OPS = {"heads": HeadsOp(), "triplet": TripletOp()}

