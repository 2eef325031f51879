"""Class-sharded heads on ``torch.distributed`` (model parallel over the classes, optional Partial FC sampling).

Rank r of a group of ``world`` ranks holds the contiguous classes ``[class_start, class_start + num_local)``
with insightface's split (:func:`shard_range`). One step, for a local batch of B_l rows (B = world * B_l):

1. all-gather the embeddings (B, d) and the labels (B,);
2. each row's target cosine c_i is computed by the rank that owns its class (0 elsewhere) and all-reduced
   (SUM): every rank then has every c_i, hence the same phi_i, tau_i and CurricularFace's t (the mean of c
   over the global batch); c is not differentiated through this path (its gradient flows through the owning
   shard's kernel, which recomputes it);
3. the fused kernel (compiled CPU or Triton: ``_CpuKernels``, ``_TritonKernels``, one algorithm, two kernel
   back-ends) runs over the local classes only and returns each row's partial log-sum-exp
   (the target logit s*phi_i included only on the owning rank); all-reduce MAX of the partials, then SUM of
   exp(partial - max), gives the global lse_i; loss_i = lse_i - s*phi_i, identical on every rank;
4. backward: the kernel recomputes its blocks from the *global* lse and gives d(loss)/d(x_global) from the
   local classes, and dW for the local rows; the (B, d) gradient is all-reduced (SUM) and each rank keeps
   its rows. Nothing of size (B, C_local) is stored.

Gradient convention (insightface Partial FC): the gradient returned for the local embeddings is
``world * d(loss)/d(local embeddings)``, so that DDP, which averages the backbone's gradients over the ranks,
yields the gradient of the global loss. The weight shard gets the plain gradient of its rows.

Partial FC (``sample_rate < 1``): per step, this rank keeps every class of its shard that is a label of the
global batch plus random negatives, ``max(ceil(sample_rate * num_local), #positives)`` classes in all (random
scores, positives forced to the top, topk, sorted, as insightface samples), and computes on those rows only
(``index_select`` of the weight: only the sampled rows get a gradient).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import _validate as V
from ._backends import BackendUnavailableError
from ._params import HeadParams
from .reference.heads import reduce_row_losses, target_logit, update_t_


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


def _all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


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


class _CpuKernels:
    """The compiled CPU ops on this shard. op_labels: the class within w, -1 (ignored) or w.shape[0] (target
    on another rank: no target column here, phi and tau from target_cos)."""

    def __init__(self, params: HeadParams):
        from .ops import cpu_heads

        p = self.params = params
        self.ops, self.class_tile = cpu_heads.ops(), cpu_heads.CLASS_TILE
        self.head = (p.s, p.m1, p.m2, p.m3, int(p.fallback), int(p.negatives), p.mv_t, -1, p.margin_grad == "exact")

    def target_cosine(self, x, w, op_labels):
        """c_i of the rows whose target is in w, 0 for the others."""
        return torch.ops.facekernels.target_cosine(x, w, op_labels, 0)

    def partial_lse(self, x, w, op_labels, target_cos, t):
        """(lse over w's classes, phi(target_cos)) per row."""
        _, lse = self.ops.margin_ce(x, w, op_labels, t, *self.head, self.class_tile, target_cos)
        # phi with the Python definition of the math, not as lse_r - rows_r (this shard's partial, which would
        # round differently on every rank): every operand of the loss is then the same on every rank
        return lse, target_logit(target_cos, self.params)[0]

    def backward(self, grad_rows, x, w, op_labels, target_cos, t, lse, need_dx, need_dw):
        """(d x, d w) of sum_i grad_rows_i loss_i through w's classes, from the global lse."""
        return torch.ops.facekernels.margin_ce_backward(
            grad_rows, x, w, op_labels, t, lse, *self.head, need_dx, need_dw, self.class_tile, target_cos
        )


class _TritonKernels:
    """The fused Triton kernels on this shard, with the op labels of _CpuKernels. The Triton kernels match a
    target column only for a label in [0, w.shape[0]), so w.shape[0] marks "target elsewhere" for them too,
    and their backward zeroes only rows with a label < 0; the pre-pass, which reads the target's row of w,
    sees -1 for those rows, and their (phi, phi', tau) come from the global target cosine."""

    def __init__(self, params: HeadParams):
        from .triton import heads

        self.params, self.heads = params, heads

    def target_cosine(self, x, w, op_labels):
        p = self.params
        target = torch.where(op_labels < w.shape[0], op_labels, -1)
        self.inv_x, self.inv_w, c, _, _, _ = self.heads._prepass(
            x, w, target, p.m1, p.m2, p.m3, self.heads._target_form(p), int(p.fallback), p.fallback_threshold,
            p.fallback_offset, p.margin_grad == "straight_through",
        )  # fmt: skip
        return c

    def partial_lse(self, x, w, op_labels, target_cos, t):
        p = self.params
        self.phi, self.dphi, self.tau = self.heads.target_logit_of_cosine(target_cos, p)
        self.t = self.phi if t is None else t  # not read by the kernels unless CurricularFace
        _, lse = self.heads._margin_ce(x, w, op_labels, self.inv_x, self.inv_w, self.phi, self.dphi, self.tau,
                                       self.t, p.s, int(p.negatives), p.mv_t)  # fmt: skip
        return lse, self.phi

    def backward(self, grad_rows, x, w, op_labels, target_cos, t, lse, need_dx, need_dw):
        p = self.params
        return self.heads._margin_ce_backward(
            grad_rows, x, w, op_labels, self.inv_x, self.inv_w, self.phi, self.dphi, self.tau, self.t, lse, p.s,
            int(p.negatives), p.mv_t, need_dw,
        )  # fmt: skip


class _ShardedRows(torch.autograd.Function):
    """Per-row losses of the global batch from the local class shard (module docstring, steps 3 and 4)."""

    @staticmethod
    def forward(ctx, local_x, x_global, weight, op_labels, target_cos, t_used, valid, params, kernels, group):
        lse, phi = kernels.partial_lse(x_global, weight, op_labels, target_cos, t_used)
        # global lse = M + log sum_r exp(lse_r - M), M = max_r lse_r (every shard has >= 1 class: finite)
        lse_max = lse.clone()
        dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(lse - lse_max)
        dist.all_reduce(sum_exp, group=group)
        lse_global = lse_max + torch.log(sum_exp)
        # loss_i = lse_i - s phi_i, phi_i from the shared target cosine: the same on every rank
        row_loss = torch.where(valid, lse_global - params.s * phi, 0)
        ctx.kernels, ctx.group = kernels, group
        ctx.batch_local = local_x.shape[0]
        ctx.save_for_backward(x_global, weight, op_labels, target_cos, t_used, lse_global)
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        x_global, weight, op_labels, target_cos, t_used, lse_global = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dx = dw = None
        if need_dx or need_dw:
            dx_global, dw = ctx.kernels.backward(
                grad_rows.contiguous(), x_global, weight, op_labels, target_cos, t_used, lse_global, need_dx, need_dw
            )
        if need_dx:
            # every shard holds the part of d(loss)/d(x_global) that flows through its classes
            dist.all_reduce(dx_global, group=ctx.group)
            world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
            b = ctx.batch_local
            dx = dx_global[rank * b : (rank + 1) * b] * world  # Partial FC convention (module docstring)
        return dx, None, dw if need_dw else None, None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """Loss of one class-sharded head (module docstring): ``embeddings`` (B_l, d) and ``labels`` (B_l,) with
    global class ids on this rank, ``weight`` (num_local, d) this rank's shard. Returns the loss of the global
    batch, identical on every rank ("none": the (B,) row losses of the global batch, in rank order; a gradient
    given to them must be the same on every rank)."""
    kernels = _TritonKernels if check_sharded_backend(backend, embeddings.device) == "triton" else _CpuKernels
    V._check_float_matrix("embeddings", embeddings)
    V._check_float_matrix("weight", weight)
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must have {weight.shape[1]} features (weight is {tuple(weight.shape)}); "
            f"got shape {tuple(embeddings.shape)}"
        )
    V._check_labels(labels, embeddings.shape[0])
    labels = labels.long()
    num_local, ignore = weight.shape[0], params.ignore_index
    if V._check_label_values and not torch.compiler.is_compiling():
        # host syncs, like the single-device label check (facekernels.set_label_checks(False) skips them); the
        # verdict is gathered so that every rank raises the same error instead of one rank leaving a collective
        bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore)
        first_bad = int(labels[bad][0]) if bool(bad.any()) else 0
        info = torch.tensor([embeddings.shape[0], int(bool(bad.any())), first_bad], device=embeddings.device)
        infos = _all_gather(info, group).view(-1, 3)
        if bool((infos[:, 0] != infos[0, 0]).any()):
            raise ValueError(f"every rank must pass the same batch size; got {infos[:, 0].tolist()}")
        if bool(infos[:, 1].any()):
            found = int(infos[infos[:, 1] > 0][0, 2])
            raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore}; found {found}")
    if params.uses_t:
        from .functional import _check_t_buffer

        _check_t_buffer(t, embeddings)

    if kernels is _TritonKernels:
        from .triton.heads import _check_backend

        dtype = _check_backend(embeddings, weight)
    else:
        dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    kernels = kernels(params)
    x_local, w = embeddings.to(dtype), weight.to(dtype)
    with torch.no_grad():
        x_global = _all_gather(x_local.detach(), group)
        labels_global = _all_gather(labels, group)
    valid = labels_global != ignore
    if sample_rate < 1.0:
        index = sample_classes(labels_global, valid, class_start, num_local, sample_rate, generator)
        w = w.index_select(0, index)  # autograd scatters the gradient back onto the sampled rows
        local_class = torch.searchsorted(index, labels_global - class_start).clamp_max(index.numel() - 1)
        is_local = valid & (index[local_class] == labels_global - class_start)
    else:
        local_class = labels_global - class_start
        is_local = valid & (local_class >= 0) & (local_class < num_local)
    # the op's labels: the class within w, -1 for ignored rows (its ignore_index), and w.shape[0] (outside the
    # shard) for rows whose target lives on another rank
    op_labels = torch.where(is_local, local_class, torch.where(valid, w.shape[0], -1))
    with torch.no_grad():
        target_cos = kernels.target_cosine(x_global, w.detach(), op_labels)
        dist.all_reduce(target_cos, group=group)
    t_used = None
    if params.uses_t:
        if training:
            update_t_(t, target_cos, valid, params.momentum)  # the same on every rank
        t_used = t.detach().clone()
    rows = _ShardedRows.apply(x_local, x_global, w, op_labels, target_cos, t_used, valid, params, kernels, group)
    return reduce_row_losses(rows, valid, params.reduction)
