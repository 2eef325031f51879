"""insightface arcface_torch's Partial FC head on the fused kernels: change the two import lines only.

    from partial_fc_v2 import PartialFC_V2                       # before
    from losses import CombinedMarginLoss
    from facekernels.compat.insightface import PartialFC_V2, CombinedMarginLoss   # after

    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0, interclass_filtering_threshold=0)
    module_partial_fc = PartialFC_V2(margin_loss, 512, num_classes, sample_rate=0.3, fp16=True)
    loss = module_partial_fc(local_embeddings, local_labels)

As theirs: ``torch.distributed`` must be initialised first (world size 1 included), the classes are split over
the default process group (rank r holds ``num_local = C // world + (r < C % world)`` classes from
``class_start``), ``weight`` is (num_local, d) initialised ``normal_(0, 0.01)`` (their per-rank checkpoints
load strictly, ours load into theirs), the loss is the mean over the global batch of
``-log(max(p_target, 1e-30))`` (their DistCrossEntropy: the value floored, the gradient that of the plain
cross-entropy), the same on every rank, the local embeddings' gradient is ``world`` times theirs
d(loss)/d(local embeddings) (their AllGather backward), and the margin is theirs: ArcFace mode
(``m1 == 1, m3 == 0``) ``cos(theta + m2)`` with no fallback past ``theta + m2 > pi`` and a straight-through
gradient (their margin is written into the logits without gradient), CosFace mode (``m3 > 0``) ``c - m3``,
inter-class filtering as theirs. With ``sample_rate < 1`` each rank keeps ``int(sample_rate * num_local)``
classes, every local positive first, the others by a ``torch.rand(num_local)`` draw from torch's default CPU
generator, as theirs: after the same ``torch.manual_seed`` both sample the same classes. ``fp16=True`` computes
the cosines from float16 inputs on CUDA tensors (their ``torch.cuda.amp.autocast(fp16)``, which leaves CPU
tensors alone); the softmax is float32 either way.

The (B, C_local) logits and softmax are never formed (theirs keeps the softmax from the forward to the
backward). Labels must lie in [0, num_classes) (a (B, 1) tensor is accepted, and not squeezed in place).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .. import _validate as V
from .._head_params import head_params
from ..sharded import check_sharded_backend, shard_range, sharded_margin_cross_entropy
from .pml import NO_IGNORE

LOG_FLOOR = 1e-30  # DistCrossEntropy's floor of the target probability


def _margin_logits(cos: torch.Tensor, labels: torch.Tensor, s, m2, m3, threshold, arc: bool) -> torch.Tensor:
    """Their margin modules' eager forward on given (B, C) cosines (rows labelled -1 untouched): the
    logits. Not used by PartialFC_V2 here (the fused path never forms them)."""
    labels = labels.reshape(-1)
    has = labels != -1
    target = torch.zeros_like(cos, dtype=torch.bool)
    target[has.nonzero().squeeze(1), labels[has]] = True
    if threshold > 0:  # a non-target cosine above it becomes 0, without gradient (kept in the softmax's sum)
        cos = cos * (~((cos > threshold) & ~target)).to(cos.dtype)
    if arc:  # the margin added to the angle without gradient: d logit / d cos is 1 (straight-through)
        shifted = torch.where(target, torch.cos(torch.acos(cos.detach()) + m2), cos.detach())
        return s * (cos + (shifted - cos.detach()))
    return s * torch.where(target, cos - m3, cos)


class _MarginLoss(nn.Module):
    """What PartialFC_V2 reads from a margin module: the facekernels head and its margins."""

    def fused_head(self) -> tuple[str, dict]:
        """(facekernels head name, its margins) that compute this margin."""
        raise NotImplementedError


class CombinedMarginLoss(_MarginLoss):
    """arcface_torch's CombinedMarginLoss: ArcFace mode (``m1 == 1`` and ``m3 == 0``: the target
    ``cos(theta + m2)``, no fallback, straight-through gradient) or CosFace mode (``m3 > 0``: ``c - m3``, m1
    and m2 unused), times ``s``; inter-class filtering above ``interclass_filtering_threshold`` (> 0).
    Other (m1, m3) raise here (theirs raises at the first forward).

    Args:
        s: the logits' scale.
        m1: 1.0 (theirs supports no other multiplicative margin).
        m2: the additive angular margin (ArcFace mode), in radians.
        m3: the additive cosine margin (CosFace mode when > 0).
        interclass_filtering_threshold: a non-target class whose cosine exceeds it gets the logit 0 and no
            gradient; 0 turns it off.
    """

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        """Build the margin; the arguments are described in the class docstring."""
        super().__init__()
        for name, value in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)):
            V.check_float(name, value)
        V.check_float("interclass_filtering_threshold", interclass_filtering_threshold, low=0.0, high=1.0)
        if not ((m1 == 1.0 and m3 == 0.0) or m3 > 0):
            raise ValueError(
                f"CombinedMarginLoss takes m1 = 1 and m3 = 0 (ArcFace mode) or m3 > 0 (CosFace mode), as "
                f"arcface_torch's; got m1={m1}, m3={m3}"
            )
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.fused_head()  # validate the values the heads bound (s, m2, m3)

    def fused_head(self) -> tuple[str, dict]:
        """(facekernels head name, its margins) that compute this margin."""
        threshold = dict(interclass_filtering_threshold=self.interclass_filtering_threshold)
        if self.m3 > 0:
            head = ("cosface", dict(s=self.s, m=self.m3, **threshold))
        else:
            head = ("combined", dict(s=self.s, m1=1.0, m2=self.m2, m3=0.0, fallback="none", **threshold))
        head_params(head[0], **head[1])
        return head

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The margin applied to given (B, C) cosines, as theirs (eager; PartialFC_V2 here never calls it)."""
        return _margin_logits(logits, labels, self.s, self.m2, self.m3, self.interclass_filtering_threshold,
                              self.m3 <= 0)  # fmt: skip


class ArcFace(_MarginLoss):
    """arcface_torch's ArcFace (losses.py): the target ``cos(theta + margin)``, no fallback, straight-through
    gradient, times ``s``.

    Args:
        s: the logits' scale.
        margin: the additive angular margin, in radians, in [0, pi).
    """

    def __init__(self, s=64.0, margin=0.5):
        """Build the margin; the arguments are described in the class docstring."""
        super().__init__()
        self.s, self.margin = s, margin
        self.fused_head()

    def fused_head(self) -> tuple[str, dict]:
        """(facekernels head name, its margins) that compute this margin."""
        head = ("combined", dict(s=self.s, m1=1.0, m2=self.margin, m3=0.0, fallback="none"))
        head_params(head[0], **head[1])
        return head

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The margin applied to given (B, C) cosines, as theirs (eager)."""
        return _margin_logits(logits, labels, self.s, self.margin, 0.0, 0.0, True)


class CosFace(_MarginLoss):
    """arcface_torch's CosFace (losses.py): the target ``cos(theta) - m``, times ``s``.

    Args:
        s: the logits' scale.
        m: the additive cosine margin.
    """

    def __init__(self, s=64.0, m=0.40):
        """Build the margin; the arguments are described in the class docstring."""
        super().__init__()
        self.s, self.m = s, m
        self.fused_head()

    def fused_head(self) -> tuple[str, dict]:
        """(facekernels head name, its margins) that compute this margin."""
        head = ("cosface", dict(s=self.s, m=self.m))
        head_params(head[0], **head[1])
        return head

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The margin applied to given (B, C) cosines, as theirs (eager)."""
        return _margin_logits(logits, labels, self.s, 0.0, self.m, 0.0, False)


def _fused_head_of(margin_loss) -> tuple[str, dict]:
    """The facekernels head of ``margin_loss``: one of this module's margins, or insightface's own
    CombinedMarginLoss / ArcFace / CosFace object (read from its attributes)."""
    if isinstance(margin_loss, _MarginLoss):
        return margin_loss.fused_head()
    kind = type(margin_loss).__name__
    try:
        if kind == "CombinedMarginLoss":
            threshold = getattr(margin_loss, "interclass_filtering_threshold", 0)
            return CombinedMarginLoss(margin_loss.s, margin_loss.m1, margin_loss.m2, margin_loss.m3,
                                      threshold).fused_head()  # fmt: skip
        if kind == "ArcFace" and hasattr(margin_loss, "margin"):
            return ArcFace(margin_loss.s, margin_loss.margin).fused_head()
        if kind == "CosFace" and hasattr(margin_loss, "m"):
            return CosFace(margin_loss.s, margin_loss.m).fused_head()
    except AttributeError:
        pass
    raise TypeError(
        f"margin_loss must be a CombinedMarginLoss, ArcFace or CosFace (facekernels.compat.insightface's or "
        f"arcface_torch's): the fused head reads its margins and never forms the logits; got {kind}"
    )


class PartialFC_V2(nn.Module):  # noqa: N801 (their name)
    """arcface_torch's PartialFC_V2 on the fused kernels (module docstring).

    Args:
        margin_loss: a CombinedMarginLoss, ArcFace or CosFace (this module's, or arcface_torch's own).
        embedding_size: embedding size d.
        num_classes: number of classes C over all ranks (>= the world size).
        sample_rate: the fraction of each rank's classes used per step, in (0, 1] (1: model parallel).
        fp16: compute the cosines from float16 inputs on CUDA tensors (their autocast; no effect on CPU).
        backend: facekernels' kernels: "auto" (cpu for CPU tensors, triton for CUDA), "cpu" or "triton".

    Attributes:
        weight: this rank's (num_local, embedding_size) class weights.
        rank, world_size, class_start, num_local, num_sample: as theirs.
    """

    _version = 2

    def __init__(self, margin_loss, embedding_size, num_classes, sample_rate=1.0, fp16=False, *, backend="auto"):
        """Build the head; the arguments are described in the class docstring."""
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "PartialFC_V2 needs torch.distributed initialised before it is built, as insightface's (also for "
                "one process): torch.distributed.init_process_group(...) first"
            )
        _fused_head_of(margin_loss)  # a margin the fused path can compute, or a TypeError now
        self.margin_softmax = margin_loss  # read at every forward: a margin changed later takes effect, as theirs
        V.check_int("embedding_size", embedding_size, minimum=1)
        V.check_int("num_classes", num_classes, minimum=1)
        V.check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        V.check_bool("fp16", fp16)
        check_sharded_backend(backend)
        self.backend = backend
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if num_classes < self.world_size:
            raise ValueError(f"num_classes must be >= the world size {self.world_size}; got {num_classes}")
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.fp16 = float(sample_rate), fp16
        self.class_start, self.num_local = shard_range(self.num_classes, self.world_size, self.rank)
        self.num_sample = int(self.sample_rate * self.num_local)  # rounded down, as theirs
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, self.embedding_size)))
        self._cached = (None, None)

    @property
    def params(self):
        """The HeadParams of the margin module as it is now (validated by the heads' one path; cached)."""
        head, margins = _fused_head_of(self.margin_softmax)
        key = (head, tuple(sorted(margins.items())))
        if self._cached[0] != key:
            # theirs writes the margin into the logits without gradient: straight-through
            self._cached = (key, head_params(head, reduction="none", ignore_index=NO_IGNORE,
                                             margin_grad="straight_through", **margins))  # fmt: skip
        return self._cached[1]

    def _sample(self, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Their sampling of this shard's classes for a step of the global batch's ``labels``: sorted shard
        indices of every positive, plus random others up to num_sample (a host sync, as theirs)."""
        local = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        positive = torch.unique(labels[local] - self.class_start, sorted=True)
        if self.num_sample < positive.numel():
            return positive  # more positives than num_sample: those only, and no draw (theirs)
        scores = torch.rand(self.num_local).to(labels.device)  # torch's default CPU generator, as theirs
        scores[positive] = 2.0
        # at least one class (theirs fails with none: an empty shard has no softmax)
        return scores.topk(max(self.num_sample, 1)).indices.sort().values

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch, the same on every rank.

        Args:
            local_embeddings: this rank's (B, embedding_size) embeddings (B equal on every rank).
            local_labels: this rank's (B,) or (B, 1) int64 / int32 global class ids.

        Returns:
            The 0-dim mean of -log(max(p_target, 1e-30)) over the global batch (float32; float64 for float64
            inputs).
        """
        x, w = local_embeddings, self.weight
        if self.fp16 and isinstance(x, torch.Tensor) and x.is_cuda:
            x, w = x.half(), w.half()  # their autocast runs the normalise-and-linear in float16 on CUDA
        rows = sharded_margin_cross_entropy(
            x, w, local_labels, self.params, None, self.training, group=dist.group.WORLD,
            num_classes=self.num_classes, class_start=self.class_start, backend=self.backend,
            sample_rate=self.sample_rate, sampler=self._sample,
        )  # fmt: skip
        # -log(max(p, 1e-30)) = min(-log p, 69.08): the value floored, the gradient of -log p (theirs)
        floored = rows.clamp_max(-math.log(LOG_FLOOR))
        return (rows + (floored - rows).detach()).mean()

    def extra_repr(self) -> str:
        head, margins = _fused_head_of(self.margin_softmax)
        return (f"head={head!r}, {margins}, embedding_size={self.embedding_size}, "
                f"num_classes={self.num_classes}, rank={self.rank}, class_start={self.class_start}, "
                f"num_local={self.num_local}, sample_rate={self.sample_rate}, fp16={self.fp16}")  # fmt: skip
