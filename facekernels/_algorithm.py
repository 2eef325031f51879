"""The one margin-softmax head algorithm, for every device and for the class-sharded mode.

A head's loss over B rows and the classes of ``w`` (all of them, or this rank's shard of a class-sharded head,
or Partial FC's sampled rows of it), with the per-class work done by a kernel back-end (``HeadKernels``:
``facekernels/kernels/cpu.py``, ``facekernels/kernels/triton``):

1. (sharded) all-gather the embeddings and labels of the global batch. Ignored rows are zeroed first: they
   must never reach the products (a NaN there would otherwise give every class a NaN gradient, NaN * 0).
2. pre-pass, O(B d + C d): inverse norms (kernels), each row's target cosine c_i where its target class is in
   ``w`` (torch, ``_rowmath.target_cosine``; all-reduced over the ranks, so that every rank holds every c_i),
   then the step's margins (``_rowmath.row_margins``: the head's own, or per row: AdaFace's from the norms and
   its running statistics, MagFace's from the norms, ElasticFace's drawn), phi_i, phi'_i and tau_i
   (``_rowmath.target_logit``) and CurricularFace's t update, identical on every rank. Kernels that have their
   own ``target_rows`` (kernels/triton: one or two launches on CUDA, the Triton mirror of that torch) compute
   this step for the heads they cover on a single device; the torch runs otherwise.
3. forward: the kernels give each row's log-sum-exp over w's classes of z_ij = s N(c_ij), z_i,y = s phi_i;
   sharded, all-reduce MAX then SUM of exp(lse_r - max) combines the ranks' partials. loss_i = lse_i - s phi_i
   (+ MagFace's row term).
4. backward, per class chunk (GPU: a chunk sized to stay in L2; CPU: the whole range in one call that threads
   over tiles inside): the kernels recompute the chunk's cosines once and return A = d x_hat / ||x|| (summed
   over the chunks, and over the ranks) and the chunk's weight gradient (through w's normalisation); the
   embeddings' normalisation backward is applied once here: dx = A - x_hat (x_hat . A), plus x_hat d loss / dn
   for margins that depend on n = ||x|| (MagFace: from p_iy = exp(s phi_i - lse_i), no kernel involved).

Nothing of size (B, C) exists at any point: O(B chunk + B d + C) beyond the inputs and dW.

With a fused optimizer attached (facekernels/optim.py), step 4 hands each chunk's weight gradient to it as soon
as the chunk's gradient exists: the optimizer updates those rows of the weight (and their state) in place, and
the backward returns no weight gradient, so dW never exists (chunks also bounded by the optimizer's
``chunk_classes``; the CPU kernels then run one call per chunk).

Sharded gradient convention (insightface Partial FC): the gradient returned for the local embeddings is
``world * d(loss)/d(local embeddings)``, so that DDP's average over the backbone replicas is the gradient of the
global loss; the weight shard gets the plain gradient of its rows.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
import torch.distributed as dist

from ._params import ElasticMargins, HeadParams
from ._rowmath import (
    MarginState,
    acc_dtype,
    head_stats,
    reduce_row_losses,
    row_margins,
    row_norms,
    target_cosine,
    target_logit,
    update_t_,
)


class HeadKernels(Protocol):
    """What a device contributes to the algorithm (per-row tensors are float32, float64 for float64 inputs;
    ``target`` is int64, the row's class within ``w`` or -1 when it is not there)."""

    def compute_dtype(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        """The dtype both inputs are cast to; raises BackendUnavailableError / TypeError if they cannot run."""

    def chunk_classes(self, batch: int, classes: int, dtype: torch.dtype) -> int:
        """Classes per backward call."""

    def inv_norms(self, rows: torch.Tensor) -> torch.Tensor:
        """1 / max(||row||, eps) per row, overflow-safe, NaN for a NaN row."""

    # Optional: ``target_rows(x, w, inv_w, target, valid, t, params, training)``, the pre-pass of step 2 on one
    # device: (inv_x, c, (phi, phi' times the clamp's derivative, tau) stacked, t_used), t updated in place when
    # CurricularFace trains (t_used its new value, else a copy; None without t); None for a head it does not
    # cover (``_rowmath``'s torch then runs).

    def lse(self, x, w, inv_x, inv_w, target, phi, tau, t, params: HeadParams, target_cos=None):
        """Per-row (log-sum-exp, max, rank) of the logits over w's classes (the target column, if in w, holds
        s phi). rank: None unless ``target_cos`` (the rows' target cosines) is given, then int64, the number of
        w's classes other than the target column whose margin-free cosine beats it (``_rowmath.target_rank``),
        counted in the same pass."""

    def backward_chunk(self, g, x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, params: HeadParams,
                       need_dx: bool, need_dw: bool, dw_out: torch.Tensor | None,
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """(A, dw) of sum_i g_i loss_i through w's classes: A = d x_hat / ||x|| (float32 / float64), dw in
        w's dtype through w's normalisation backward (written into dw_out when given); None where not
        needed.

        A kernel back-end may instead give ``backward_pass(g, x, inv_x, target, phi, dphi, tau, t, lse, params,
        need_dx, need_dw)``: an object whose ``chunk(c0, w_chunk, inv_w_chunk, dw_out)`` returns the chunk's dw
        (targets stay global class ids, c0 is the chunk's first class) and whose ``a`` is A, accumulated in
        place over the chunks (kernels/triton: no per-chunk tensor ops besides its launches)."""


def _no_second_derivative(grad: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """grad, behind a node that raises if anything differentiates through it. Like torch's once_differentiable,
    but tied to ``anchor`` (the input it is the gradient of): a second derivative then reaches the node and
    raises, where once_differentiable's detached node is pruned from autograd.grad(..., inputs) (and attached
    not at all when the incoming gradient is a constant) and the second derivative silently comes out 0."""
    # the empty slice's sum is an exact 0 on the graph of anchor, whatever its values (0 * anchor.sum() is NaN
    # when a float16 sum overflows, or when anchor holds an Inf that the first-order gradient handles)
    tied = grad + anchor[:0].sum() if anchor.requires_grad else grad.detach().requires_grad_()
    return torch._C._functions.DelayedError(
        "second derivatives of the fused heads are not implemented; use backend='reference'", 1
    )(tied)


def live_group(ref: weakref.ref | None):
    """The process group behind a weak reference (None for None), or a clear error once it was destroyed.
    Heads and saved backward contexts hold their group weakly: a strong reference kept past
    destroy_process_group frees the group later, at interpreter exit, where gloo aborts the process."""
    if ref is None:
        return None
    group = ref()
    if group is None:
        raise RuntimeError("the class-sharded head's process group was destroyed (destroy_process_group); "
                           "a sharded head runs only while its group exists")  # fmt: skip
    return group


def _all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _HeadRows(torch.autograd.Function):
    """Per-row losses of the (global) batch from the classes of ``w`` (module docstring, steps 3 and 4).

    Differentiable in ``x`` (this rank's rows) and ``w``. Second derivatives and forward-mode AD are not
    implemented: they raise (the DelayedError of backward; torch's own error for a Function without jvp, which
torch.compile cannot trace) instead of returning a silent 0.
    """

    @staticmethod
    def forward(x, w, x_all, inv_x, inv_w, target, target_rows, norm_rows, t, valid, params, kernels, group,
                update, update_rows, rank_cos):  # fmt: skip
        # x_all: the global batch (sharded), None when it is x itself; target_rows: (phi, phi', tau) stacked, as
        # phi and tau may be one tensor (torch.compile traces no tensor passed twice); norm_rows: None, or for
        # margins that depend on n = ||x|| (MagFace) the row term, d phi / dn and d(row term) / dn stacked;
        # rank_cos: None, or (stats) the target cosines whose margin-free rank the forward counts
        x_all = x if x_all is None else x_all
        phi, _, tau = target_rows
        lse, row_max, rank = kernels.lse(x_all, w, inv_x, inv_w, target, phi, tau, t, params, rank_cos)
        if rank is None:
            rank = target.new_empty(0)  # an output must be a tensor: empty when the stats are not asked for
        elif group is not None:
            dist.all_reduce(rank, group=group)  # each rank counted its own classes: the sum counts them all
        if group is not None:
            # global lse = M + log sum_r exp(lse_r - M), M = max_r lse_r (every shard has >= 1 class: finite);
            # the logits' row max rides along in the same MAX all-reduce
            tops = torch.stack([lse, row_max])
            dist.all_reduce(tops, op=dist.ReduceOp.MAX, group=group)
            top, row_max = tops.unbind()
            total = torch.exp(lse - top)
            dist.all_reduce(total, group=group)
            lse = top + torch.log(total)
        # loss_i = lse_i - s phi_i (+ the row term), phi_i from the shared target cosine: the same on every rank
        rows = lse - params.s * phi
        if norm_rows is not None:
            rows = rows + norm_rows[0]
        return torch.where(valid, rows, 0), lse, row_max, rank

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, x_all, inv_x, inv_w, target, target_rows, norm_rows, t, valid, params, kernels, group = inputs[:13]
        x_all = x if x_all is None else x_all
        ctx.save_for_backward(x_all, w, inv_x, inv_w, target, target_rows, norm_rows, t, valid, output[1])
        ctx.params, ctx.kernels, ctx.batch_local = params, kernels, x.shape[0]
        ctx.group_ref = None if group is None else weakref.ref(group)  # the graph may outlive the group
        # a fused optimizer (or None) and the weight's rows that w holds (Partial FC's sampled rows; None: all)
        ctx.update, ctx.update_rows = inputs[13:15]
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx, grad_rows, grad_lse, grad_max, grad_rank):
        with torch.no_grad():
            dx, dw = _HeadRows._gradients(ctx, grad_rows)
        # create_graph=True: first order works, second order raises. (torch.func transforms run backward with
        # grad enabled on wrapped tensors; they get the plain first-order gradient.)
        if torch.is_grad_enabled() and not torch._C._functorch.is_functorch_wrapped_tensor(grad_rows):
            x_all, w = ctx.saved_tensors[:2]
            dx, dw = (None if g is None else _no_second_derivative(g, a) for g, a in ((dx, x_all), (dw, w)))
        return (dx, dw) + (None,) * 14

    @staticmethod
    def _gradients(ctx, grad_rows):
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        update = ctx.update
        if update is not None:
            # before anything is unpacked or updated: a second backward before step() raises here
            update._begin_backward(ctx.update_rows, need_dw)
        x_all, w, inv_x, inv_w, target, (phi, dphi, tau), norm_rows, t, valid, lse = ctx.saved_tensors
        if not (need_dx or need_dw):
            return None, None
        p, kernels = ctx.params, ctx.kernels
        g = torch.where(valid, grad_rows.to(lse.dtype), 0).contiguous()
        k = p.subcenters  # rows of w per class
        classes = w.shape[0] // k
        chunk = kernels.chunk_classes(x_all.shape[0], classes * k, x_all.dtype) // k
        fused = update is not None and need_dw
        if fused:
            # the optimizer's bound keeps each chunk's gradient and update temporaries small (and in cache)
            chunk = max(1, min(chunk, update._chunk_classes(w.shape[1], k, w.dtype, w.device)))
            # a NaN / Inf in the loss's row inputs skips every chunk's update, even a chunk whose gradient comes
            # out finite (a class outside the cosine clamp gets an exact 0): a 0-dim tensor, no host sync
            finite_rows = torch.isfinite(g).all() & torch.isfinite(lse).all()
        single = chunk >= classes and not fused
        dw = None if single or fused or not need_dw else torch.empty_like(w)
        # hasattr, not `getattr(...) or ...`: Dynamo 2.11 cannot branch on a bound method's truth (seen on an H200)
        begin = kernels.backward_pass if hasattr(kernels, "backward_pass") else _ChunkedBackward(kernels).begin
        run = begin(g, x_all, inv_x, target, phi, dphi, tau, t, lse, p, need_dx, need_dw)
        for c0 in range(0, classes, chunk):
            c1 = min(classes, c0 + chunk)
            # targets stay global class ids: the chunk's offset c0 goes to the kernels as a number
            part_dw = run.chunk(c0, w[c0 * k : c1 * k], inv_w[c0 * k : c1 * k],
                                None if dw is None else dw[c0 * k : c1 * k])  # fmt: skip
            if single:
                dw = part_dw
            elif fused:
                # after this chunk's A and dW are computed from its rows of w, before the next chunk reads its own
                update._update_rows(c0 * k, c1 * k, part_dw, finite_rows)
        if fused:
            update._end_backward(finite_rows)
        a = run.a
        dx = None
        if need_dx:
            group = live_group(ctx.group_ref)
            if group is not None:
                dist.all_reduce(a, group=group)  # every shard holds the part through its classes
            # the embeddings' normalisation backward: dx = (d x_hat - x_hat (x_hat . d x_hat)) / ||x||
            x_hat = x_all.to(a.dtype) * inv_x.unsqueeze(1)
            radial = (x_hat * a).sum(dim=1)
            if norm_rows is not None:
                # a margin and a row term that depend on n = ||x||: d loss_i / d n_i = g_i (s (p_iy - 1) d phi_i / dn
                # + d term_i / dn), with p_iy = exp(s phi_i - lse_i) the target's softmax probability (the global
                # one when sharded: identical on every rank); dn / dx = x_hat
                _, dphi_dn, dterm_dn = norm_rows
                p_target = torch.exp(p.s * phi - lse)
                radial = radial - g * (p.s * (p_target - 1) * dphi_dn + dterm_dn)
            dx = torch.where(valid.unsqueeze(1), a - x_hat * radial.unsqueeze(1), 0)
            if group is not None:
                rank, b = dist.get_rank(group), ctx.batch_local
                dx = dx[rank * b : (rank + 1) * b] * dist.get_world_size(group)  # Partial FC convention
            dx = dx.to(x_all.dtype)
        return dx, dw


class _ChunkedBackward:
    """The backward pass over class chunks for kernels that give one chunk's gradients at a time
    (``HeadKernels.backward_chunk``, targets relative to the chunk); kernels with their own pass
    (``backward_pass``: kernels/triton) keep the offset and A's accumulation inside."""

    def __init__(self, kernels: HeadKernels):
        self.kernels, self.a = kernels, None

    def begin(self, g, x, inv_x, target, phi, dphi, tau, t, lse, params, need_dx, need_dw):
        self.args = (g, x, inv_x, target, phi, dphi, tau, t, lse, params, need_dx, need_dw)
        return self

    def chunk(self, c0, w, inv_w, dw_out):
        g, x, inv_x, target, phi, dphi, tau, t, lse, params, need_dx, need_dw = self.args
        part_a, part_dw = self.kernels.backward_chunk(g, x, w, inv_x, inv_w, target - c0 if c0 else target, phi, dphi,
                                                      tau, t, lse, params, need_dx, need_dw, dw_out)  # fmt: skip
        if need_dx:
            self.a = part_a if self.a is None else self.a.add_(part_a)
        return part_dw


def fused_head_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: HeadParams,
    t: torch.Tensor | None,
    training: bool,
    kernels: HeadKernels,
    *,
    group=None,
    class_start: int = 0,
    sampler=None,
    stats: bool = False,
    state: MarginState | None = None,
    update=None,
):
    """Loss of one head (module docstring), inputs already validated. ``embeddings`` (B_l, d), ``labels``
    (B_l,) global class ids; ``weight`` (C_l, d): all the classes (group None) or this rank's shard
    [class_start, class_start + C_l); ``sampler(labels, valid)``, given the global batch's labels, returns
    Partial FC's sorted sampled rows of the shard. ``t`` (CurricularFace) is updated in place when
    ``training``. Returns the loss of the (global) batch, the same on every rank; float32 (float64 for float64
    inputs). With ``stats``: (loss, HeadStats) of the (global) batch, from the fused pass (target cosine, the
    logits' row max that the forward computes anyway, and the target's margin-free rank, which the forward counts
    only then: summed over the ranks when sharded; over the sampled classes with a sampler). ``update``: a fused
    optimizer (facekernels/optim.py) that updates ``weight`` in the backward instead of a weight gradient."""
    p = params
    dtype = kernels.compute_dtype(embeddings, weight)
    x, w = embeddings.to(dtype), weight.to(dtype)
    if group is not None:
        with torch.no_grad():
            x_all = _all_gather(x.detach(), group)
            labels = _all_gather(labels, group)
    valid = labels != p.ignore_index
    if group is None:
        x = x_all = torch.where(valid.unsqueeze(1), x, 0)
    else:
        x_all = torch.where(valid.unsqueeze(1), x_all, 0)
    k = p.subcenters
    local = labels - class_start if class_start else labels  # one launch fewer on a single device
    in_shard = valid & (local >= 0) & (local < w.shape[0] // k)
    sampled_rows = None
    if sampler is not None:
        sample_index = sampler(labels, valid)
        sampled_rows = (sample_index.unsqueeze(1) * k + torch.arange(k, device=w.device)).view(-1)  # k per class
        w = w.index_select(0, sampled_rows)  # autograd scatters the gradient back onto the sampled rows
        position = torch.searchsorted(sample_index, local).clamp_max(sample_index.numel() - 1)
        in_shard &= sample_index[position] == local
        local = position
    target_col = torch.where(in_shard, local, -1)

    norm_rows = fused_rows = None
    with torch.no_grad():
        x_det, w_det = x_all.detach(), w.detach()
        inv_w = kernels.inv_norms(w_det)
        if group is None and hasattr(kernels, "target_rows"):
            # the pre-pass in one or two launches (CUDA), for the heads the kernels cover (None: the torch below);
            # t updated as update_t_ does
            fused_rows = kernels.target_rows(x_det, w_det, inv_w, target_col, valid, t, p, training)
        if fused_rows is not None:
            inv_x, c, target_rows, t_used = fused_rows
        else:
            inv_x = kernels.inv_norms(x_det)
            c, inside = target_cosine(x_det, w_det, target_col, inv_x, inv_w, p)
            if group is not None:
                dist.all_reduce(c, group=group)  # one rank owns each row's target: the sum is its cosine
            norms = row_norms(x_det) if p.row_margins is not None else None
            margins = row_margins(p, norms, c, valid, training, state)
            if group is not None and isinstance(p.row_margins, ElasticMargins) and training:
                # drawn per rank: the first rank's draws are everyone's (identical margins for the same rows)
                dist.broadcast(margins.m2 if p.row_margins.angular else margins.m3, dist.get_global_rank(group, 0),
                               group=group)  # fmt: skip
            logit = target_logit(c, p, margins.m2, margins.m3)
            dphi = logit.dphi * inside  # the clamp's derivative, on the rank whose w holds the target column
            if margins.extra is not None:  # MagFace: d phi / dn through the margin that depends on n
                angular = margins.dm2_dn is not None
                dphi_dn = logit.dphi_dm2 * margins.dm2_dn if angular else logit.dphi_dm3 * margins.dm3_dn
                norm_rows = torch.stack([margins.extra, dphi_dn, margins.dextra_dn])
            t_used = None
            if p.uses_t:
                if training:
                    update_t_(t, c, valid, p.momentum)  # the same on every rank
                # the value this step used, saved for the backward: the caller's buffer moves on at the next
                # forward, which may run before this backward (gradient accumulation)
                t_used = t.detach().clone()
            target_rows = torch.stack([logit.phi, dphi, logit.tau])
    rows, _, row_max, rank = _HeadRows.apply(x, w, None if group is None else x_all, inv_x, inv_w, target_col,
                                             target_rows, norm_rows, t_used, valid, p, kernels, group, update,
                                             sampled_rows, c if stats else None)  # fmt: skip
    if group is None:
        # a label outside [0, C) that the label check has not stopped (checked on the device and raised at a later
        # call, _validate.py, or checks turned off): its row has no target column, and its loss is NaN rather
        # than a finite number without the target's term (valid > in_shard: valid and not in range)
        rows = torch.where(valid > in_shard, torch.nan, rows)
    loss = reduce_row_losses(rows.to(acc_dtype(dtype)), valid, p.reduction)
    return (loss, head_stats(c, p.s * target_rows[0], row_max, valid, rank)) if stats else loss
