"""Class-sharded heads on ``torch.distributed`` (model parallel over the classes, optional Partial FC sampling).

Rank r of a group of ``world`` ranks holds the contiguous classes ``[class_start, class_start + num_local)``
with insightface's split (:func:`shard_range`). The loss is the one head algorithm of
``facekernels/_algorithm.py`` with the group (all-gather of the batch, all-reduce of the target cosines, of
the log-sum-exp partials and of the embeddings' gradient); this module holds what is particular to sharding:
the split, the checks that every rank agrees, and Partial FC's sampling.

Partial FC (``sample_rate < 1``): per step, this rank keeps every class of its shard that is a label of the
global batch plus random negatives, ``max(ceil(sample_rate * num_local), #positives)`` classes in all (random
scores, positives forced to the top, topk, sorted, as insightface samples), and computes on those rows only
(``index_select`` of the weight: only the sampled rows get a gradient).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import torch
import torch.distributed as dist

from . import _algorithm
from . import _validate as V
from ._backends import head_kernels
from ._errors import BackendUnavailableError
from ._params import HeadParams


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``: insightface's split, the first C % world ranks one class more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def check_sharded_backend(backend: str, device: torch.device | None = None) -> str:
    """The kernels of the sharded mode: "cpu" (compiled CPU ops) or "triton" (fused Triton kernels; CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1); "auto" is resolved by the device when it is given
    (CUDA: triton, CPU: cpu), as for a single-device head. The reference backend has no sharded mode."""
    name = backend
    if backend == "auto" and device is not None:
        name = {"cpu": "cpu", "cuda": "triton"}.get(device.type, device.type)
    if name not in ("auto", "cpu", "triton"):
        on = f" with {device.type} tensors" if device is not None else ""
        raise BackendUnavailableError(
            f"the class-sharded mode (process_group=...) runs backend 'cpu' (CPU tensors, gloo) or 'triton' "
            f"(CUDA tensors, NCCL); got backend={backend!r}{on}"
        )
    return name


def sample_classes(labels: torch.Tensor, valid: torch.Tensor, class_start: int, num_local: int,
                   sample_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Sorted int64 indices (into this shard) of the classes kept this step: every local positive of the
    global batch, plus random negatives up to ``ceil(sample_rate * num_local)`` classes."""
    local = valid & (labels >= class_start) & (labels < class_start + num_local)
    positive = torch.zeros(num_local, dtype=torch.bool, device=labels.device)
    positive[labels[local] - class_start] = True
    # drawn on the generator's device (the head's seeded generator is a CPU one), then moved to the labels'
    scores = torch.rand(num_local, generator=generator, device=generator.device if generator else labels.device)
    scores = scores.to(labels.device)
    scores[positive] = 2.0  # above any uniform score: positives come first in the topk
    # the one host sync of the sampling (insightface has the same one, in torch.unique)
    keep = max(math.ceil(sample_rate * num_local), int(positive.sum()))
    return scores.topk(keep).indices.sort().values


def _info_device(group) -> torch.device:
    """Where this group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _code(value) -> int:
    """A signed 64-bit digest of repr(value) (the same in every process, unlike hash(); repr keeps a float's
    every bit)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def fingerprint(config: dict, params: HeadParams, num_classes: int, sample_rate: float, training: bool, stats: bool,
                embeddings_grad: bool, weight_grad: bool) -> list[tuple[str, object]]:  # fmt: skip
    """(name, value) of everything the ranks of a group must agree on beside the shapes and the dtype: the head
    and its settings as the user gave them (``config``: class name and constructor margins), C, the sampler, the
    mode, the statistics, which inputs need a gradient, and every field of the resolved HeadParams (k included).
    A mismatch would give each rank a different loss, leave a class on no rank, send ranks into different
    collectives (ElasticFace's draws are broadcast in training only) or leave one rank out of the backward's
    all-reduce. User-facing fields come first; the HeadParams fields ("params.m2", ...) are as many for every
    head, so that the digests gathered have one length on every rank."""
    fields = [("head", config.get("head", "")), ("settings", sorted(config.items())), ("num_classes", num_classes),
              ("sample_rate", sample_rate), ("training", training), ("return_stats", stats),
              ("embeddings.requires_grad", embeddings_grad), ("weight.requires_grad", weight_grad)]  # fmt: skip
    return fields + [(f"params.{f.name}", getattr(params, f.name)) for f in dataclasses.fields(params)]


def _differences(group, config: dict, fields: list[tuple[str, object]]) -> str:
    """The fields that differ between the ranks with every rank's value, the same text on every rank (a second
    collective, run only when the digests differ): the user's names (s, m, k, ...) where they show the
    difference, else the HeadParams fields."""
    named = {**{k: repr(v) for k, v in config.items() if k != "head"},
             **{name: repr(value) for name, value in fields if name != "settings"}}  # fmt: skip
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, named, group=group)
    keys = list(dict.fromkeys(k for ranks in everyone for k in ranks))
    differ = [k for k in keys if len({ranks.get(k, "-") for ranks in everyone}) > 1]
    shown = [k for k in differ if not k.startswith("params.")] or differ
    return "; ".join(f"{k}: {', '.join(ranks.get(k, '-') for ranks in everyone)}" for k in shown)


def _agree(group, error: Exception | None, batch: int, features: int, dtype_code: int, bad_label: int | None,
           num_classes: int, ignore_index: int, config: dict, fields: list[tuple[str, object]]) -> None:  # fmt: skip
    """Raise the same error on every rank when any rank's inputs are wrong, or when the ranks disagree on the
    batch size, the features, the dtype or a field of their fingerprint (``fingerprint``): one rank raising
    alone would leave the others waiting in the all-gather until the process group's timeout, unequal shapes or
    dtypes abort inside the collective, and unequal heads diverge or hang later.

    One all-gather of 6 integers plus a 64-bit digest per fingerprint field, per step, read on the host (a sync,
    like Partial FC's sampling); only an error or a disagreement runs a second collective, for the message."""
    info = torch.tensor([error is not None, batch, features, dtype_code, bad_label is not None, bad_label or 0]
                        + [_code(value) for _, value in fields], dtype=torch.int64, device=_info_device(group))
    parts = [torch.empty_like(info) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, info, group=group)
    rows = torch.stack(parts).tolist()
    last = len(rows) - 1
    if any(r[0] for r in rows):
        reports = [None] * len(rows)
        dist.all_gather_object(reports, None if error is None else (type(error).__name__, str(error)), group=group)
        if error is not None:
            raise error
        rank, (kind, message) = next((r, m) for r, m in enumerate(reports) if m is not None)
        raise (TypeError if kind == "TypeError" else ValueError)(f"rank {rank} rejected its inputs: {message}")
    if len({tuple(r[6:]) for r in rows}) > 1:
        raise ValueError(f"every rank of the process group must set up its head alike; ranks 0..{last} differ in "
                         f"{_differences(group, config, fields)}")  # fmt: skip
    for column, what in ((1, "batch size"), (2, "number of features"), (3, "embeddings dtype")):
        values = [r[column] for r in rows]
        if len(set(values)) > 1:
            shown = [V.FLOAT_DTYPES[v] if column == 3 else v for v in values]
            raise ValueError(f"every rank must pass the same {what}; got {shown} on ranks 0..{last}")
    bad = [r[5] for r in rows if r[4]]
    if bad:
        raise V.label_range_error(num_classes, ignore_index, bad[0])


def sharded_margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: HeadParams,
    t: torch.Tensor | None,
    training: bool,
    *,
    group,
    num_classes: int,
    class_start: int,
    backend: str = "cpu",
    sample_rate: float = 1.0,
    generator: torch.Generator | None = None,
    stats: bool = False,
    state=None,
    sampler=None,
    config: dict | None = None,
    update=None,
):
    """Loss of one class-sharded head: ``embeddings`` (B_l, d) and ``labels`` (B_l,) with global class ids on
    this rank, ``weight`` (num_local, d) this rank's shard. Returns the loss of the global batch, identical on
    every rank ("none": the (B,) row losses of the global batch, in rank order; a gradient given to them must
    be the same on every rank). ``generator``: Partial FC's sampling generator; ``state``: the per-row margins'
    (facekernels._rowmath.MarginState); ``sampler``: with sample_rate < 1, a function (labels, valid) of the
    global batch -> the sorted sampled classes of this shard, instead of :func:`sample_classes` (insightface's
    own rule: facekernels.compat.insightface); ``config``: the head module's class name ("head") and constructor
    margins, part of the fingerprint every rank must share (``fingerprint``) and named in its error; ``update``:
    a fused optimizer of this rank's shard (facekernels/optim.py). Gradient convention: facekernels/_algorithm.py."""
    bad_label, kernels = None, None
    batch = features = dtype_code = -1
    error, checked = V.head_call_error(embeddings, weight, labels, params, t, state, shard=True)
    if error is None:
        labels = checked
        batch, features = embeddings.shape
        dtype_code = V.FLOAT_DTYPES.index(embeddings.dtype)
        try:
            kernels = head_kernels(check_sharded_backend(backend, embeddings.device), embeddings.device)
            kernels.compute_dtype(embeddings, weight)
        except (ValueError, TypeError, BackendUnavailableError) as err:
            error = err
        # the label values, agreed by every rank (a host read: the sharded step syncs once to agree anyway)
        if error is None and V.label_checks_enabled() and not torch.compiler.is_compiling():
            wrong = V.out_of_range_labels(labels, num_classes, params.ignore_index)
            if bool(wrong.any()):
                bad_label = int(labels[wrong][0])
    config = config or {}
    grad = torch.is_grad_enabled()
    fields = fingerprint(config, params, num_classes, sample_rate, training, stats,
                         grad and bool(getattr(embeddings, "requires_grad", False)),
                         grad and bool(getattr(weight, "requires_grad", False)))  # fmt: skip
    _agree(group, error, batch, features, dtype_code, bad_label, num_classes, params.ignore_index, config, fields)

    if sample_rate >= 1.0:
        sampler = None
    elif sampler is None:
        sampler = functools.partial(sample_classes, class_start=class_start,
                                    num_local=weight.shape[0] // params.subcenters, sample_rate=sample_rate,
                                    generator=generator)  # fmt: skip
    return _algorithm.fused_head_loss(embeddings, weight, labels, params, t, training, kernels, group=group,
                                      class_start=class_start, sampler=sampler, stats=stats, state=state,
                                      update=update)  # fmt: skip

