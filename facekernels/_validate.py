"""The one validation path shared by every backend.

Constructors and functional forms call these before any backend runs, so a malformed input gets the same
``ValueError`` / ``TypeError`` (naming the argument and what was expected) whatever the backend.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._params import (
    BACKENDS,
    DISTANCES,
    HEAD_BACKENDS,
    MARGIN_GRADS,
    MINING_MODES,
    REDUCTIONS,
    TRIPLET_BACKENDS,
    TRIPLET_REDUCTIONS,
)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Every label must lie in [0, C) (or be ignore_index): a wrong label silently trains a wrong model. Reading the
# labels on the host to say so would synchronise a CUDA stream every step, so (by default) where the labels are:
# - CPU labels are checked at once (no stream to drain);
# - CUDA labels are checked on the device: a few small ops reduce them to (any bad, the first bad label), copied
#   without blocking into pinned host memory behind a CUDA event. The next head call whose check runs (or
#   ``facekernels.check_labels()``, which waits) reads every report whose event has completed and raises the
#   ValueError then, naming the bad label. In the meantime the fused heads give a row with such a label a NaN
#   loss (facekernels/_algorithm.py), never a wrong finite number, and no kernel indexes with it.
# set_label_checks(False) turns the check off for data already checked; set_label_checks(True, deferred=False)
# checks CUDA labels at once (one sync a step), deferred=True defers CPU labels too (tests). Inside
# torch.compile and during CUDA graph capture the check is skipped (no data-dependent branch, no host copy).
_check_label_values = True
_defer_label_checks: bool | None = None  # None: defer CUDA labels, check CPU ones at once
_pending_label_reports: list = []  # (event or None, host report (2,) int64, num_classes, ignore_index)


def set_label_checks(enabled: bool, *, deferred: bool | None = None) -> None:
    """Turn the range check of label values on or off (on by default). ``deferred``: None (default) checks CPU
    labels at once and CUDA labels on the device, raising at a later call (``check_labels``); True defers
    every check; False checks every label at once (on CUDA, one host sync a step)."""
    global _check_label_values, _defer_label_checks
    _check_label_values = bool(enabled)
    _defer_label_checks = None if deferred is None else bool(deferred)


def label_range_error(num_classes: int, ignore_index: int, found: int, note: str = "") -> ValueError:
    """The error of a label outside [0, num_classes) that is not ignore_index (every path raises this one)."""
    return ValueError(f"labels must lie in [0, {num_classes}){_or_ignored(ignore_index)}; found {found}"
                      + (f" {note}" if note else ""))  # fmt: skip


def out_of_range_labels(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The mask of labels outside [0, num_classes) that are not ignore_index (on the labels' device)."""
    return ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)


def label_checks_enabled() -> bool:
    return _check_label_values


def check_labels(wait: bool = True) -> None:
    """Raise the ValueError of a deferred label check (``set_label_checks``) whose report is complete: with
    ``wait`` (the default; a documented sync point, e.g. at the end of an epoch) waiting for every pending one,
    without it only those the device has finished. Each report is read and dropped once."""
    global _pending_label_reports
    pending, failure = [], None
    for entry in _pending_label_reports:
        event, report, num_classes, ignore_index = entry
        if event is not None and not event.query():
            if not wait:
                pending.append(entry)
                continue
            event.synchronize()
        if failure is None and bool(report[0]):
            failure = (int(report[1]), num_classes, ignore_index)
    _pending_label_reports = pending
    if failure is not None:
        _pending_label_reports = []  # the error reports the first; the rest of the queue is moot
        found, num_classes, ignore_index = failure
        raise label_range_error(num_classes, ignore_index, found,
                                "(a label of an earlier call, checked on the device: that call's loss was NaN)")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """The labels in [0, num_classes) or ignore_index, on one device: at once for CPU labels, deferred for CUDA
    ones (the comment at the top); skipped inside torch.compile and when turned off (``set_label_checks``)."""
    if not _check_label_values or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    if labels.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a graph replays with other labels: nothing to read back per capture. Before the pending reports: their
        # event query is illegal during capture (it invalidated the capture of the H200's step profile)
        return
    if _pending_label_reports:
        check_labels(wait=False)
    bad = out_of_range_labels(labels, num_classes, ignore_index)
    deferred = labels.is_cuda if _defer_label_checks is None else _defer_label_checks
    if not deferred:
        if bool(bad.any()):  # a host sync on CUDA (deferred=False asked for it)
            raise label_range_error(num_classes, ignore_index, int(labels[bad][0]))
        return
    # (any bad, first bad label) on the device: argmax gives the first maximum, bad there says if it is bad.
    # gather, not labels[first]: indexing with a 0-dim tensor reads it on the host
    first = bad.to(torch.uint8).argmax(0, keepdim=True)
    report = torch.cat([bad.gather(0, first).long(), labels.gather(0, first)])
    if labels.device.type == "cuda":
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        host.copy_(report, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    elif labels.device.type == "meta":
        return  # stand-ins without values (facekernels.benchmark.sm90 counts a step's ops on them)
    else:
        host, event = report, None
    _pending_label_reports.append((event, host, num_classes, ignore_index))


def _fmt_choices(choices) -> str:
    return ", ".join(repr(c) for c in choices)


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {_fmt_choices(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {_fmt_choices(choices)}; got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_int64(name: str, value) -> None:
    """An int that fits an int64 tensor element (a bigger one raises OverflowError inside a comparison)."""
    check_int(name, value)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must be an int64, in [-2**63, 2**63 - 1]; got {value}")


def check_process_group(value) -> None:
    """None (not sharded) or a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD)."""
    if value is None:
        return
    dist = torch.distributed
    if not (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        raise TypeError(
            f"process_group must be None or a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD "
            f"after init_process_group); got {type(value).__name__}"
        )


def check_float(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> None:
    """A finite real number in [low, high] (or the open ends asked for)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        raise ValueError(f"{name} must be a finite number in {interval}; got {value}")


# Upper bounds of the head hyper-parameters, so that nothing overflows float32 (the kernels' logits). Every
# logit is s times a value of magnitude at most 1 + max(m3, 2 t) (a cosine, minus the additive margin m3 or
# CosFace's m; MV-Softmax's (t + 1) c + t), so with these bounds |logit| <= 1e4 * 21 and exp(logit - max)
# never overflows; the exact margin derivative m1 sin(m1 theta + m2) / sin(theta) (sin floored at 1e-6)
# stays below 1e7 s. They sit 20x to 150x above every published setting (s 30-64, m3 and CosFace m
# <= 0.35, MV t <= 0.2, SphereFace-style m1 <= 4) and reject values like s = 1e39 that are finite in
# Python but inf in float32.
MAX_SCALE = 1e4
MAX_ADDITIVE_MARGIN = 10.0  # m3, CosFace m
MAX_M1 = 10.0
MAX_MV_T = 10.0


def check_head_options(reduction: str, ignore_index: int, margin_grad: str) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    check_int64("ignore_index", ignore_index)
    check_choice("margin_grad", margin_grad, MARGIN_GRADS)


_GPU_BACKEND = {"heads": "triton", "triplet": "cuda"}


def check_backend(loss: str, backend) -> None:
    """``backend`` is one of ``loss``'s ("heads" or "triplet"); a backend of the other loss is refused with the
    name this one uses for the same device (the one vocabulary: _params.BACKENDS)."""
    choices = HEAD_BACKENDS if loss == "heads" else TRIPLET_BACKENDS
    if isinstance(backend, str) and backend in BACKENDS and backend not in choices:
        what = "the triplet loss" if loss == "triplet" else "the heads"
        raise ValueError(f"backend={backend!r} is not a backend of {what}; its GPU kernels are "
                         f"backend={_GPU_BACKEND[loss]!r} (one of {_fmt_choices(choices)})")  # fmt: skip
    check_choice("backend", backend, choices)


def check_triplet_options(margin, mining, distance, normalize, soft, reduction, backend) -> None:
    check_float("margin", margin, low=0.0)
    check_choice("mining", mining, MINING_MODES)
    check_choice("distance", distance, DISTANCES)
    check_bool("normalize", normalize)
    check_bool("soft", soft)
    check_choice("reduction", reduction, TRIPLET_REDUCTIONS)
    check_backend("triplet", backend)


def _check_dense(name: str, x) -> None:
    """A strided dense tensor: sparse, mkldnn and nested tensors have no strided rows for the kernels (and
    fail deep inside with an unrelated message)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{name} must be a dense strided tensor; got a nested tensor (pad it, or concatenate its rows)")
    if x.layout != torch.strided:
        kind = "mkldnn" if x.layout == torch._mkldnn else "sparse" if x.is_sparse or "sparse" in str(x.layout) else ""
        raise TypeError(f"{name} must be a dense strided tensor; got a {kind} tensor (layout {x.layout}): "
                        "call .to_dense() first")  # fmt: skip


def _check_not_meta(name: str, x: torch.Tensor) -> None:
    # checked after the one-device check, so that a meta tensor beside real ones reads as a device mismatch
    if x.is_meta:
        raise ValueError(f"{name} are meta tensors (shapes without data): facekernels computes on cpu or cuda tensors")


def _check_float_matrix(name: str, x) -> None:
    _check_dense(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D; got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {x.dtype}")


def check_head_dtypes(embeddings: torch.Tensor, weight: torch.Tensor) -> None:
    """float64 with float64 only. Among float16, bfloat16 and float32 the heads compute in the promoted dtype
    (AMP: float16 embeddings with a float32 weight run in float32), on every backend; a float64 input beside a
    lower-precision one is a mistake (a float32 head silently run in float64, or float64 test inputs rounded
    away), so it raises instead of promoting."""
    if (embeddings.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise TypeError(
            f"embeddings and weight must both be float64 or neither; got {embeddings.dtype} embeddings with a "
            f"{weight.dtype} weight: cast one (head.double(), or embeddings.to(head.weight.dtype))"
        )


def _check_labels(labels, batch: int, allow_column: bool = False) -> torch.Tensor:
    """Labels of shape (batch,); with ``allow_column`` also (batch, 1), as insightface passes them, returned
    flattened (callers must use the returned tensor, hence opt-in)."""
    _check_dense("labels", labels)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor; got {labels.dtype}")
    if allow_column and labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels.view(-1)
    if labels.dim() != 1 or labels.shape[0] != batch:
        column = f" or ({batch}, 1)" if allow_column else ""
        raise ValueError(f"labels must have shape ({batch},){column} to match embeddings; got {tuple(labels.shape)}")
    return labels


def _or_ignored(ignore_index: int) -> str:
    # the compat losses (facekernels.compat) take no ignore label: theirs is INT64_MIN, which no one passes
    return "" if ignore_index == INT64_MIN else f" or equal ignore_index={ignore_index}"


def head_call_error(embeddings, weight, labels, params, t, state, *, shard: bool = False):
    """Every check of one head call's inputs but the label values, in one place: (the error or None, the labels
    as int64, flattened from (B, 1)). One device raises the error (_backends.head_loss); the class-sharded mode
    first agrees on it across ranks in the collective it runs anyway (sharded.py's ``_agree``), so that every
    rank raises it together, never one rank alone while the others wait. ``shard``: weight is this rank's
    shard, num_local * k rows, none on a rank past the last class. The label values: ``check_label_values``
    on one device (deferred on CUDA), agreed across ranks when sharded."""
    try:
        _check_float_matrix("embeddings", embeddings)
        _check_float_matrix("weight", weight)
        k = params.subcenters
        if weight.shape[0] == 0 and not shard:
            raise ValueError("weight must have at least one class (row); got 0")
        if weight.shape[0] % k:
            rows = "num_local * k" if shard else "num_classes * k"
            raise ValueError(f"weight must have {rows} rows (k = {k} sub-centers per class); got "
                             f"{weight.shape[0]} rows")  # fmt: skip
        if embeddings.shape[1] != weight.shape[1]:
            raise ValueError(
                f"embeddings must have {weight.shape[1]} features (weight is {tuple(weight.shape)}); "
                f"got shape {tuple(embeddings.shape)}"
            )
        check_head_dtypes(embeddings, weight)
        labels = _check_labels(labels, embeddings.shape[0], allow_column=True)
        if not (embeddings.device == weight.device == labels.device):
            raise ValueError(
                f"embeddings, weight and labels must be on one device; got {embeddings.device}, "
                f"{weight.device} and {labels.device}"
            )
        _check_not_meta("embeddings, weight and labels", embeddings)
        if params.uses_t:
            check_t_buffer(t, embeddings)
        check_margin_state(params, state, embeddings)
    except (ValueError, TypeError) as err:
        return err, None
    return None, labels.long()


def check_triplet_inputs(embeddings, labels) -> torch.Tensor:
    """Validate the triplet loss's inputs; returns the labels as int64, flattened from (B, 1)."""
    _check_float_matrix("embeddings", embeddings)
    labels = _check_labels(labels, embeddings.shape[0], allow_column=True)
    if embeddings.device != labels.device:
        raise ValueError(
            f"embeddings and labels must be on one device; got {embeddings.device} and {labels.device}"
        )
    _check_not_meta("embeddings and labels", embeddings)
    return labels.long()


def check_t_buffer(t, embeddings: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 0-dim float32 tensor (CurricularFace's buffer); got {type(t).__name__}")
    if t.dim() != 0 or t.dtype != torch.float32:
        raise ValueError(f"t must be a 0-dim float32 tensor; got shape {tuple(t.shape)} and {t.dtype}")
    if t.device != embeddings.device:
        raise ValueError(f"t must be on the device of embeddings ({embeddings.device}); got {t.device}")


def check_margin_state(params, state, embeddings: torch.Tensor) -> None:
    """The per-row margins' state (facekernels._rowmath.MarginState) against the head: AdaFace needs its two
    statistics; a generator or given margins belong to ElasticFace; nothing else takes any."""
    from ._params import AdaFaceMargins, ElasticMargins

    kind = params.row_margins
    batch_mean, batch_std, generator, margins = state if state is not None else (None,) * 4
    if isinstance(kind, AdaFaceMargins):
        for name, value in (("batch_mean", batch_mean), ("batch_std", batch_std)):
            if value is None:
                raise ValueError(f"{name} is required for head='adaface': a 0-dim float32 tensor (the module's buffer)")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a 0-dim float32 or float64 tensor; got {type(value).__name__}")
            if value.dim() != 0 or value.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"{name} must be a 0-dim float32 or float64 tensor; got shape {tuple(value.shape)} "
                                 f"and {value.dtype}")  # fmt: skip
            if value.device != embeddings.device:
                raise ValueError(f"{name} must be on the device of embeddings ({embeddings.device}); got "
                                 f"{value.device}")  # fmt: skip
    elif batch_mean is not None or batch_std is not None:
        raise ValueError("batch_mean and batch_std are AdaFace's statistics; got them for another head")
    if not isinstance(kind, ElasticMargins):
        if generator is not None or margins is not None:
            raise ValueError("generator and row_margins are ElasticFace's; got them for another head")
        return
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    if margins is not None:
        _check_dense("row_margins", margins)
        if margins.shape != (embeddings.shape[0],) or not margins.is_floating_point():
            raise ValueError(f"row_margins must be a floating-point tensor of shape ({embeddings.shape[0]},); got "
                             f"{tuple(margins.shape)} {margins.dtype}")  # fmt: skip
        if margins.device != embeddings.device:
            raise ValueError(f"row_margins must be on the device of embeddings ({embeddings.device}); got "
                             f"{margins.device}")  # fmt: skip
