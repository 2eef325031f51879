"""Each head's published defaults and the validated mapping of its hyper-parameters onto the one
parametrisation (``HeadParams``, facekernels/_params.py): shared by the modules (heads.py) and the functional
form (functional.py), below both."""

from __future__ import annotations

import dataclasses
import math
import numbers

from . import _validate as V
from ._params import (
    ELASTIC_PLUS,
    HEAD_NAMES,
    AdaFaceMargins,
    ElasticMargins,
    Fallback,
    HeadParams,
    MagFaceMargins,
    Negatives,
)

HEAD_DEFAULTS = {
    "norm_softmax": dict(s=64.0),
    "arcface": dict(s=64.0, m=0.5, easy_margin=False),
    "cosface": dict(s=64.0, m=0.35),
    "combined": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "mv_softmax": dict(s=32.0, m=0.35, t=0.2, is_am=True),
    "curricular": dict(s=64.0, m=0.5, momentum=0.01),
    "adaface": dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3),
    "magface": dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True, kind="arc"),
    "elastic_arcface": dict(s=64.0, m=0.5, std=0.05, plus=False),
    "elastic_cosface": dict(s=64.0, m=0.35, std=0.05, plus=False),
    "subcenter_arcface": dict(s=64.0, m=0.5, k=3, easy_margin=False),
}
# insightface's inter-class filtering (CombinedMarginLoss's interclass_filtering_threshold) is offered where it is
# defined: the heads without hard-negative reweighting
FILTERING_HEADS = ("norm_softmax", "arcface", "cosface", "combined")
MAX_SUBCENTERS = 64


# The named fallbacks of the angular-margin heads (what each published trainer does where theta + m > pi).
FALLBACKS = {
    "monotonic": Fallback.MONOTONIC,  # c - sin(pi - m) m: CurricularFace, TFace, pytorch-metric-learning
    "none": Fallback.NONE,  # cos(theta + m) as is: insightface arcface_torch's CombinedMarginLoss
    "facexzoo": Fallback.OFFSET,  # c - margin_am with FaceX-Zoo's default margin_am = 0
    "easy_margin": Fallback.POSITIVE,  # cos(theta + m) only where c > 0, else c
}


def with_fallback(params: HeadParams, fallback, *, head: str, easy_margin: bool = False) -> HeadParams:
    """``params`` with the fallback that a head's ``fallback=`` argument selects where theta + m > pi.

    A head has an angular margin when its own fallback is MONOTONIC or POSITIVE; the others take only None, or
    "none" where that is already theirs.

    Args:
        params: the head's own parameters (head_params without ``fallback``).
        fallback: None (keep the head's own), a name of FALLBACKS, or a number a >= 0 meaning ``c - a`` there
            (FaceX-Zoo's ``margin_am``).
        head: the head's name, for error messages.
        easy_margin: ArcFace's ``easy_margin`` (it is fallback="easy_margin" and excludes any other).

    Returns:
        HeadParams with ``fallback`` (and ``margin_am``) set.
    """
    if fallback is None or (isinstance(fallback, str) and fallback == "none" and params.fallback == Fallback.NONE):
        return params
    if params.fallback not in (Fallback.MONOTONIC, Fallback.POSITIVE):
        raise ValueError(
            "fallback applies to an angular margin only (ArcFace, CombinedMargin with m1 = 1 and m3 = 0, MVSoftmax "
            "with is_am=False, CurricularFace, ElasticArcFace, SubCenterArcFace, MagFace arc); got "
            f"fallback={fallback!r} for head={head!r} with these margins"
        )
    if easy_margin and fallback != "easy_margin":
        raise ValueError(f"easy_margin=True is fallback='easy_margin'; got fallback={fallback!r} with it")
    if isinstance(fallback, str):
        if fallback not in FALLBACKS:
            raise ValueError(
                f"fallback must be one of {', '.join(map(repr, FALLBACKS))} or a number >= 0 (c - margin_am); "
                f"got {fallback!r}"
            )
        return dataclasses.replace(params, fallback=FALLBACKS[fallback])
    if isinstance(fallback, bool) or not isinstance(fallback, numbers.Real):
        raise TypeError(f"fallback must be a string or a number (margin_am); got {type(fallback).__name__}")
    V.check_float("fallback", fallback, low=0.0)
    return dataclasses.replace(params, fallback=Fallback.OFFSET, margin_am=float(fallback))


def head_params(
    head: str,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    margin_grad: str = "exact",
    **margins,
) -> HeadParams:
    """Validate one head's hyper-parameters and map them onto the common parametrisation.

    Args:
        head: "norm_softmax", "arcface", "cosface", "combined", "mv_softmax", "curricular", "adaface", "magface",
            "elastic_arcface", "elastic_cosface" or "subcenter_arcface".
        reduction: "mean", "sum" or "none".
        ignore_index: the label of ignored rows.
        margin_grad: "exact" or "straight_through".
        **margins: the head's own arguments (s, m, easy_margin, m1, m2, m3, t, is_am, momentum, h, t_alpha, eps,
            l_a, u_a, l_m, u_m, lambda_g, kind, std, plus, k, fallback, interclass_filtering_threshold; as the
            modules take them), each defaulting to the published value.

    Returns:
        The HeadParams every backend computes with.
    """
    if "interclass_filtering_threshold" in margins:
        threshold = margins.pop("interclass_filtering_threshold")
        params = head_params(head, reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, **margins)
        V.check_float("interclass_filtering_threshold", threshold, low=0.0, high=1.0)
        if threshold > 0 and head not in FILTERING_HEADS:
            raise ValueError(
                f"interclass_filtering_threshold applies to {', '.join(FILTERING_HEADS)} (insightface defines no "
                f"interaction with hard-negative reweighting or per-row margins); got {threshold} for head={head!r}"
            )
        # 0 turns it off (insightface's "> 0" test)
        return dataclasses.replace(params, filter_threshold=float(threshold) if threshold > 0 else math.inf)
    if "fallback" in margins:  # the angular-margin heads' option, applied on top of the head's own parameters
        fallback = margins.pop("fallback")
        params = head_params(head, reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, **margins)
        return with_fallback(params, fallback, head=head, easy_margin=margins.get("easy_margin", False))
    V.check_choice("head", head, HEAD_NAMES)
    V.check_head_options(reduction, ignore_index, margin_grad)
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
    if head == "adaface":
        return _adaface(a, common)
    if head == "magface":
        return _magface(a, common)
    if head in ("elastic_arcface", "elastic_cosface"):
        return _elastic(head, a, common)
    V.check_float("m", a["m"], low=0.0, high=math.pi, high_open=True)
    m = float(a["m"])
    if head in ("arcface", "subcenter_arcface"):
        V.check_bool("easy_margin", a["easy_margin"])
        k = 1
        if head == "subcenter_arcface":
            V.check_int("k", a["k"], minimum=1)
            if a["k"] > MAX_SUBCENTERS:
                raise ValueError(f"k must be in [1, {MAX_SUBCENTERS}]; got {a['k']}")
            k = int(a["k"])
        fallback = Fallback.POSITIVE if a["easy_margin"] else Fallback.MONOTONIC
        return HeadParams(m2=m, fallback=fallback, subcenters=k, **common)
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


def _adaface(a: dict, common: dict) -> HeadParams:
    V.check_float("m", a["m"], low=0.0, high=math.pi / 2)
    V.check_float("h", a["h"], low=0.0, high=V.MAX_ADDITIVE_MARGIN)
    V.check_float("t_alpha", a["t_alpha"], low=0.0, high=1.0)
    V.check_float("eps", a["eps"], low=0.0, high=0.5, low_open=True, high_open=True)
    eps = float(a["eps"])
    margins = AdaFaceMargins(float(a["m"]), float(a["h"]), float(a["t_alpha"]), eps)
    # m2_i = -m z_i, m3_i = m (1 + z_i) per row; theta + m2_i clipped to [eps, pi - eps]; every cosine to 1 - eps
    return HeadParams(fallback=Fallback.CLIP, clip_eps=eps, cos_bound=1.0 - eps, row_margins=margins, **common)


def _magface(a: dict, common: dict) -> HeadParams:
    V.check_choice("kind", a["kind"], ("arc", "cos"))
    V.check_bool("easy_margin", a["easy_margin"])
    V.check_float("l_a", a["l_a"], low=0.0, low_open=True, high=1e6)
    V.check_float("u_a", a["u_a"], low=0.0, low_open=True, high=1e6)
    if not a["u_a"] > a["l_a"]:
        raise ValueError(f"u_a must be > l_a; got l_a={a['l_a']}, u_a={a['u_a']}")
    high = math.pi if a["kind"] == "arc" else V.MAX_ADDITIVE_MARGIN
    V.check_float("l_m", a["l_m"], low=0.0, high=high, high_open=a["kind"] == "arc")
    V.check_float("u_m", a["u_m"], low=0.0, high=high, high_open=a["kind"] == "arc")
    if a["u_m"] < a["l_m"]:
        raise ValueError(f"u_m must be >= l_m; got l_m={a['l_m']}, u_m={a['u_m']}")
    V.check_float("lambda_g", a["lambda_g"], low=0.0, high=1e6)
    margins = MagFaceMargins(float(a["l_a"]), float(a["u_a"]), float(a["l_m"]), float(a["u_m"]),
                             float(a["lambda_g"]), a["kind"] == "arc")  # fmt: skip
    if a["kind"] == "cos":
        if a["easy_margin"] is not True:  # the default True has no meaning for cos: only an explicit False is odd
            raise ValueError("easy_margin applies to kind='arc' only; leave it at its default for kind='cos'")
        return HeadParams(row_margins=margins, **common)
    fallback = Fallback.POSITIVE if a["easy_margin"] else Fallback.MONOTONIC
    return HeadParams(fallback=fallback, row_margins=margins, **common)


def _elastic(head: str, a: dict, common: dict) -> HeadParams:
    angular = head == "elastic_arcface"
    V.check_float("m", a["m"], low=0.0, high=math.pi if angular else V.MAX_ADDITIVE_MARGIN, high_open=angular)
    V.check_float("std", a["std"], low=0.0, high=1.0)
    if a["plus"] not in ELASTIC_PLUS or not isinstance(a["plus"], (bool, str)):
        raise ValueError(f"plus must be False, True (rank-matched) or 'official'; got {a['plus']!r}")
    margins = ElasticMargins(float(a["m"]), float(a["std"]), a["plus"], angular)
    return HeadParams(fallback=Fallback.MONOTONIC if angular else Fallback.NONE, row_margins=margins, **common)
