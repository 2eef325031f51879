// Argument checks and option parsing of the facekernels::triplet_* ops, shared by their CPU and CUDA
// registrations (torch-facing: never include this from a .cu kernel file). The Python wrappers validate
// first with clearer messages; these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "facekernels/triplet_select.h"

namespace facekernels {

inline void check_triplet_args(const at::Tensor& embeddings, const at::Tensor& labels, double margin) {
  TORCH_CHECK_VALUE(embeddings.dim() == 2, "embeddings must be 2-D; got ", embeddings.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(embeddings.scalar_type()),
                   "embeddings must be float16, bfloat16, float32 or float64; got ", embeddings.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64; got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0), "labels must have shape (",
                    embeddings.size(0), ",); got ", labels.sizes());
  TORCH_CHECK_VALUE(embeddings.device() == labels.device(), "embeddings and labels must be on one device");
  TORCH_CHECK_VALUE(margin >= 0, "margin must be >= 0; got ", margin);
}

inline Mining parse_mining(const std::string& s) {
  if (s == "semihard") return Mining::kSemihard;
  if (s == "hard") return Mining::kHard;
  if (s == "all") return Mining::kAll;
  TORCH_CHECK_VALUE(false, "mining must be 'semihard', 'hard' or 'all'; got '", s, "'");
}

inline Distance parse_distance(const std::string& s) {
  if (s == "squared_euclidean") return Distance::kSquaredEuclidean;
  if (s == "euclidean") return Distance::kEuclidean;
  if (s == "cosine") return Distance::kCosine;
  TORCH_CHECK_VALUE(false, "distance must be 'squared_euclidean', 'euclidean' or 'cosine'; got '", s, "'");
}

// float32 accumulation, float64 for float64 inputs
inline at::ScalarType triplet_acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The (B, B) Gram matrix E E^T in the accumulation dtype (BLAS / cuBLAS through torch).
inline at::Tensor triplet_gram(const at::Tensor& embeddings) {
  const auto e = embeddings.to(triplet_acc_dtype(embeddings.scalar_type()));
  return at::mm(e, e.t()).contiguous();
}

}  // namespace facekernels
