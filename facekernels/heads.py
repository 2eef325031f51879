"""The margin-softmax heads as ``nn.Module``s (semantics: docs/heads.md; other trainers: docs/migration.md).

Each head owns ``weight``: (num_classes, in_features), one row per class, except SubCenterArcFace's
(num_classes * k, in_features), k rows per class (num_local classes' rows on each rank of a class-sharded head).
It starts as the head's official code starts it (``reset_parameters``): ``normal_(0, 0.01)``, or unit-norm
rows for AdaFace and MagFace. The forward returns the cross-entropy loss of the head's logits; the logits
themselves are never returned (the fused backends never form them).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref

import torch
from torch import nn

from . import _validate as V
from ._algorithm import live_group
from ._backends import head_loss
from ._head_params import SPECS, HeadSpec, head_params
from ._rowmath import MarginState


def _fixed(name: str, why: str) -> property:
    """An attribute set once, in the constructor: setting it later raises (it shapes the weight or the shard,
    so a new value could not take effect)."""
    key = "_" + name

    def get(self):
        return self.__dict__[key]

    def set(self, value):
        if key in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.{name} is fixed at construction ({why}); build a new head")
        self.__dict__[key] = value

    return property(get, set, doc=f"Fixed at construction ({why}).")


def _process_group_property() -> property:
    """The torch.distributed group the classes are sharded over (None: one device), fixed at construction. Held
    by a weak reference: a head (or a graph it left) must not keep the group alive past destroy_process_group,
    after which gloo frees it at interpreter exit and aborts the process."""

    def get(self):
        return live_group(self.__dict__["_process_group"])

    def set(self, value):
        if "_process_group" in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.process_group is fixed at construction (the class split); "
                                 "build a new head")  # fmt: skip
        if value is not None:
            from .sharded import check_sharded_backend

            check_sharded_backend(self.backend)  # first: the reference backend has no sharded mode at all
            V.check_process_group(value)
        self.__dict__["_process_group"] = None if value is None else weakref.ref(value)

    return property(get, set, doc=_process_group_property.__doc__)


def _fixed_margin(name: str, why: str) -> property:
    """A constructor hyper-parameter that cannot change after construction (sub-centers: the weight's rows)."""

    def get(self):
        return self.margins[name]

    def set(self, value):
        raise AttributeError(f"{type(self).__name__}.{name} is fixed at construction ({why}); build a new head")

    return property(get, set, doc=f"Fixed at construction ({why}).")


def _option(name: str) -> property:
    """A hyper-parameter or option that may be set after construction: validated as in the constructor, and the
    head's parameters rebuilt, so the next forward uses it."""

    def get(self):
        return self.margins[name] if name in self.margins else getattr(self.params, name)

    def set(self, value):
        self._rebuild(**{name: value})

    return property(get, set, doc=f"The head's ``{name}``; settable (validated, used from the next forward).")


# constructor arguments that are not margins (handled by _MarginHead itself)
_NOT_MARGINS = frozenset({"self", "in_features", "num_classes", "reduction", "ignore_index", "margin_grad", "backend",
                          "process_group", "sample_rate", "sample_seed", "generator"})  # fmt: skip


class _SavedGenerator:
    """A module's torch.Generator (in the attribute named ``_generator_attribute``) saved in state_dict() as its
    extra state, so that a run resumed from a checkpoint draws the same numbers: a uint8 tensor (the generator's
    state, empty without a generator), so that every value of state_dict() stays a tensor (safetensors, EMA
    helpers). A state dict without it (another trainer's layout, an older checkpoint) still loads."""

    _generator_attribute: str
    _extra_state_key: str  # the extra state's key in the head's state_dict(), for errors

    def get_extra_state(self) -> torch.Tensor:
        """The generator's state (a uint8 tensor; empty without a generator), for state_dict()."""
        generator = getattr(self, self._generator_attribute)
        return torch.empty(0, dtype=torch.uint8) if generator is None else generator.get_state()

    def set_extra_state(self, state) -> None:
        """Restore the generator from ``state`` (get_extra_state's tensor; empty: leave it as it is).

        Args:
            state: a 1-D uint8 tensor.
        """
        generator = _restored_generator(getattr(self, self._generator_attribute), state, self._extra_state_key)
        setattr(self, self._generator_attribute, generator)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        key = prefix + "_extra_state"  # missing: nothing to restore, the generator stays as it is
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)


class _MarginHead(_SavedGenerator, nn.Module):
    # Partial FC's sampling generator is module state (_SavedGenerator): a run resumed from state_dict() draws the
    # same classes
    _generator_attribute, _extra_state_key = "sample_generator", "_extra_state"
    spec: HeadSpec  # the head's declaration in the registry (facekernels/_head_params.py)
    head: str  # spec.name
    presets: dict = {}  # name -> constructor arguments that reproduce that trainer's head (see like())
    unit_norm_init = False  # reset_parameters: unit-norm rows (AdaFace, MagFace official) instead of N(0, 0.01)
    float32_buffers: tuple = ()  # running statistics kept float32 by .half() / .to(dtype) (see _apply)
    # the facekernels.optim optimizer attached to this head (it sets this); its update runs in the backward
    _fused_optimizer = None

    in_features = _fixed("in_features", "the weight's shape")
    num_classes = _fixed("num_classes", "the weight's shape and the class split")
    process_group = _process_group_property()
    class_start = _fixed("class_start", "this rank's shard")
    num_local = _fixed("num_local", "this rank's shard")
    reduction = _option("reduction")
    ignore_index = _option("ignore_index")
    margin_grad = _option("margin_grad")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # every hyper-parameter of the constructor is an attribute that takes effect when set; k (sub-centers)
        # shapes the weight
        for name, arg in inspect.signature(cls.__init__).parameters.items():
            if name in _NOT_MARGINS or arg.kind is arg.VAR_KEYWORD or name in vars(cls):
                continue
            setattr(cls, name, _fixed_margin(name, "the weight's shape") if name == "k" else _option(name))

    def __init__(self, in_features, num_classes, *, reduction, ignore_index, margin_grad, backend, process_group,
                 sample_rate, sample_seed, **margins):  # fmt: skip
        super().__init__()
        # forward returns (loss, HeadStats) when True: per-row target cosine, top-1 correctness and the target's
        # margin-free rank (monitoring)
        self.return_stats = False
        V.check_int("in_features", in_features, minimum=1)
        V.check_int("num_classes", num_classes, minimum=1)
        V.check_backend("heads", backend)
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.margins = margins
        self.params = head_params(
            self.head, reduction=reduction, ignore_index=ignore_index, margin_grad=margin_grad, **margins
        )
        self.backend = backend
        # class sharding (facekernels/sharded.py): this rank's classes [class_start, class_start + num_local)
        self.process_group = process_group
        self.sample_rate = float(sample_rate)  # < 1 raises without a process group
        shard = (0, self.num_classes)
        self.sample_generator = None
        if process_group is not None:
            from .sharded import shard_range

            world = torch.distributed.get_world_size(process_group)
            if self.num_classes < world:
                raise ValueError(f"num_classes must be >= the world size {world}; got {self.num_classes}")
            rank = torch.distributed.get_rank(process_group)
            shard = shard_range(self.num_classes, world, rank)
            if sample_seed is not None:
                self.sample_generator = torch.Generator().manual_seed(int(sample_seed))
        self.class_start, self.num_local = shard
        # sub-centers: k rows per class, class j's rows j k .. j k + k - 1 (a shard keeps a class's rows together)
        self.weight = nn.Parameter(torch.empty(self.num_local * self.params.subcenters, self.in_features))
        self.reset_parameters()
        for name, value in self.spec.initial_state().items():  # the running state that training steps update
            self.register_buffer(name, value)

    def _rebuild(self, **changes) -> None:
        """Rebuild ``params`` with some options or margins changed (validated: a bad value raises and changes
        nothing)."""
        options = {n: getattr(self.params, n) for n in ("reduction", "ignore_index", "margin_grad")}
        margins = dict(self.margins)
        for name, value in changes.items():
            (options if name in options else margins)[name] = value
        self.params = head_params(self.head, **options, **margins)
        self.margins = margins

    @property
    def backend(self) -> str:
        """"auto", "cpu", "triton" or "reference"; settable (validated; the next forward uses it)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        V.check_backend("heads", value)
        if self.__dict__.get("_process_group") is not None:
            from .sharded import check_sharded_backend

            check_sharded_backend(value)
        self._backend = value

    @property
    def return_stats(self) -> bool:
        """Whether forward returns (loss, HeadStats); settable."""
        return self._return_stats

    @return_stats.setter
    def return_stats(self, value: bool) -> None:
        V.check_bool("return_stats", value)
        self._return_stats = value

    @property
    def sample_rate(self) -> float:
        """Partial FC's fraction of each rank's classes per step; settable (below 1 only when sharded)."""
        return self._sample_rate

    @sample_rate.setter
    def sample_rate(self, value: float) -> None:
        V.check_float("sample_rate", value, low=0.0, high=1.0, low_open=True)
        if value != 1.0 and self.__dict__.get("_process_group") is None:
            raise ValueError("sample_rate < 1 (Partial FC) needs a process_group (the class-sharded mode)")
        self._sample_rate = float(value)

    @property
    def sample_seed(self):
        raise AttributeError("sample_seed is only a constructor argument; see head.sample_generator")

    @sample_seed.setter
    def sample_seed(self, value) -> None:
        raise AttributeError("sample_seed is only a constructor argument (the generator is built from it); reseed "
                             "with head.sample_generator.manual_seed(seed)")  # fmt: skip

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
        """Re-initialise ``weight`` as the head's official code does: normal_(0, 0.01) (insightface's,
        CurricularFace's, ElasticFace's, Sub-center ArcFace's), or for AdaFace and MagFace uniform_(-1, 1) with
        every row then scaled to norm 1. (The effective learning rate of normalised weights scales with
        1 / ||w||^2, so a migrated recipe needs its official start.)"""
        if not self.unit_norm_init:
            nn.init.normal_(self.weight, 0.0, 0.01)
            return
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def _t(self):
        return None

    def _state(self) -> MarginState | None:
        # the state's tensors other than t (which the backends take on its own): AdaFace's statistics
        tensors = {name: getattr(self, name) for name in self.spec.state if name != "t"}
        return MarginState(**tensors) if tensors else None

    def _is_training_step(self) -> bool:
        # whether this forward is a training step, the `training` the backends get: it updates the head's running
        # state (CurricularFace's t, AdaFace's statistics) and draws ElasticFace's margins, and nothing else
        return self.training

    def _apply(self, fn, *args, **kwargs):
        # .half() / .double() / .to(dtype) convert the weight; the running statistics stay float32, with their
        # values from before the cast (casting back from float16 would round them: 0.12345679 -> 0.12353516)
        before = {name: getattr(self, name) for name in self.float32_buffers}
        super()._apply(fn, *args, **kwargs)
        for name, value in before.items():
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, value.to(getattr(self, name).device))
        return self

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of a batch.

        Args:
            embeddings: (B, d) float16, bfloat16, float32 or float64 tensor, not normalised (the head does it).
            labels: (B,) int64 (or int32) class ids in [0, num_classes), or ignore_index.

        Returns:
            The loss: a 0-dim tensor, or the (B,) row losses with reduction="none"; float32 (float64 for
            float64 inputs). With ``head.return_stats = True``: (loss, HeadStats), the per-row target cosine,
            top-1 correctness and margin-free rank (``stats.topk(k)``: Prec@k as official trainers log it) of
            the batch (of the global batch when sharded), computed in the fused pass
            (``facekernels.functional.margin_cross_entropy``, return_stats).
        """
        stats = bool(self.return_stats)
        # a fused optimizer updates the weight in the backward of a training-mode forward only: in eval mode the
        # head is an ordinary one (its backward, if any, fills weight.grad and updates nothing)
        update = self._fused_optimizer if self.training else None
        if self.process_group is not None:
            from .sharded import sharded_margin_cross_entropy

            return sharded_margin_cross_entropy(
                embeddings, self.weight, labels, self.params, self._t(), self._is_training_step(), group=self.process_group,
                num_classes=self.num_classes, class_start=self.class_start, backend=self.backend,
                sample_rate=self.sample_rate, generator=self.sample_generator, stats=stats, state=self._state(),
                config={"head": type(self).__name__, **self.margins}, update=update,
            )  # fmt: skip
        return head_loss(embeddings, self.weight, labels, self.params, t=self._t(), training=self._is_training_step(),
                         backend=self.backend, stats=stats, state=self._state(), update=update)  # fmt: skip

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
        num_classes: number of classes C; ``weight`` has one row per class (k per class for SubCenterArcFace),
            of this rank's num_local classes on a class-sharded head."""
_FALLBACK = """
        fallback: the target logit where theta + m > pi: None (this head's own), "monotonic"
            (c - sin(pi - m) m: CurricularFace, TFace, pytorch-metric-learning), "none" (cos(theta + m) as is:
            insightface), "facexzoo" (c: FaceX-Zoo's ArcFace) or a number a >= 0 (c - a: FaceX-Zoo's
            margin_am), "easy_margin" (c wherever c <= 0)."""
_FILTER = """
        interclass_filtering_threshold: insightface's inter-class filtering (its CombinedMarginLoss option, for
            noisy data such as WebFace42M): a non-target class whose cosine exceeds it gets the logit 0 (still
            in the softmax's sum) and no gradient; 0 (the default) turns it off. In [0, 1]."""
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
        weight: the class weights, a Parameter of shape (num_classes, in_features) ((num_classes * k,
            in_features) for SubCenterArcFace; num_local classes when sharded), initialised by
            ``reset_parameters``: {init}.
        params: the HeadParams the backends compute with.
        Every constructor argument above is an attribute. The hyper-parameters (s, m, ...), reduction,
        ignore_index, margin_grad, backend, sample_rate and return_stats may be set after construction: validated
        as in the constructor, they take effect at the next forward. in_features, num_classes, k, process_group,
        class_start and num_local are fixed (they shape the weight or the shard): setting one raises
        AttributeError.

    ``forward(embeddings, labels)`` returns the loss; ``Head.like(preset, in_features, num_classes)`` builds
    the head configured as a published trainer's (``presets``). Semantics: docs/heads.md.
"""


class _TBufferHead(_MarginHead):
    """A head with a running ``t`` that training steps update (CurricularFace), and ``update_t`` / ``frozen_t``
    to hold it during gradient accumulation."""

    def __init__(self, in_features, num_classes, **kwargs):
        super().__init__(in_features, num_classes, **kwargs)
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

    def _is_training_step(self) -> bool:
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


class _GeneratorState(_SavedGenerator, nn.Module):
    """Holds an ElasticFace head's margin generator (``_SavedGenerator``)."""

    _generator_attribute, _extra_state_key = "generator", "margin_generator._extra_state"

    def __init__(self, generator: torch.Generator | None):
        super().__init__()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
        self.generator = generator


def _restored_generator(generator: torch.Generator | None, state, key: str) -> torch.Generator | None:
    """``generator`` (a new CPU one when None) holding ``state``; unchanged when ``state`` is empty."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
        raise ValueError(f"{key} must be a 1-D uint8 tensor (a generator's state)")
    if state.numel() == 0:
        return generator  # saved without a generator: keep this head's own
    generator = generator if generator is not None else torch.Generator()
    try:
        generator.set_state(state.cpu())
    except RuntimeError as err:
        raise ValueError(f"{key} does not fit a {generator.device.type} generator ({err}); build the head with a "
                         "generator on the saved generator's device to restore it") from err  # fmt: skip
    return generator


class _ElasticHead(_MarginHead):
    def __init__(self, in_features, num_classes, *, generator, **kwargs):
        super().__init__(in_features, num_classes, **kwargs)
        self.margin_generator = _GeneratorState(generator)

    def _state(self) -> MarginState:
        return MarginState(generator=self.margin_generator.generator)


# ------------------------------------------------------------------------------ the classes, from the registry

# every head's keyword-only options after its own (handled by _MarginHead), with their defaults
_OPTIONS = dict(reduction="mean", ignore_index=-100, margin_grad="exact", backend="auto", process_group=None,
                sample_rate=1.0, sample_seed=None)  # fmt: skip


def head_signature(spec: HeadSpec) -> inspect.Signature:
    """The constructor's signature: (in_features, num_classes, the published defaults[, generator], *, fallback,
    interclass_filtering_threshold where the head takes them, reduction, ..., sample_seed)."""
    P = inspect.Parameter
    positional = {"self": P.empty, "in_features": P.empty, "num_classes": P.empty, **spec.defaults,
                  **({"generator": None} if spec.generator else {})}  # fmt: skip
    return inspect.Signature(
        [P(name, P.POSITIONAL_OR_KEYWORD, default=v) for name, v in positional.items()]
        + [P(name, P.KEYWORD_ONLY, default=v) for name, v in {**spec.head_options(), **_OPTIONS}.items()]
    )


def head_docstring(spec: HeadSpec) -> str:
    """The class docstring: the spec's summary and argument docs, then the arguments every head takes."""
    args = "".join(f"\n        {name}: {text}" for name, text in spec.arg_docs.items())
    init = ("uniform_(-1, 1), each row then scaled to norm 1 (it starts as unit-norm rows)" if spec.unit_norm_init
            else "normal_(0, 0.01)")  # fmt: skip
    return (
        spec.summary + "\n\n    Args:" + _SIZES + args
        + ("" if spec.fallback_note is None else _FALLBACK + spec.fallback_note)
        + (_FILTER if spec.filtering else "")
        + _COMMON.format(init=init) + spec.notes
    )  # fmt: skip


def head_class(spec: HeadSpec) -> type:
    """The nn.Module of a registered head: its signature, docstring, presets, initialisation and state are
    the spec's. (Every head's class is built here, the built-in ones at import.)"""
    base = _TBufferHead if "t" in spec.state else _ElasticHead if spec.generator else _MarginHead
    signature = head_signature(spec)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        base.__init__(self, **arguments)

    __init__.__signature__ = signature
    __init__.__doc__ = "Build the head; the arguments are described in the class docstring."
    __init__.__qualname__ = f"{spec.class_name}.__init__"
    namespace = dict(__init__=__init__, __doc__=head_docstring(spec), __module__=__name__, __qualname__=spec.class_name,
                     spec=spec, head=spec.name, presets=dict(spec.presets), unit_norm_init=spec.unit_norm_init,
                     float32_buffers=tuple(spec.state))  # fmt: skip
    return type(spec.class_name, (base,), namespace)


_CLASSES: dict = {}  # name -> class, built once per spec


def module_class(name: str) -> type:
    """The nn.Module class of the registered head ``name`` (e.g. "arcface" -> facekernels.ArcFace)."""
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"no registered head {name!r}; registered: {', '.join(SPECS)}")
    if name not in _CLASSES or _CLASSES[name].spec is not spec:
        _CLASSES[name] = head_class(spec)
    return _CLASSES[name]


HEAD_CLASSES = {spec.class_name: module_class(name) for name, spec in SPECS.items()}  # the built-in heads
globals().update(HEAD_CLASSES)
__all__ = [*HEAD_CLASSES, "HEAD_CLASSES", "head_class", "head_params", "module_class"]

