"""The margin-softmax heads as ``nn.Module``s (``shared/spec/api.md``).

Each head owns ``weight`` (num_classes, in_features), initialised ``normal_(0, 0.01)``, and its forward
returns the cross-entropy loss of the head's logits; the logits themselves are never returned (the fused
backends never form them).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate as V
from ._params import HEAD_NAMES, Fallback, HeadParams, Negatives

# The published defaults of each head's margins, shared by the modules and the functional form.
HEAD_DEFAULTS = {
    "norm_softmax": dict(s=64.0),
    "arcface": dict(s=64.0, m=0.5, easy_margin=False),
    "cosface": dict(s=64.0, m=0.35),
    "combined": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "mv_softmax": dict(s=32.0, m=0.35, t=0.2, is_am=True),
    "curricular": dict(s=64.0, m=0.5, momentum=0.01),
}


def head_params(
    head: str,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    margin_grad: str = "exact",
    **margins,
) -> HeadParams:
    """Validate one head's hyper-parameters and map them onto the common parametrisation."""
    V.check_choice("head", head, HEAD_NAMES)
    V.check_head_options(reduction, ignore_index, margin_grad, "auto")
    unknown = set(margins) - set(HEAD_DEFAULTS[head])
    if unknown:
        raise TypeError(
            f"{head} got unexpected argument(s) {sorted(unknown)}; it takes {sorted(HEAD_DEFAULTS[head])}"
        )
    a = {**HEAD_DEFAULTS[head], **margins}
    V.check_float("s", a["s"], low=0.0, low_open=True, high=V.MAX_SCALE)
    common = dict(s=float(a["s"]), reduction=reduction, ignore_index=int(ignore_index), margin_grad=margin_grad)
    if head == "norm_softmax":
        return HeadParams(**common)
    if head == "cosface":
        V.check_float("m", a["m"], low=0.0, high=V.MAX_ADDITIVE_MARGIN)
        return HeadParams(m3=float(a["m"]), **common)
    if head == "combined":
        V.check_float("m1", a["m1"], low=0.0, low_open=True, high=V.MAX_M1)
        V.check_float("m2", a["m2"], low=0.0, high=math.pi, high_open=True)
        V.check_float("m3", a["m3"], low=0.0, high=V.MAX_ADDITIVE_MARGIN)
        m1, m2, m3 = float(a["m1"]), float(a["m2"]), float(a["m3"])
        fallback = Fallback.MONOTONIC if m1 == 1.0 and m3 == 0.0 else Fallback.NONE
        return HeadParams(m1=m1, m2=m2, m3=m3, fallback=fallback, **common)
    V.check_float("m", a["m"], low=0.0, high=math.pi, high_open=True)
    m = float(a["m"])
    if head == "arcface":
        V.check_bool("easy_margin", a["easy_margin"])
        return HeadParams(m2=m, fallback=Fallback.POSITIVE if a["easy_margin"] else Fallback.MONOTONIC, **common)
    if head == "mv_softmax":
        V.check_float("t", a["t"], low=0.0, high=V.MAX_MV_T)
        V.check_bool("is_am", a["is_am"])
        if a["is_am"]:
            return HeadParams(m3=m, fallback=Fallback.ABOVE_M3, negatives=Negatives.MV, mv_t=float(a["t"]), **common)
        return HeadParams(m2=m, fallback=Fallback.POSITIVE, negatives=Negatives.MV, mv_t=float(a["t"]), **common)
    V.check_float("momentum", a["momentum"], low=0.0, high=1.0)
    return HeadParams(
        m2=m, fallback=Fallback.MONOTONIC, negatives=Negatives.CURRICULAR, momentum=float(a["momentum"]), **common
    )


class _MarginHead(nn.Module):
    head: str  # key of HEAD_DEFAULTS

    def __init__(self, in_features, num_classes, *, reduction, ignore_index, margin_grad, backend, process_group,
                 sample_rate, sample_seed, **margins):  # fmt: skip
        super().__init__()
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

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, 0.01)

    def _t(self):
        return None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from .functional import _margin_cross_entropy

        if self.process_group is not None:
            from .sharded import sharded_margin_cross_entropy

            return sharded_margin_cross_entropy(
                embeddings, self.weight, labels, self.params, self._t(), self.training, group=self.process_group,
                num_classes=self.num_classes, class_start=self.class_start, backend=self.backend,
                sample_rate=self.sample_rate, generator=self.sample_generator,
            )  # fmt: skip
        return _margin_cross_entropy(
            embeddings, self.weight, labels, self.params, t=self._t(), training=self.training, backend=self.backend
        )

    def extra_repr(self) -> str:
        p = self.params
        margins = ", ".join(f"{k}={v}" for k, v in self.margins.items())
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, {margins}, "
            f"reduction={p.reduction!r}, ignore_index={p.ignore_index}, margin_grad={p.margin_grad!r}, "
            f"backend={self.backend!r}"
            + (f", class_start={self.class_start}, num_local={self.num_local}, sample_rate={self.sample_rate}"
               if self.process_group is not None else "")
        )


def _options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate, sample_seed):
    return dict(reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, backend=backend,
                process_group=process_group, sample_rate=sample_rate, sample_seed=sample_seed)  # fmt: skip


class NormSoftmax(_MarginHead):
    """NormFace: logits s * cos(theta), no margin."""

    head = "norm_softmax"

    def __init__(self, in_features, num_classes, s=64.0, *, reduction="mean", ignore_index=-100,
                 margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        super().__init__(in_features, num_classes, s=s,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                     sample_seed))  # fmt: skip


class ArcFace(_MarginHead):
    """Additive angular margin: target cos(theta + m), with the monotonic (or easy_margin) fallback."""

    head = "arcface"

    def __init__(self, in_features, num_classes, s=64.0, m=0.5, easy_margin=False, *, reduction="mean",
                 ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        super().__init__(in_features, num_classes, s=s, m=m, easy_margin=easy_margin,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip


class CosFace(_MarginHead):
    """Additive cosine margin: target cos(theta) - m."""

    head = "cosface"

    def __init__(self, in_features, num_classes, s=64.0, m=0.35, *, reduction="mean", ignore_index=-100,
                 margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        super().__init__(in_features, num_classes, s=s, m=m,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                     sample_seed))  # fmt: skip


class CombinedMargin(_MarginHead):
    """insightface's combined margin: target cos(m1 * theta + m2) - m3."""

    head = "combined"

    def __init__(self, in_features, num_classes, s=64.0, m1=1.0, m2=0.5, m3=0.0, *, reduction="mean",
                 ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        super().__init__(in_features, num_classes, s=s, m1=m1, m2=m2, m3=m3,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip


class MVSoftmax(_MarginHead):
    """MV-Softmax (FaceX-Zoo): hard negatives reweighted to (t + 1) cos + t; AM or Arc target margin."""

    head = "mv_softmax"

    def __init__(self, in_features, num_classes, s=32.0, m=0.35, t=0.2, is_am=True, *, reduction="mean",
                 ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        super().__init__(in_features, num_classes, s=s, m=m, t=t, is_am=is_am,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip


class CurricularFace(_MarginHead):
    """CurricularFace: ArcFace target, hard negatives reweighted to cos (t + cos) with an adaptive t.

    ``t`` is a buffer (saved in state_dict) updated in training mode, before the negatives are formed,
    to ``momentum * mean(target cosine) + (1 - momentum) * t``; read but not updated in eval mode.
    """

    head = "curricular"

    def __init__(self, in_features, num_classes, s=64.0, m=0.5, momentum=0.01, *, reduction="mean",
                 ignore_index=-100, margin_grad="exact", backend="auto",
                 process_group=None, sample_rate=1.0, sample_seed=None):  # fmt: skip
        super().__init__(in_features, num_classes, s=s, m=m, momentum=momentum,
                         **_options(reduction, ignore_index, margin_grad, backend, process_group, sample_rate,
                                    sample_seed))  # fmt: skip
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))

    def _t(self):
        return self.t

    def _apply(self, fn, *args, **kwargs):
        # .half() / .double() / .to(dtype) convert the weight; t stays a float32 running statistic
        super()._apply(fn, *args, **kwargs)
        if self.t.dtype != torch.float32:
            self.t = self.t.float()
        return self
