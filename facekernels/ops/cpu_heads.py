"""The compiled CPU backend of the margin-softmax heads (``backend="cpu"``, and ``"auto"`` on CPU tensors).

The C++ ops (csrc/cpu/margin_ce.cpp, math in csrc/include/facekernels/head_math.h) compute the per-row
losses and their gradients tile by tile over the classes, never holding a (B, C) tensor. This module adds
the reduction, CurricularFace's t update and the autograd formula, through ``torch.library`` (fake kernels
and ``register_autograd``) so that ``torch.compile`` can trace the ops.
"""

from __future__ import annotations

import torch

from .. import _extension
from .._backends import BackendUnavailableError
from .._params import HeadParams
from ..reference.heads import reduce_row_losses

# Classes per tile; 0 lets the C++ op choose (kDefaultClassTile). Tests set it small to cover many tiles.
CLASS_TILE = 0

_registered = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output):
    embeddings, weight, labels, t, *scalars, target_cos = inputs
    # s, m1, m2, m3, fallback, negatives, mv_t, ignore_index, exact_margin_grad, class_tile
    ctx.scalars = scalars
    ctx.save_for_backward(embeddings, weight, labels, t, output[1], target_cos)


def _backward(ctx, grad_rows, grad_lse):
    # lse is an auxiliary output saved for the backward; its gradient is not propagated.
    embeddings, weight, labels, t, lse, target_cos = ctx.saved_tensors
    *head, exact_margin_grad, class_tile = ctx.scalars
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return (None,) * 15
    dx, dw = torch.ops.facekernels.margin_ce_backward(
        grad_rows, embeddings, weight, labels, t, lse, *head, exact_margin_grad, need_dx, need_dw, class_tile,
        target_cos,
    )  # fmt: skip
    return (dx if need_dx else None, dw if need_dw else None) + (None,) * 13


def _register() -> None:
    """Fake kernels and the autograd formula of the facekernels:: head ops (once, after the extension loads)."""
    global _registered
    if _registered:
        return
    _extension.ops()

    @torch.library.register_fake("facekernels::margin_ce")
    def _(embeddings, weight, labels, t, s, m1, m2, m3, fallback, negatives, mv_t, ignore_index,
          exact_margin_grad, class_tile=0, target_cos=None):  # fmt: skip
        acc = _acc_dtype(embeddings.dtype)
        batch = embeddings.shape[0]
        return embeddings.new_empty(batch, dtype=acc), embeddings.new_empty(batch, dtype=acc)

    @torch.library.register_fake("facekernels::margin_ce_backward")
    def _(grad_rows, embeddings, weight, labels, t, lse, s, m1, m2, m3, fallback, negatives, mv_t, ignore_index,
          exact_margin_grad, need_embeddings_grad, need_weight_grad, class_tile=0, target_cos=None):  # fmt: skip
        dx = torch.empty_like(embeddings) if need_embeddings_grad else embeddings.new_empty(0)
        dw = torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)
        return dx, dw

    @torch.library.register_fake("facekernels::curricular_update_t_")
    def _(t, embeddings, weight, labels, ignore_index, momentum):
        return None

    torch.library.register_autograd("facekernels::margin_ce", _backward, setup_context=_setup_context)
    _registered = True


def ops():
    """torch.ops.facekernels with the head ops' fake kernels and autograd registered."""
    _register()
    return torch.ops.facekernels


# Register when the backend is first imported (eagerly, also when the import happens while torch.compile
# traces the dispatch), so that a traced call only reads the flag. Without the extension, the first call
# raises ExtensionUnavailableError with the build hint instead.
try:
    _register()
except _extension.ExtensionUnavailableError:
    pass


def margin_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: HeadParams,
    t: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """Same contract as facekernels.reference.margin_cross_entropy (inputs already validated by
    facekernels.functional): float32 loss (float64 for float64 inputs), ``t`` updated in place from the
    target cosines before the negatives are formed when the head uses it and ``training``."""
    if embeddings.device.type != "cpu" or weight.device.type != "cpu":
        raise BackendUnavailableError(f"backend='cpu' needs CPU tensors; got {embeddings.device.type} tensors")
    if not _registered:
        _register()
    fk = torch.ops.facekernels
    p = params
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    x, w = embeddings.to(dtype), weight.to(dtype)
    t_used = None
    if p.uses_t:
        if training:
            fk.curricular_update_t_(t, x.detach(), w.detach(), labels, p.ignore_index, p.momentum)
        # the value this step used, saved for the backward (the caller's buffer may move on before it runs)
        t_used = t.detach().clone()
    rows, _ = fk.margin_ce(
        x, w, labels, t_used, p.s, p.m1, p.m2, p.m3, int(p.fallback), int(p.negatives), p.mv_t, p.ignore_index,
        p.margin_grad == "exact", CLASS_TILE,
    )  # fmt: skip
    return reduce_row_losses(rows, labels != p.ignore_index, p.reduction)
