"""The compiled CPU kernels of the heads (csrc/cpu/margin_ce.cpp) behind the algorithm's kernel interface
(``facekernels._algorithm.HeadKernels``): ``backend="cpu"``, and ``"auto"`` on CPU tensors.

One call covers the whole class range; the C++ op threads over class tiles inside, so no Python loop runs per
tile. Float32, bfloat16, float16 and float64 inputs; float32 accumulation (float64 for float64).
"""

from __future__ import annotations

import torch

from .. import _extension
from .._errors import BackendUnavailableError
from .._params import HeadParams

# Classes per C++ tile; 0 lets the op choose. Tests set it small to cover many tiles with a ragged last one.
CLASS_TILE = 0


class CpuKernels:
    def __init__(self):
        self.ops = _extension.ops()

    def compute_dtype(self, embeddings: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
        if embeddings.device.type != "cpu" or weight.device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='cpu' needs CPU tensors; got {embeddings.device.type} tensors (use backend='auto')"
            )
        return torch.promote_types(embeddings.dtype, weight.dtype)

    def chunk_classes(self, batch: int, classes: int, dtype: torch.dtype) -> int:
        return max(classes, 1)

    def inv_norms(self, rows: torch.Tensor) -> torch.Tensor:
        return self.ops.inv_norms(rows)

    def lse(self, x, w, inv_x, inv_w, target, phi, tau, t, params: HeadParams, target_cos=None):
        lse, row_max, rank = self.ops.margin_lse(x, w, inv_x, inv_w, target, phi, tau, t, params.s,
                                                 int(params.negatives), params.mv_t, params.cos_bound,
                                                 params.filter_threshold, params.subcenters, CLASS_TILE,
                                                 target_cos)  # fmt: skip
        return lse, row_max, (rank if target_cos is not None else None)

    def backward_chunk(self, g, x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, params: HeadParams,
                       need_dx: bool, need_dw: bool, dw_out: torch.Tensor | None):  # fmt: skip
        # one chunk covers every class (chunk_classes), so the algorithm never passes dw_out here
        a, dw = self.ops.margin_backward(g, x, w, inv_x, inv_w, target, phi, dphi, tau, t, lse, params.s,
                                         int(params.negatives), params.mv_t, params.cos_bound, params.filter_threshold,
                                         params.subcenters, need_dx, need_dw, CLASS_TILE)  # fmt: skip
        return (a if need_dx else None), (dw if need_dw else None)
KERNELS = CpuKernels()
