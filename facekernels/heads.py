"""The margin-softmax heads as ``nn.Module``s (semantics: docs/heads.md; other trainers: docs/migration.md).

Each head owns ``weight`` (num_classes, in_features), initialised ``normal_(0, 0.01)``, and its forward
returns the cross-entropy loss of the head's logits; the logits themselves are never returned (the fused
backends never form them).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import _validate as V
from ._head_params import head_params
from .functional import _margin_cross_entropy


# The published defaults of each head's margins, shared by the modules and the functional form.
class _MarginHead(nn.Module):
    head: str  # key of HEAD_DEFAULTS
    presets: dict = {}  # name -> constructor arguments that reproduce that trainer's head (see like())

    def __init__(self, in_features, num_classes, *, reduction, ignore_index, margin_grad, backend, process_group,
                 sample_rate, sample_seed, **margins):  # fmt: skip
        super().__init__()
        # forward returns (loss, HeadStats) when True: per-row target cosine and top-1 correctness (monitoring)
        self.return_stats = False
        V.check_int("in_features", in_features, minimum=1)
        V.check_int("num_classes", num_classes, minimum=1)
        V.check_choice("backend", backend, ("auto", "triton", "cpu", "reference"))
        V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.margins = margins
        self.params = head_params(
            self.head, reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, **margins
        )
        self.backend = backend
        # class sharding (facekernels/sharded.py): this rank's classes [class_start, class_start + num_local)
        self.process_group = process_group
        self.sample_rate = float(sample_rate)
        self.class_start, self.num_local = 0, self.num_classes
        self.sample_generator = None
        if process_group is None:
            if self.sample_rate != 1.0:
                raise ValueError("sample_rate < 1 (Partial FC) needs a process_group (the class-sharded mode)")
        else:
            from .sharded import check_sharded_backend, shard_range

            check_sharded_backend(backend)
            V.check_process_group(process_group)
            world = torch.distributed.get_world_size(process_group)
            if self.num_classes < world:
                raise ValueError(f"num_classes must be >= the world size {world}; got {self.num_classes}")
            rank = torch.distributed.get_rank(process_group)
            self.class_start, self.num_local = shard_range(self.num_classes, world, rank)
            if sample_seed is not None:
                self.sample_generator = torch.Generator().manual_seed(int(sample_seed))
        self.weight = nn.Parameter(torch.empty(self.num_local, self.in_features))
        self.reset_parameters()

    @classmethod
    def like(cls, preset: str, in_features: int, num_classes: int, **overrides):
        """This head configured as a published trainer's head, e.g. ``ArcFace.like("insightface", 512, C)``.

        Args:
            preset: one of ``cls.presets`` (the trainer whose numbers to reproduce).
            in_features: embedding size d.
            num_classes: number of classes C.
            **overrides: any constructor argument, replacing the preset's (e.g. ``backend="reference"``).
        """
        if not cls.presets:
            raise ValueError(f"{cls.__name__} has no presets")
        V.check_choice("preset", preset, tuple(cls.presets))
        return cls(in_features, num_classes, **{**cls.presets[preset], **overrides})

    def reset_parameters(self) -> None:
        """Re-initialise ``weight`` to normal_(0, 0.01) (insightface's and CurricularFace's)."""
        nn.init.normal_(self.weight, 0.0, 0.01)

    # Partial FC's sampling generator is module state: a run resumed from state_dict() draws the same classes.
    # The extra state is a uint8 tensor (the generator's state, empty without a generator), so that every value
    # of state_dict() stays a tensor (safetensors, EMA helpers).
    def get_extra_state(self) -> torch.Tensor:
        """The sampling generator's state (a uint8 tensor; empty without a generator), for state_dict()."""
        if self.sample_generator is None:
            return torch.empty(0, dtype=torch.uint8)
        return self.sample_generator.get_state()

    def set_extra_state(self, state) -> None:
        """Restore the sampling generator from ``state`` (get_extra_state's tensor; empty: leave it as it is).

        Args:
            state: a 1-D uint8 tensor.
        """
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise ValueError("_extra_state must be a 1-D uint8 tensor (a sampling generator's state)")
        if state.numel() == 0:
            return  # saved without a generator: keep this head's own
        if self.sample_generator is None:
            self.sample_generator = torch.Generator()
        self.sample_generator.set_state(state.cpu())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        # state dicts without the extra state (another trainer's layout, insightface's Partial FC shards, older
        # checkpoints) still load with strict=True: nothing to restore, the generator stays as it is
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def _t(self):
        return None

    def _updates_t(self) -> bool:
        # the `training` the backends get: it switches CurricularFace's t update and nothing else
        return self.training

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a batch.

        Args:
            embeddings: (B, d) float16, bfloat16, float32 or float64 tensor, not normalised (the head does it).
            labels: (B,) int64 (or int32) class ids in [0, num_classes), or ignore_index.

        Returns:
            The loss: a 0-dim tensor, or the (B,) row losses with reduction="none"; float32 (float64 for
            float64 inputs). With ``head.return_stats = True``: (loss, HeadStats), the per-row target cosine
            and top-1 correctness of the batch (of the global batch when sharded), computed in the fused pass
            (``facekernels.functional.margin_cross_entropy``, return_stats).
        """
        stats = bool(self.return_stats)
        if self.process_group is not None:
            from .sharded import sharded_margin_cross_entropy

            return sharded_margin_cross_entropy(
                embeddings, self.weight, labels, self.params, self._t(), self._updates_t(), group=self.process_group,
                num_classes=self.num_classes, class_start=self.class_start, backend=self.backend,
                sample_rate=self.sample_rate, generator=self.sample_generator, stats=stats,
            )  # fmt: skip
        return _margin_cross_entropy(embeddings, self.weight, labels, self.params, t=self._t(),
                                     training=self._updates_t(), backend=self.backend, stats=stats)  # fmt: skip

    def extra_repr(self) -> str:
        p = self.params
        margins = ", ".join(f"{k}={v!r}" for k, v in self.margins.items())
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, {margins}, "
            f"reduction={p.reduction!r}, ignore_index={p.ignore_index}, margin_grad={p.margin_grad!r}, "
            f"backend={self.backend!r}"
            + (f", class_start={self.class_start}, num_local={self.num_local}, sample_rate={self.sample_rate}"
               if self.process_group is not None else "")
        )


# The arguments every head takes, appended to each class docstring (help(fk.ArcFace) shows them).
_SIZES = """
        in_features: embedding size d.
        num_classes: number of classes C; ``weight`` is (C, d) (one row per class), or (num_local, d) on each
            rank of a class-sharded head."""
_FALLBACK = """
        fallback: the target logit where theta + m > pi: None (this head's own), "monotonic"
            (c - sin(pi - m) m: CurricularFace, TFace, pytorch-metric-learning), "none" (cos(theta + m) as is:
            insightface), "facexzoo" (c: FaceX-Zoo's ArcFace) or a number a >= 0 (c - a: FaceX-Zoo's
            margin_am), "easy_margin" (c wherever c <= 0)."""
_COMMON = """
        reduction: "mean" (over the rows not labelled ignore_index; 0 when there is none), "sum", or "none"
            (the (B,) row losses, 0 on ignored rows).
        ignore_index: the label of rows that add no loss and get no gradient (-100 as in
            torch.nn.functional.cross_entropy).
        margin_grad: "exact" (the true derivative of the target logit) or "straight_through" (d phi / d cos := 1,
            as insightface's arcface_torch).
        backend: "auto" (compiled CPU kernels for CPU tensors, Triton for CUDA tensors), "cpu", "triton" or
            "reference" (eager PyTorch; forms the (B, C) logits). A backend that cannot run raises
            BackendUnavailableError.
        process_group: a torch.distributed group to shard the classes over (insightface's split; the loss is
            that of the global batch); None: one device.
        sample_rate: Partial FC: the fraction of each rank's classes used per step (every positive plus random
            others); below 1 it needs process_group.
        sample_seed: seed of the head's own sampling generator, whose state is saved in state_dict() (a
            resumed run draws the same classes); None: torch's global generator.

    Attributes:
        weight: the class weights, a Parameter of shape (num_classes, in_features) (num_local rows when
            sharded), initialised normal_(0, 0.01).
        params: the HeadParams the backends compute with.

    ``forward(embeddings, labels)`` returns the loss; ``Head.like(preset, in_features, num_classes)`` builds
    the head configured as a published trainer's (``presets``). Semantics: docs/heads.md.
"""


def _options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate, sample_seed):
    return dict(reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, backend=backend,
                process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed)  # fmt: skip


class NormSoftmax(_MarginHead):
    __doc__ = (
        """NormFace: the cross-entropy of the logits s * cos(theta), no margin.

    Args:"""
        + _SIZES
        + """
        s: scale of the logits."""
        + _COMMON
    )

    head = "norm_softmax"

    def __init__(self, in_features, num_classes, s=64.0, *, reduction="mean", ignore_index=-100,
                 margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        """Build the head; the arguments are described in the class docstring."""
        super().__init__(in_features, num_classes, s=s,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                     sample_seed))  # fmt: skip


class ArcFace(_MarginHead):
    __doc__ = (
        """ArcFace (additive angular margin): the target logit s * cos(theta + m), the others s * cos(theta).

    Args:"""
        + _SIZES
        + """
        s: scale of the logits.
        m: angular margin in radians, in [0, pi).
        easy_margin: the classic option: the target logit is s * cos(theta) wherever cos(theta) <= 0 (the same
            as fallback="easy_margin")."""
        + _FALLBACK
        + _COMMON
    )

    head = "arcface"
    presets = {
        # arcface_torch (CombinedMarginLoss(64, 1, 0.5, 0) or ArcFace): cos(theta + m) as is, straight-through
        "insightface": dict(s=64.0, m=0.5, fallback="none", margin_grad="straight_through"),
        "curricularface": dict(s=64.0, m=0.5, fallback="monotonic"),  # head/metrics.py ArcFace
        "tface": dict(s=64.0, m=0.5, fallback="monotonic"),  # torchkit/head/localfc/arcface.py
        "facexzoo": dict(s=32.0, m=0.35, fallback="facexzoo"),  # head/ArcFace.py defaults (margin_am = 0)
        "pytorch-metric-learning": dict(s=64.0, m=math.radians(28.6), fallback="monotonic"),  # margin in degrees
    }

    def __init__(self, in_features, num_classes, s=64.0, m=0.5, easy_margin=False, *, fallback=None,
                 reduction="mean", ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        """Build the head; the arguments are described in the class docstring."""
        super().__init__(in_features, num_classes, s=s, m=m, easy_margin=easy_margin, fallback=fallback,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip


class CosFace(_MarginHead):
    __doc__ = (
        """CosFace / AM-Softmax (additive cosine margin): the target logit s * (cos(theta) - m).

    Args:"""
        + _SIZES
        + """
        s: scale of the logits.
        m: cosine margin, >= 0."""
        + _COMMON
    )

    head = "cosface"
    presets = {
        "insightface": dict(s=64.0, m=0.4),  # CombinedMarginLoss(64, 1, 0, 0.4) / CosFace(m=0.40)
        "facexzoo": dict(s=32.0, m=0.35),  # head/AM_Softmax.py defaults
        "pytorch-metric-learning": dict(s=64.0, m=0.35),  # CosFaceLoss defaults
    }

    def __init__(self, in_features, num_classes, s=64.0, m=0.35, *, reduction="mean", ignore_index=-100,
                 margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        """Build the head; the arguments are described in the class docstring."""
        super().__init__(in_features, num_classes, s=s, m=m,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                     sample_seed))  # fmt: skip


class CombinedMargin(_MarginHead):
    __doc__ = (
        """insightface's combined margin: the target logit s * (cos(m1 * theta + m2) - m3).

    m1 = 1, m3 = 0 is ArcFace (with its fallback); m1 = 1, m2 = 0 is CosFace.

    Args:"""
        + _SIZES
        + """
        s: scale of the logits.
        m1: multiplicative angular margin, > 0.
        m2: additive angular margin in radians, in [0, pi).
        m3: additive cosine margin, >= 0."""
        + _FALLBACK
        + """ Only when m1 = 1 and m3 = 0."""
        + _COMMON
    )

    head = "combined"
    presets = {
        # arcface_torch's CombinedMarginLoss in its ArcFace mode: no fallback, straight-through margin gradient
        "insightface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, fallback="none", margin_grad="straight_through"),
    }

    def __init__(self, in_features, num_classes, s=64.0, m1=1.0, m2=0.5, m3=0.0, *, fallback=None,
                 reduction="mean", ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        """Build the head; the arguments are described in the class docstring."""
        super().__init__(in_features, num_classes, s=s, m1=m1, m2=m2, m3=m3, fallback=fallback,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip


class MVSoftmax(_MarginHead):
    __doc__ = (
        """MV-Softmax (FaceX-Zoo): a margin on the target and the hard negatives reweighted to (t + 1) c + t.

    A class j is a hard negative when its cosine exceeds the target's margin-modified cosine (c - m for the AM
    variant, cos(theta + m) for the Arc one).

    Args:"""
        + _SIZES
        + """
        s: scale of the logits.
        m: the margin: cosine margin (is_am=True; the target is c - m where c > m, else c) or angular margin in
            radians (is_am=False; the target is cos(theta + m) where c > 0, else c).
        t: weight of the hard negatives, >= 0 (FaceX-Zoo's mv_weight is t + 1: its default 1.12 is t = 0.12).
        is_am: the AM (additive cosine) variant; False: the Arc variant."""
        + _FALLBACK
        + """ Only the Arc variant."""
        + _COMMON
    )

    head = "mv_softmax"
    presets = {"facexzoo": dict(s=32.0, m=0.35, t=0.12, is_am=True)}  # mv_weight = 1.12 = t + 1; is_am=False: Arc

    def __init__(self, in_features, num_classes, s=32.0, m=0.35, t=0.2, is_am=True, *, fallback=None,
                 reduction="mean", ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        """Build the head; the arguments are described in the class docstring."""
        super().__init__(in_features, num_classes, s=s, m=m, t=t, is_am=is_am, fallback=fallback,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip


class CurricularFace(_MarginHead):
    __doc__ = (
        """CurricularFace: the ArcFace target and the hard negatives reweighted to c (t + c), t adaptive.

    A class j is a hard negative when its cosine exceeds cos(theta + m) of the target (before any fallback).
    ``t`` is a buffer (0-dim float32, saved in state_dict), initially 0, updated in training mode before the
    negatives are formed: t <- momentum * mean(target cosines) + (1 - momentum) * t, over the rows not
    ignored (the global batch when sharded); read but not updated in eval mode. Under gradient accumulation,
    ``frozen_t`` updates it once per optimizer step.

    Args:"""
        + _SIZES
        + """
        s: scale of the logits.
        m: angular margin in radians, in [0, pi).
        momentum: the EMA weight of t's update, in [0, 1] (official 0.01; TFace 0.1)."""
        + _FALLBACK
        + _COMMON
        + """
    Further attributes: ``t`` (the buffer) and ``update_t`` (default True: whether training forwards update t).
"""
    )

    head = "curricular"
    presets = {
        "curricularface": dict(s=64.0, m=0.5, momentum=0.01),  # the official head/metrics.py
        "facexzoo": dict(s=64.0, m=0.5, momentum=0.01),  # head/CurricularFace.py, a copy of the official one
        "tface": dict(s=64.0, m=0.5, momentum=0.1),  # torchkit/head/localfc/curricularface.py: alpha = 0.1
    }

    def __init__(self, in_features, num_classes, s=64.0, m=0.5, momentum=0.01, *, fallback=None,
                 reduction="mean", ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        """Build the head; the arguments are described in the class docstring."""
        super().__init__(in_features, num_classes, s=s, m=m, momentum=momentum, fallback=fallback,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))
        self.update_t = True

    def _t(self):
        return self.t

    @property
    def update_t(self) -> bool:
        """Whether a training-mode forward updates ``t`` (default True; see ``frozen_t``)."""
        return self._update_t

    @update_t.setter
    def update_t(self, value: bool) -> None:
        V.check_bool("update_t", value)
        self._update_t = value

    def _updates_t(self) -> bool:
        return self.training and self.update_t

    @contextlib.contextmanager
    def frozen_t(self, frozen: bool = True):
        """Within the block, forwards read ``t`` without updating it (when ``frozen``; else nothing changes).

        For gradient accumulation, update ``t`` once per optimizer step, on the first micro-batch, so that
        every micro-batch of the step uses the same ``t`` (as one large batch would)::

            for i, (x, y) in enumerate(micro_batches):
                with head.frozen_t(i > 0):
                    (head(backbone(x), y) / len(micro_batches)).backward()
            optimizer.step()

        Args:
            frozen: freeze ``t`` in the block (a condition such as ``i > 0`` reads well in a loop).
        """
        V.check_bool("frozen", frozen)
        previous = self.update_t
        self.update_t = previous and not frozen
        try:
            yield self
        finally:
            self.update_t = previous

    def _apply(self, fn, *args, **kwargs):
        # .half() / .double() / .to(dtype) convert the weight; t stays a float32 running statistic, with its
        # value from before the cast (casting back from float16 would round it: 0.12345679 -> 0.12353516)
        before = self.t
        super()._apply(fn, *args, **kwargs)
        if self.t.dtype != torch.float32:
            self.t = before.to(self.t.device)
        return self
