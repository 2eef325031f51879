// Argument checks of facekernels::target_cosine shared by its CPU and CUDA registrations (torch-facing:
// never include this from a .cu kernel file).
// The Python wrappers validate first with clearer messages; these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace facekernels {

inline void check_target_cosine_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 2, "embeddings and weight must be 2-D; got ", x.sizes(), " and ",
                    w.sizes());
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), "embeddings and weight must have the same number of features; got ",
                    x.sizes(), " and ", w.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "embeddings and weight must have one dtype; got ",
                   x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64; got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), "labels must have shape (", x.size(0),
                    ",); got ", labels.sizes());
  TORCH_CHECK_VALUE(x.device() == w.device() && x.device() == labels.device(),
                    "embeddings, weight and labels must be on one device");
}

inline at::ScalarType target_cosine_out_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace facekernels
