"""The head registry: each head declared once (``HeadSpec``: published defaults, argument docs, presets, weight
initialisation, state) with the validated mapping of its hyper-parameters onto the one parametrisation
(``HeadParams``, facekernels/_params.py). The modules (heads.py), the functional form (functional.py), the bench
and the tests derive from it; it sits below all of them."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

from . import _validate as V
from ._params import (
    ELASTIC_PLUS,
    AdaFaceMargins,
    ElasticMargins,
    Fallback,
    HeadParams,
    MagFaceMargins,
    Negatives,
)

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


# ------------------------------------------------------------------------------------------ the registry


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """One head, declared once: everything else (the nn.Module class in heads.py, head_names(), the exports, the
    functional form's ``head=`` names, ``facekernels-bench --heads`` and the tests' matrices) is derived from
    SPECS. A head that is one point of the parametrisation is a new HeadSpec here, and nothing else.

    Attributes:
        name: the ``head=`` name of the functional form and the bench ("arcface").
        class_name: the nn.Module's name ("ArcFace").
        defaults: the published hyper-parameters, in the constructor's positional order.
        build: (validated arguments, the options every head has) -> HeadParams; ``s`` is validated before.
        summary: the class docstring before its arguments.
        arg_docs: each argument of ``defaults`` (and ``generator``) -> its description.
        fallback_note: None when the head takes no ``fallback=`` (no angular margin); else the sentence added
            to its description ("" for none).
        filtering: takes insightface's ``interclass_filtering_threshold``.
        presets: name -> the constructor arguments of that trainer's head (``Head.like``).
        unit_norm_init: ``weight`` starts as unit-norm rows (the AdaFace and MagFace official code) instead of
            normal_(0, 0.01).
        state: buffer name -> initial value of the head's running state (0-dim float32, in state_dict, kept
            float32 by ``.half()``), updated by a training step: CurricularFace's ``t``, AdaFace's
            ``batch_mean`` / ``batch_std``. The functional form takes them by the same names.
        generator: the head draws random margins in training (ElasticFace): a ``generator=`` argument whose
            state is saved in state_dict.
        notes: text after the common arguments of the class docstring.
    """

    name: str
    class_name: str
    defaults: dict
    build: object
    summary: str
    arg_docs: dict
    fallback_note: str | None = None
    filtering: bool = False
    presets: dict = dataclasses.field(default_factory=dict)
    unit_norm_init: bool = False
    state: dict = dataclasses.field(default_factory=dict)
    generator: bool = False
    notes: str = ""

    def head_options(self) -> dict:
        """The keyword-only hyper-parameters after ``*`` and their defaults (None: the head's own fallback; 0:
        no filtering)."""
        return {**({"fallback": None} if self.fallback_note is not None else {}),
                **({"interclass_filtering_threshold": 0.0} if self.filtering else {})}  # fmt: skip

    def margin_names(self) -> tuple:
        """Every hyper-parameter ``head_params`` takes for this head."""
        return (*self.defaults, *self.head_options())

    def initial_state(self, device=None) -> dict:
        """The state's tensors as the module starts them, by name (the functional form's keyword arguments)."""
        import torch

        return {name: torch.full((), float(v), dtype=torch.float32, device=device) for name, v in self.state.items()}


SPECS: dict = {}  # name -> HeadSpec, in the order of the docs


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add ``spec`` to the registry (its name and class name new): head_params, the functional form and the
    bench take it from then on; heads.head_class(spec) builds its module."""
    if spec.name in SPECS or any(s.class_name == spec.class_name for s in SPECS.values()):
        raise ValueError(f"a head named {spec.name!r} or {spec.class_name!r} is already registered")
    unknown = set(spec.arg_docs) - set(spec.defaults) - {"generator"}
    missing = (set(spec.defaults) | ({"generator"} if spec.generator else set())) - set(spec.arg_docs)
    if "s" not in spec.defaults or unknown or missing:
        raise ValueError(f"{spec.name}: defaults must include s and arg_docs describe exactly its arguments; "
                         f"undocumented {sorted(missing)}, unknown {sorted(unknown)}")  # fmt: skip
    SPECS[spec.name] = spec
    return spec


def unregister_head(name: str) -> None:
    """Remove a head registered by ``register_head`` (tests)."""
    SPECS.pop(name)


def head_names() -> tuple:
    """The registered heads' names (the live registry: a head registered later is included)."""
    return tuple(SPECS)


def _angular(a: dict, common: dict, *, subcenters: int = 1) -> HeadParams:
    V.check_float("m", a["m"], low=0.0, high=math.pi, high_open=True)
    V.check_bool("easy_margin", a["easy_margin"])
    fallback = Fallback.POSITIVE if a["easy_margin"] else Fallback.MONOTONIC
    return HeadParams(m2=float(a["m"]), fallback=fallback, subcenters=subcenters, **common)


def _cosface(a: dict, common: dict) -> HeadParams:
    V.check_float("m", a["m"], low=0.0, high=V.MAX_ADDITIVE_MARGIN)
    return HeadParams(m3=float(a["m"]), **common)


def _combined(a: dict, common: dict) -> HeadParams:
    V.check_float("m1", a["m1"], low=0.0, low_open=True, high=V.MAX_M1)
    V.check_float("m2", a["m2"], low=0.0, high=math.pi, high_open=True)
    V.check_float("m3", a["m3"], low=0.0, high=V.MAX_ADDITIVE_MARGIN)
    m1, m2, m3 = float(a["m1"]), float(a["m2"]), float(a["m3"])
    fallback = Fallback.MONOTONIC if m1 == 1.0 and m3 == 0.0 else Fallback.NONE
    return HeadParams(m1=m1, m2=m2, m3=m3, fallback=fallback, **common)


def _subcenter(a: dict, common: dict) -> HeadParams:
    V.check_int("k", a["k"], minimum=1)
    if a["k"] > MAX_SUBCENTERS:
        raise ValueError(f"k must be in [1, {MAX_SUBCENTERS}]; got {a['k']}")
    return _angular(a, common, subcenters=int(a["k"]))


def _mv_softmax(a: dict, common: dict) -> HeadParams:
    V.check_float("m", a["m"], low=0.0, high=math.pi, high_open=True)
    V.check_float("t", a["t"], low=0.0, high=V.MAX_MV_T)
    V.check_bool("is_am", a["is_am"])
    m, mv = float(a["m"]), dict(negatives=Negatives.MV, mv_t=float(a["t"]))
    if a["is_am"]:
        return HeadParams(m3=m, fallback=Fallback.ABOVE_M3, **mv, **common)
    return HeadParams(m2=m, fallback=Fallback.POSITIVE, **mv, **common)


def _curricular(a: dict, common: dict) -> HeadParams:
    V.check_float("m", a["m"], low=0.0, high=math.pi, high_open=True)
    V.check_float("momentum", a["momentum"], low=0.0, high=1.0)
    return HeadParams(m2=float(a["m"]), fallback=Fallback.MONOTONIC, negatives=Negatives.CURRICULAR,
                      momentum=float(a["momentum"]), **common)  # fmt: skip


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


def _elastic(angular: bool, a: dict, common: dict) -> HeadParams:
    V.check_float("m", a["m"], low=0.0, high=math.pi if angular else V.MAX_ADDITIVE_MARGIN, high_open=angular)
    V.check_float("std", a["std"], low=0.0, high=1.0)
    if a["plus"] not in ELASTIC_PLUS or not isinstance(a["plus"], (bool, str)):
        raise ValueError(f"plus must be False, True (rank-matched) or 'official'; got {a['plus']!r}")
    margins = ElasticMargins(float(a["m"]), float(a["std"]), a["plus"], angular)
    return HeadParams(fallback=Fallback.MONOTONIC if angular else Fallback.NONE, row_margins=margins, **common)


_S = "scale of the logits."
_ARC_M = "angular margin in radians, in [0, pi)."
_EASY_MARGIN = """the classic option: the target logit is s * cos(theta) wherever cos(theta) <= 0 (the same
            as fallback="easy_margin")."""
_NO_OFFICIAL_FALLBACK = """ The official code has none ("none")."""
_ELASTIC = dict(
    std="the standard deviation of the margins drawn, in [0, 1].",
    plus="""ElasticFace+: False (margins in row order), True (paired by rank: the k-th largest target cosine
            gets the k-th smallest margin; ties to the lower row) or "official" (the published code's assignment,
            a permutation close to random: docs/heads.md).""",
    generator="""a torch.Generator for the draws (its state is saved in state_dict() as
            ``margin_generator._extra_state``); None: the default generator of the embeddings' device, as the
            official code. When sharded every rank uses the first rank's draws.""",
)

for _spec in (
    HeadSpec(
        "norm_softmax", "NormSoftmax", dict(s=64.0), lambda a, common: HeadParams(**common),
        """NormFace: the cross-entropy of the logits s * cos(theta), no margin.""",
        dict(s=_S), filtering=True,
    ),
    HeadSpec(
        "arcface", "ArcFace", dict(s=64.0, m=0.5, easy_margin=False), _angular,
        """ArcFace (additive angular margin): the target logit s * cos(theta + m), the others s * cos(theta).""",
        dict(s=_S, m=_ARC_M, easy_margin=_EASY_MARGIN), fallback_note="", filtering=True,
        presets={
            # arcface_torch (CombinedMarginLoss(64, 1, 0.5, 0) or ArcFace): cos(theta + m) as is, straight-through
            "insightface": dict(s=64.0, m=0.5, fallback="none", margin_grad="straight_through"),
            "curricularface": dict(s=64.0, m=0.5, fallback="monotonic"),  # head/metrics.py ArcFace
            "tface": dict(s=64.0, m=0.5, fallback="monotonic"),  # torchkit/head/localfc/arcface.py
            "facexzoo": dict(s=32.0, m=0.35, fallback="facexzoo"),  # head/ArcFace.py defaults (margin_am = 0)
            "pytorch-metric-learning": dict(s=64.0, m=math.radians(28.6), fallback="monotonic"),  # in degrees
        },
    ),
    HeadSpec(
        "cosface", "CosFace", dict(s=64.0, m=0.35), _cosface,
        """CosFace / AM-Softmax (additive cosine margin): the target logit s * (cos(theta) - m).""",
        dict(s=_S, m="cosine margin, >= 0."), filtering=True,
        presets={
            "insightface": dict(s=64.0, m=0.4),  # CombinedMarginLoss(64, 1, 0, 0.4) / CosFace(m=0.40)
            "facexzoo": dict(s=32.0, m=0.35),  # head/AM_Softmax.py defaults
            "pytorch-metric-learning": dict(s=64.0, m=0.35),  # CosFaceLoss defaults
        },
    ),
    HeadSpec(
        "combined", "CombinedMargin", dict(s=64.0, m1=1.0, m2=0.5, m3=0.0), _combined,
        """insightface's combined margin: the target logit s * (cos(m1 * theta + m2) - m3).

    m1 = 1, m3 = 0 is ArcFace (with its fallback); m1 = 1, m2 = 0 is CosFace.""",
        dict(s=_S, m1="multiplicative angular margin, > 0.", m2="additive angular margin in radians, in [0, pi).",
             m3="additive cosine margin, >= 0."),
        fallback_note=""" Only when m1 = 1 and m3 = 0.""", filtering=True,
        presets={
            # arcface_torch's CombinedMarginLoss in its ArcFace mode: no fallback, straight-through margin gradient
            "insightface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, fallback="none", margin_grad="straight_through"),
        },
    ),
    HeadSpec(
        "mv_softmax", "MVSoftmax", dict(s=32.0, m=0.35, t=0.2, is_am=True), _mv_softmax,
        """MV-Softmax (FaceX-Zoo): a margin on the target and the hard negatives reweighted to (t + 1) c + t.

    A class j is a hard negative when its cosine exceeds the target's margin-modified cosine (c - m for the AM
    variant, cos(theta + m) for the Arc one).""",
        dict(s=_S,
             m="""the margin: cosine margin (is_am=True; the target is c - m where c > m, else c) or angular margin in
            radians (is_am=False; the target is cos(theta + m) where c > 0, else c).""",
             t="weight of the hard negatives, >= 0 (FaceX-Zoo's mv_weight is t + 1: its default 1.12 is t = 0.12).",
             is_am="the AM (additive cosine) variant; False: the Arc variant."),
        fallback_note=""" Only the Arc variant.""",
        presets={"facexzoo": dict(s=32.0, m=0.35, t=0.12, is_am=True)},  # mv_weight = 1.12 = t + 1
    ),
    HeadSpec(
        "curricular", "CurricularFace", dict(s=64.0, m=0.5, momentum=0.01), _curricular,
        """CurricularFace: the ArcFace target and the hard negatives reweighted to c (t + c), t adaptive.

    A class j is a hard negative when its cosine exceeds cos(theta + m) of the target (before any fallback).
    ``t`` is a buffer (0-dim float32, saved in state_dict), initially 0, updated in training mode before the
    negatives are formed: t <- momentum * mean(target cosines) + (1 - momentum) * t, over the rows not
    ignored (the global batch when sharded); read but not updated in eval mode. Under gradient accumulation,
    ``frozen_t`` updates it once per optimizer step.""",
        dict(s=_S, m=_ARC_M, momentum="the EMA weight of t's update, in [0, 1] (official 0.01; TFace 0.1)."),
        fallback_note="",
        presets={
            "curricularface": dict(s=64.0, m=0.5, momentum=0.01),  # the official head/metrics.py
            "facexzoo": dict(s=64.0, m=0.5, momentum=0.01),  # head/CurricularFace.py, a copy of the official one
            "tface": dict(s=64.0, m=0.5, momentum=0.1),  # torchkit/head/localfc/curricularface.py: alpha = 0.1
        },
        state=dict(t=0.0),
        notes="""
    Further attributes: ``t`` (the buffer) and ``update_t`` (default True: whether training forwards update t).
""",
    ),
    HeadSpec(
        "adaface", "AdaFace", dict(s=64.0, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3), _adaface,
        """AdaFace (Kim, Jain, Liu, CVPR 2022): margins adapted to each embedding's norm, a proxy of image quality.

    With n_i = clip(||x_i||, 0.001, 100) (not differentiated) and the running statistics of n,
    z_i = clip(h (n_i - batch_mean) / (batch_std + eps), -1, 1); the target logit is
    s * (cos(clip(theta_i - m z_i, eps, pi - eps)) - m (1 + z_i)), every other logit s * cos(theta) with every
    cosine clamped to [-1 + eps, 1 - eps]. In training the statistics are updated first from the batch's
    norms (the global batch when sharded; the rows not ignored; std not with fewer than 2 rows):
    batch_mean <- t_alpha mean(n) + (1 - t_alpha) batch_mean, batch_std alike with the unbiased std. In eval
    mode they are read only. ``forward`` takes the embeddings unnormalised (the official head takes x / ||x||
    and ||x||); the gradient reaches them through x / ||x|| only. ``weight`` starts as unit-norm rows, as in the
    official code. Official: mk-minchul/AdaFace head.py (docs/heads.md says what differs).""",
        dict(s=_S, m="the margin, in [0, pi / 2].", h="the concentration of z (official 0.333).",
             t_alpha="""the statistics' EMA weight, in [0, 1] (the published training's 0.01; head.py's default 1.0:
            this batch's statistics only).""",
             eps="the cosine clamp, the angle clip and the std's offset, in (0, 0.5)."),
        unit_norm_init=True, state=dict(batch_mean=20.0, batch_std=100.0),
        notes="""
    Further attributes: the buffers ``batch_mean`` (initially 20) and ``batch_std`` (initially 100), 0-dim
    float32, saved in state_dict and kept float32 by ``.half()`` / ``.to(dtype)``.
""",
    ),
    HeadSpec(
        "magface", "MagFace",
        dict(s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, easy_margin=True, kind="arc"), _magface,
        """MagFace (Meng et al., CVPR 2021): a margin that grows with the embedding's norm, and a regulariser.

    With a_i = clamp(||x_i||, l_a, u_a) (differentiated) and m_i = l_m + (u_m - l_m) (a_i - l_a) / (u_a - l_a),
    the target logit is s * cos(theta_i + m_i) (kind "arc"; easy_margin: s * cos(theta_i) wherever
    cos(theta_i) <= 0; otherwise ArcFace's monotonic fallback) or s * (cos(theta_i) - m_i) (kind "cos"), and each
    row's loss gains lambda_g * (a_i / u_a^2 + 1 / a_i). The gradient reaches ||x_i|| through both (a radial term;
    none outside [l_a, u_a], as in the official code). ``weight`` starts as unit-norm rows, as in the official
    code. Official: IrvingMeng/MagFace models/magface.py with run/trainer.py's loss.""",
        dict(s=_S, l_a="lower bound of the norm, > 0.", u_a="upper bound of the norm, > l_a.",
             l_m="the margin at ||x|| <= l_a.", u_m="the margin at ||x|| >= u_a, >= l_m.",
             lambda_g="""weight of the regulariser g(a) = a / u_a^2 + 1 / a, >= 0 (the training scripts' 35; the
            trainer's check wants lambda_g >= s k u_a^2 l_a^2 / (u_a^2 - l_a^2), k = (u_m - l_m) / (u_a - l_a)).""",
             easy_margin="""kind "arc": cos(theta) wherever cos(theta) <= 0 (MagLinear's default, the published
            training); False: ArcFace's monotonic fallback c - sin(pi - m_i) m_i where theta + m_i > pi.""",
             kind="""\"arc" (additive angular margin) or "cos" (additive cosine margin: magface_dist.py)."""),
        unit_norm_init=True,
    ),
    HeadSpec(
        "elastic_arcface", "ElasticArcFace", dict(s=64.0, m=0.5, std=0.05, plus=False),
        functools.partial(_elastic, True),
        """ElasticArcFace (Boutros et al., CVPR-W 2022): ArcFace with each row's margin drawn from N(m, std^2).

    In training every row of the batch gets its own margin (one float32 draw per row, in row order; the
    official torch.normal draw when no row is ignored), the target logit s * cos(theta_i + m_i); in eval every
    row gets m (nothing drawn: a deterministic validation loss). Official: fdbtrs/ElasticFace utils/losses.py.""",
        dict(s=_S, m="the margins' mean, in [0, pi).", **_ELASTIC),
        fallback_note=_NO_OFFICIAL_FALLBACK, generator=True,
    ),
    HeadSpec(
        "elastic_cosface", "ElasticCosFace", dict(s=64.0, m=0.35, std=0.05, plus=False),
        functools.partial(_elastic, False),
        """ElasticCosFace (Boutros et al., CVPR-W 2022): CosFace with each row's margin drawn from N(m, std^2).

    As ElasticArcFace, with the target logit s * (cos(theta_i) - m_i).""",
        dict(s=_S, m="the margins' mean, >= 0.", **_ELASTIC), generator=True,
    ),
    HeadSpec(
        "subcenter_arcface", "SubCenterArcFace", dict(s=64.0, m=0.5, k=3, easy_margin=False), _subcenter,
        """Sub-center ArcFace (Deng et al., ECCV 2020): k sub-centers per class, the class cosine their max.

    ``weight`` is (num_classes * k, in_features), class-major: row j * k + i is sub-center i of class j (the
    official MXNet layout). Everything else is ArcFace on the class cosines; the gradient of a class goes to its
    (first) maximising sub-center only. The paper's second stage (dropping non-dominant sub-centers) is offline.""",
        dict(s=_S, m=_ARC_M, k="sub-centers per class, in [1, 64] (the paper's 3).", easy_margin="as ArcFace's."),
        fallback_note=_NO_OFFICIAL_FALLBACK,
    ),
):
    register_head(_spec)
del _spec


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
        head: a registered head's name (head_names(): "arcface", "cosface", ...).
        reduction: "mean", "sum" or "none".
        ignore_index: the label of ignored rows.
        margin_grad: "exact" or "straight_through".
        **margins: the head's own arguments (s, m, easy_margin, m1, m2, m3, t, is_am, momentum, h, t_alpha, eps,
            l_a, u_a, l_m, u_m, lambda_g, kind, std, plus, k, fallback, interclass_filtering_threshold; as the
            modules take them), each defaulting to the published value.

    Returns:
        The HeadParams every backend computes with.
    """
    V.check_choice("head", head, head_names())
    spec = SPECS[head]
    V.check_head_options(reduction, ignore_index, margin_grad)
    # every head's functional form takes these two (a head without them only refuses a value that would act)
    fallback = margins.pop("fallback", None)
    threshold = margins.pop("interclass_filtering_threshold", 0.0)
    unknown = set(margins) - set(spec.defaults)
    if unknown:
        raise TypeError(f"{head} got unexpected argument(s) {sorted(unknown)}; it takes {sorted(spec.defaults)}")
    a = {**spec.defaults, **margins}
    V.check_float("s", a["s"], low=0.0, low_open=True, high=V.MAX_SCALE)
    common = dict(s=float(a["s"]), reduction=reduction, ignore_index=int(ignore_index), margin_grad=margin_grad)
    params = with_fallback(spec.build(a, common), fallback, head=head, easy_margin=margins.get("easy_margin", False))
    V.check_float("interclass_filtering_threshold", threshold, low=0.0, high=1.0)
    if threshold > 0 and not spec.filtering:
        filtering = ", ".join(name for name, s in SPECS.items() if s.filtering)
        raise ValueError(
            f"interclass_filtering_threshold applies to {filtering} (insightface defines no interaction with "
            f"hard-negative reweighting or per-row margins); got {threshold} for head={head!r}"
        )
    # 0 turns it off (insightface's "> 0" test)
    return dataclasses.replace(params, filter_threshold=float(threshold) if threshold > 0 else math.inf)
