"""Head checkpoints in other trainers' layouts, read into facekernels' layout and written back out.

facekernels stores a head's class weights as ``weight`` of shape (C, d), one row per class as in
``nn.Linear``, and CurricularFace's running ``t`` as a 0-dim float32 buffer. Several trainers store the
transpose, (d, C), one column per class:

- the official CurricularFace repository (head/metrics.py: ArcFace, CurricularFace) and TFace's localfc heads:
  ``kernel`` (d, C), and CurricularFace's ``t`` of shape (1,): :func:`from_curricularface`,
  :func:`to_curricularface`;
- FaceX-Zoo: ArcFace, AM_Softmax and MV_Softmax store ``weight`` (d, C); its CurricularFace has the official
  layout: :func:`from_facexzoo`, :func:`to_facexzoo`;
- AdaFace (its AdaFace, ArcFace and CosFace heads): ``kernel`` (d, C); the AdaFace head also ``batch_mean``,
  ``batch_std`` (1,) and an unused ``t``: :func:`from_adaface`, :func:`to_adaface`;
- pytorch-metric-learning (ArcFaceLoss, CosFaceLoss, ...): ``W`` (d, C):
  :func:`from_pytorch_metric_learning`, :func:`to_pytorch_metric_learning`;
- MagFace (models/magface.py MagLinear, the single-process trainer.py): ``weight`` (d, C): :func:`from_magface`,
  :func:`to_magface`. Its model-parallel trainer_dist.py (ParallelMagLinear) stores ``weight`` (C, d), gathered
  over the ranks: our layout, no conversion;
- ElasticFace (utils/losses.py: ElasticArcFace, ElasticCosFace, ArcFace, CosFace): ``kernel`` (d, C):
  :func:`from_elasticface`, :func:`to_elasticface`;
- insightface arcface_torch's PartialFC_V2: ``weight`` (num_local, d) per rank, with the class split of the
  class-sharded heads here (``process_group=``): it loads as it is, no conversion (on one process,
  num_local = C);
- insightface's Sub-center ArcFace (MXNet, recognition/subcenter_arcface): ``fc7`` (C k, d), row j k + i the
  sub-center i of class j: the layout of ``SubCenterArcFace.weight``, no conversion. Its params file splits it
  over the GPUs as ``fc7_0_weight``, ``fc7_1_weight``, ... (ceil(C / GPUs) k rows each, the last padded):
  concatenate them in order and keep the first C k rows.

Every function takes a state dict and a ``prefix`` (``"head."`` for a whole-model checkpoint whose head
lives under ``head``) and returns a new dict: the head's keys under ``prefix`` converted, every other key
passed through unchanged; with ``strip_prefix=True`` only the head's keys, without the prefix, ready for a
standalone head's ``load_state_dict(..., strict=True)``. Converting is not idempotent for the transposed
layouts (a square weight cannot tell its layout), so convert each checkpoint once.

The optimizer's per-parameter state (SGD's ``momentum_buffer``, Adam's ``exp_avg`` and ``exp_avg_sq``, ...)
has the parameter's shape, so it needs the same transpose: :func:`transpose_optimizer_state` with the
indices that :func:`param_indices` gives.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping

import torch

# the extra state that our heads save, a generator's state (every head: Partial FC's sampling generator; the
# ElasticFace heads also their margin generator); no other trainer has it, so writing out drops it
_EXTRA_STATES = ("_extra_state", "margin_generator._extra_state")

# our heads' running statistics, by the head that has them: a layout without that head cannot take them
_BUFFERS = {"t": "CurricularFace", "batch_mean": "AdaFace", "batch_std": "AdaFace"}


def _tensor(state_dict: Mapping, key: str) -> torch.Tensor:
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state_dict[{key!r}] must be a tensor; got {type(value).__name__}")
    return value


def _transposed(state_dict: Mapping, key: str) -> torch.Tensor:
    weight = _tensor(state_dict, key)
    if weight.dim() != 2:
        raise ValueError(f"state_dict[{key!r}] must be 2-D (a class-weight matrix); got shape {tuple(weight.shape)}")
    return weight.t().contiguous()


def _running_stat_in(state_dict: Mapping, key: str) -> torch.Tensor:
    """Their (1,) running statistic (t, batch_mean, batch_std) as our 0-dim float32 buffer."""
    value = _tensor(state_dict, key)
    if value.numel() != 1:
        raise ValueError(f"state_dict[{key!r}] must hold one number; got shape {tuple(value.shape)}")
    return value.detach().reshape(()).to(torch.float32).clone()


def _running_stat_out(state_dict: Mapping, key: str) -> torch.Tensor:
    """Our 0-dim buffer as their (1,) one (they register ``torch.zeros(1)``, float32)."""
    return _running_stat_in(state_dict, key).reshape(1)


def _check_state_dict(state_dict, prefix: str) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors; got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string; got {type(prefix).__name__}")


def _require(state_dict: Mapping, prefix: str, key: str, layout: str) -> None:
    if prefix + key not in state_dict:
        found = sorted(k[len(prefix):] for k in state_dict if k.startswith(prefix))
        raise KeyError(f"{layout}: no {prefix + key!r} in the state dict; its keys under {prefix!r}: {found}")


def _convert(state_dict, prefix: str, rules: dict, layout: str, required: str) -> dict:
    """A copy of ``state_dict`` with the head's keys under ``prefix`` rewritten by ``rules``:
    their name -> (new name or None to drop, function(state_dict, key) -> tensor)."""
    _check_state_dict(state_dict, prefix)
    _require(state_dict, prefix, required, layout)
    out = {}
    for key, value in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in rules:
            new_name, fn = rules[name]
            if new_name is not None:
                out[prefix + new_name] = fn(state_dict, key)
        else:
            out[key] = value
    return out


def _keep(state_dict: Mapping, key: str):
    return state_dict[key]


def _out_rules(rules: dict) -> dict:
    """``rules`` for writing ours out, plus dropping our extra state."""
    return {**rules, **{key: (None, _keep) for key in _EXTRA_STATES}}


def _reject_buffers(state_dict: Mapping, prefix: str, trainer: str, keep: tuple = ()) -> None:
    """Raise if the state dict holds a running statistic (other than ``keep``) of a head ``trainer`` lacks."""
    for key, head in _BUFFERS.items():
        if key not in keep and prefix + key in state_dict:
            raise ValueError(f"{trainer} has no {head} head (this state dict has a {key!r} buffer)")


def _strippable(fn):
    """Give a converter the keyword ``strip_prefix``: True returns only the keys under ``prefix``, without it
    (a whole-model checkpoint's head, for a standalone head), instead of the whole converted dict."""

    @functools.wraps(fn)
    def wrapper(state_dict: Mapping, prefix: str = "", *, strip_prefix: bool = False) -> dict:
        if not isinstance(strip_prefix, bool):
            raise TypeError(f"strip_prefix must be a bool; got {type(strip_prefix).__name__}")
        out = fn(state_dict, prefix)
        if strip_prefix:
            out = {key[len(prefix):]: value for key, value in out.items() if key.startswith(prefix)}
        return out

    signature = inspect.signature(fn)
    strip = inspect.Parameter("strip_prefix", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), strip])
    wrapper.__doc__ = (fn.__doc__ or "") + (
        "\n    Keyword Args:\n        strip_prefix: True: return only the head's keys, without ``prefix`` (for a "
        "standalone head's load_state_dict); False (default): every key.\n"
    )
    return wrapper


@_strippable
def from_curricularface(state_dict: Mapping, prefix: str = "") -> dict:
    """Read the official CurricularFace repository's head (and TFace's localfc heads, same layout).

    Args:
        state_dict: their state dict: ``kernel`` (d, C) and, for CurricularFace, ``t`` of shape (1,).
        prefix: where the head's keys start (e.g. ``"head."``); keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``weight`` (C, d) and ``t`` as a 0-dim float32 tensor, for ``fk.CurricularFace`` or
        ``fk.ArcFace`` (``load_state_dict``).
    """
    rules = {"kernel": ("weight", _transposed), "t": ("t", _running_stat_in)}
    return _convert(state_dict, prefix, rules, "CurricularFace layout", "kernel")


@_strippable
def to_curricularface(state_dict: Mapping, prefix: str = "") -> dict:
    """Write a facekernels head out in the official CurricularFace (and TFace localfc) layout.

    Args:
        state_dict: ours: ``weight`` (C, d) and, for CurricularFace, the 0-dim ``t``.
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``kernel`` (d, C) and ``t`` of shape (1,) (without our ``_extra_state``).
    """
    _check_state_dict(state_dict, prefix)
    _reject_buffers(state_dict, prefix, "the CurricularFace layout", keep=("t",))
    rules = _out_rules({"weight": ("kernel", _transposed), "t": ("t", _running_stat_out)})
    return _convert(state_dict, prefix, rules, "facekernels layout", "weight")


@_strippable
def from_facexzoo(state_dict: Mapping, prefix: str = "") -> dict:
    """Read a FaceX-Zoo head: ArcFace, AM_Softmax and MV_Softmax store ``weight`` (d, C); its CurricularFace
    stores ``kernel`` (d, C) and ``t`` (1,), as the official one.

    Args:
        state_dict: their state dict (FaceX-Zoo's checkpoints hold the model under ``"state_dict"``, with the
            head's keys under ``"head."``).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``weight`` (C, d) (and ``t`` 0-dim float32 for CurricularFace).
    """
    _check_state_dict(state_dict, prefix)
    if prefix + "kernel" in state_dict:
        return from_curricularface(state_dict, prefix)
    return _convert(state_dict, prefix, {"weight": ("weight", _transposed)}, "FaceX-Zoo layout", "weight")


@_strippable
def to_facexzoo(state_dict: Mapping, prefix: str = "") -> dict:
    """Write a facekernels head out in FaceX-Zoo's layout: ``weight`` (d, C), or for a CurricularFace head
    (one with ``t``) ``kernel`` (d, C) and ``t`` (1,).

    Args:
        state_dict: ours: ``weight`` (C, d) (and ``t`` for CurricularFace).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.
    """
    _check_state_dict(state_dict, prefix)
    if prefix + "t" in state_dict:
        return to_curricularface(state_dict, prefix)
    _reject_buffers(state_dict, prefix, "FaceX-Zoo")
    rules = _out_rules({"weight": ("weight", _transposed)})
    return _convert(state_dict, prefix, rules, "facekernels layout", "weight")


@_strippable
def from_adaface(state_dict: Mapping, prefix: str = "") -> dict:
    """Read an AdaFace repository head (AdaFace, ArcFace or CosFace of its head.py).

    Args:
        state_dict: their state dict: ``kernel`` (d, C); the AdaFace head also has ``batch_mean``,
            ``batch_std`` (1,) and an unused ``t`` (1,). Their Lightning checkpoints hold the head under
            ``"head."`` in ``"state_dict"``.
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``weight`` (C, d) (and ``batch_mean``, ``batch_std`` as 0-dim float32 tensors); the
        unused ``t`` is dropped. Load an ArcFace or CosFace head's result into ``fk.ArcFace`` / ``fk.CosFace``.
    """
    rules = {
        "kernel": ("weight", _transposed),
        "batch_mean": ("batch_mean", _running_stat_in),
        "batch_std": ("batch_std", _running_stat_in),
        "t": (None, _keep),  # registered by their AdaFace head but never read or updated
    }
    return _convert(state_dict, prefix, rules, "AdaFace layout", "kernel")


@_strippable
def to_adaface(state_dict: Mapping, prefix: str = "") -> dict:
    """Write a facekernels head out in the AdaFace repository's layout.

    Args:
        state_dict: ours: ``weight`` (C, d) (and ``batch_mean``, ``batch_std`` for an AdaFace head).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``kernel`` (d, C); with ``batch_mean`` present also ``batch_mean``, ``batch_std`` of
        shape (1,) and the zero ``t`` (1,) that their AdaFace head registers.
    """
    _check_state_dict(state_dict, prefix)
    _reject_buffers(state_dict, prefix, "the AdaFace repository", keep=("batch_mean", "batch_std"))
    rules = _out_rules({
        "weight": ("kernel", _transposed),
        "batch_mean": ("batch_mean", _running_stat_out),
        "batch_std": ("batch_std", _running_stat_out),
    })  # fmt: skip
    out = _convert(state_dict, prefix, rules, "facekernels layout", "weight")
    if prefix + "batch_mean" in state_dict:
        out[prefix + "t"] = torch.zeros(1)
    return out


@_strippable
def from_pytorch_metric_learning(state_dict: Mapping, prefix: str = "") -> dict:
    """Read a pytorch-metric-learning classification loss (ArcFaceLoss, CosFaceLoss, ...).

    Args:
        state_dict: ``loss_func.state_dict()``: ``W`` (d, C).
        prefix: where the loss's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``weight`` (C, d).
    """
    return _convert(state_dict, prefix, {"W": ("weight", _transposed)}, "pytorch-metric-learning layout", "W")


@_strippable
def to_pytorch_metric_learning(state_dict: Mapping, prefix: str = "") -> dict:
    """Write a facekernels head out as a pytorch-metric-learning loss's state: ``W`` (d, C).

    Args:
        state_dict: ours: ``weight`` (C, d).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.
    """
    _check_state_dict(state_dict, prefix)
    _reject_buffers(state_dict, prefix, "pytorch-metric-learning")
    return _convert(state_dict, prefix, _out_rules({"weight": ("W", _transposed)}), "facekernels layout", "weight")


@_strippable
def from_magface(state_dict: Mapping, prefix: str = "") -> dict:
    """Read MagFace's MagLinear (models/magface.py, trained by run/trainer.py).

    Args:
        state_dict: their state dict: ``weight`` (d, C). trainer.py's checkpoints hold the model under
            ``"state_dict"`` (a DataParallel: the head's keys under ``"module.fc."``).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``weight`` (C, d), for ``fk.MagFace``. (trainer_dist.py's ``parallel_fc.weight`` is (C, d)
        already: load it as it is.)
    """
    return _convert(state_dict, prefix, {"weight": ("weight", _transposed)}, "MagFace layout", "weight")


@_strippable
def to_magface(state_dict: Mapping, prefix: str = "") -> dict:
    """Write a facekernels head (``fk.MagFace``) out as MagFace's MagLinear: ``weight`` (d, C).

    Args:
        state_dict: ours: ``weight`` (C, d).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.
    """
    _check_state_dict(state_dict, prefix)
    _reject_buffers(state_dict, prefix, "the MagFace repository")
    return _convert(state_dict, prefix, _out_rules({"weight": ("weight", _transposed)}), "facekernels layout",
                    "weight")  # fmt: skip


@_strippable
def from_elasticface(state_dict: Mapping, prefix: str = "") -> dict:
    """Read an ElasticFace repository head (ElasticArcFace, ElasticCosFace, ArcFace or CosFace of its
    utils/losses.py).

    Args:
        state_dict: their state dict: ``kernel`` (d, C) (train.py saves it alone, as ``<step>header.pth``).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``weight`` (C, d), for ``fk.ElasticArcFace`` / ``fk.ElasticCosFace`` (or ``fk.ArcFace``
        / ``fk.CosFace`` for their ArcFace / CosFace heads).
    """
    return _convert(state_dict, prefix, {"kernel": ("weight", _transposed)}, "ElasticFace layout", "kernel")


@_strippable
def to_elasticface(state_dict: Mapping, prefix: str = "") -> dict:
    """Write a facekernels head out in the ElasticFace repository's layout: ``kernel`` (d, C).

    Args:
        state_dict: ours: ``weight`` (C, d).
        prefix: where the head's keys start; keys elsewhere pass through unchanged.

    Returns:
        A new dict with ``kernel`` (d, C) (without our extra state: an ElasticFace head's margin generator
        state is not written; their heads draw from the default generator).
    """
    _check_state_dict(state_dict, prefix)
    _reject_buffers(state_dict, prefix, "the ElasticFace repository")
    return _convert(state_dict, prefix, _out_rules({"weight": ("kernel", _transposed)}), "facekernels layout",
                    "weight")  # fmt: skip


def param_indices(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> list[int]:
    """Where ``params`` sit in ``optimizer.state_dict()``'s numbering (their order over the param groups).

    Args:
        optimizer: the optimizer whose state to convert; it must hold the parameters in the order the
            checkpoint's optimizer held the other trainer's (e.g. the backbone's, then the head's).
        params: the parameters whose state to transpose, e.g. ``[head.weight]``.

    Returns:
        Their indices, for :func:`transpose_optimizer_state`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    order = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    indices = []
    for p in params:
        if id(p) not in order:
            raise ValueError(f"params: a parameter of shape {tuple(p.shape)} is not in the optimizer's param groups")
        indices.append(order[id(p)])
    return indices


# Factored second moments (Adafactor) hold one statistic per row and one per column of the parameter: a
# transpose swaps them (and turns each one around), it does not transpose each in place
FACTORED_PAIRS = (
    ("row_var", "col_var"),  # torch.optim.Adafactor: (C, 1) and (1, d) for a (C, d) parameter
    ("exp_avg_sq_row", "exp_avg_sq_col"),  # transformers' / fairseq's Adafactor: (C,) and (d,)
)


def _transposed_state(index: int, entry: dict) -> dict:
    # every tensor copied: a state dict taken from a live optimizer shares its tensors (the step counter is
    # incremented in place), and the converted state must not move with it
    out = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
    factored = set()
    for row, col in FACTORED_PAIRS:
        if row in entry or col in entry:
            if not (row in entry and col in entry):
                raise ValueError(f"optimizer state of parameter {index} has {row if row in entry else col!r} "
                                 f"without {col if row in entry else row!r}: a factored state needs both")  # fmt: skip
            # (C, 1), (1, d) -> (d, 1), (1, C); 1-D (C,), (d,) -> (d,), (C,). Copies: the transpose of a (1, n)
            # tensor is already contiguous, and a view would share the source optimizer's live state
            out[row], out[col] = entry[col].t().clone(), entry[row].t().clone()
            factored |= {row, col}
    for name, value in entry.items():
        if name in factored or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue  # step counters and the swapped pairs
        if value.dim() != 2 or 1 in value.shape:
            # a vector or a (n, 1) / (1, n) statistic is a factored state of an unknown optimizer: its
            # transpose is a guess, so it is refused
            raise ValueError(
                f"optimizer state {name!r} of parameter {index} has shape {tuple(value.shape)}: not a matrix of "
                f"the parameter's shape nor a known factored pair ({', '.join(map(str, FACTORED_PAIRS))}); "
                "it cannot be converted"
            )
        out[name] = value.t().contiguous()
    return out


def transpose_optimizer_state(optimizer_state: Mapping, indices: Iterable[int]) -> dict:
    """A copy of an optimizer's ``state_dict()`` whose per-parameter tensors of the listed parameters are
    transposed: SGD's ``momentum_buffer``, Adam's / AdamW's ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
    and any other matrix entry (their 0-dim ``step`` is left alone); Adafactor's factored statistics are
    swapped (torch's ``row_var`` (C, 1) and ``col_var`` (1, d) become (d, 1) and (1, C); transformers'
    ``exp_avg_sq_row`` / ``exp_avg_sq_col`` likewise). A transpose is its own inverse, so the same call converts
    their optimizer state into ours and ours into theirs.

    Args:
        optimizer_state: ``optimizer.state_dict()`` (a dict with ``"state"`` and ``"param_groups"``).
        indices: the parameters' indices in that state (:func:`param_indices`).

    Returns:
        A new dict; parameters without state yet (no step taken) are skipped.

    Raises:
        ValueError: naming the key of a state entry that is neither of the parameter's shape nor a known
            factored pair (a vector, or a (n, 1) statistic without its partner).
    """
    if not isinstance(optimizer_state, Mapping) or "state" not in optimizer_state:
        raise TypeError("optimizer_state must be an optimizer's state_dict() (a dict with 'state' and 'param_groups')")
    state = {k: dict(v) for k, v in optimizer_state["state"].items()}
    for index in indices:
        if index in state:
            state[index] = _transposed_state(index, state[index])
    return {**optimizer_state, "state": state}
