"""Every schema of the compiled ``facekernels::`` ops and their shape functions (fakes), in one place: the C++
files only register implementations (``TORCH_LIBRARY_IMPL``), as torchao does. Imported by
``facekernels._extension`` when it first loads ``facekernels._C``, and by nothing else, so that importing the
package defines nothing. (The Triton heads' ops are ``torch.library.custom_op``s: schema, implementation and
fake together in facekernels/kernels/triton/__init__.py.)

Accumulation dtype of every op: float32, float64 for float64 inputs.
"""

from __future__ import annotations

import torch

LIBRARY = torch.library.Library("facekernels", "DEF")

# 1 / max(||row||, eps) per row, squares summed in float64
LIBRARY.define("inv_norms(Tensor rows) -> Tensor")
# Per-row (log-sum-exp, max, rank) over the classes of `weight` of the logits z_ij = s N(c_ij), z_i,target = s phi_i;
# target_i outside [0, C) means no target column in this weight (csrc/cpu/margin_ce.cpp). Every cosine is
# clamped to [-cos_bound, cos_bound]; a negative above filter_threshold gets the logit 0 (inf: off); a class has
# `subcenters` consecutive rows of weight, its cosine their max. rank (int64): with rank_cos (the rows' target
# cosines), the count of non-target classes whose margin-free cosine beats it (_rowmath.beats_target); without,
# an empty tensor and no counting.
LIBRARY.define(
    "margin_lse(Tensor embeddings, Tensor weight, Tensor inv_x, Tensor inv_w, Tensor target, Tensor phi, "
    "Tensor tau, Tensor? t, float s, int negatives, float mv_t, float cos_bound, float filter_threshold, "
    "int subcenters, int class_tile=0, Tensor? rank_cos=None) -> (Tensor, Tensor, Tensor)"
)
# (A, d weight) of sum_i grad_rows_i (lse_i - s phi_i), A = d x_hat / max(||x||, eps) (the caller finishes the
# embeddings' normalisation backward); a gradient not asked for is an empty tensor
LIBRARY.define(
    "margin_backward(Tensor grad_rows, Tensor embeddings, Tensor weight, Tensor inv_x, Tensor inv_w, "
    "Tensor target, Tensor phi, Tensor dphi, Tensor tau, Tensor? t, Tensor lse, float s, int negatives, "
    "float mv_t, float cos_bound, float filter_threshold, int subcenters, bool need_embeddings_grad, "
    "bool need_weight_grad, int class_tile=0) -> (Tensor, Tensor)"
)
# fused triplet mining (csrc/cpu/triplet.cpp, csrc/cuda/triplet.cu): per-anchor (sum, count, nonzero) and the
# (B, B) slope matrix W of a reduced loss; the mined terms, their (a, p, n) triplets and slopes. representatives:
# (B,) int64, the lowest index of a row equal to each row (facekernels/_pairs.py); None: every row its own
LIBRARY.define(
    "triplet_reduce(Tensor embeddings, Tensor labels, str mining, str distance, float margin, bool soft, "
    "Tensor? representatives=None) -> (Tensor stats, Tensor coef)"
)
LIBRARY.define(
    "triplet_terms(Tensor embeddings, Tensor labels, str mining, str distance, float margin, bool soft, "
    "Tensor? representatives=None) -> (Tensor terms, Tensor triplets, Tensor slopes)"
)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("facekernels::inv_norms")
def _(rows):
    return rows.new_empty(rows.shape[0], dtype=_acc(rows))


@torch.library.register_fake("facekernels::margin_lse")
def _(embeddings, weight, inv_x, inv_w, target, phi, tau, t, s, negatives, mv_t, cos_bound, filter_threshold,
      subcenters, class_tile=0, rank_cos=None):  # fmt: skip
    row = embeddings.new_empty(embeddings.shape[0], dtype=_acc(embeddings))
    return row, row.clone(), target.new_empty(embeddings.shape[0] if rank_cos is not None else 0)


@torch.library.register_fake("facekernels::margin_backward")
def _(grad_rows, embeddings, weight, inv_x, inv_w, target, phi, dphi, tau, t, lse, s, negatives, mv_t, cos_bound,
      filter_threshold, subcenters, need_embeddings_grad, need_weight_grad, class_tile=0):  # fmt: skip
    a = embeddings.new_empty(embeddings.shape if need_embeddings_grad else (0,), dtype=_acc(embeddings))
    return a, torch.empty_like(weight) if need_weight_grad else weight.new_empty(0)


@torch.library.register_fake("facekernels::triplet_reduce")
def _(embeddings, labels, mining, distance, margin, soft, representatives=None):
    batch = embeddings.shape[0]
    return embeddings.new_empty(batch, 3, dtype=_acc(embeddings)), embeddings.new_empty(batch, batch,
                                                                                        dtype=_acc(embeddings))


@torch.library.register_fake("facekernels::triplet_terms")
def _(embeddings, labels, mining, distance, margin, soft, representatives=None):
    count = torch.library.get_ctx().new_dynamic_size()
    return (embeddings.new_empty(count, dtype=_acc(embeddings)), labels.new_empty(count, 3),
            embeddings.new_empty(count, 2, dtype=_acc(embeddings)))  # fmt: skip
