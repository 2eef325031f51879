// Argument checks and option parsing of the facekernels::triplet_* ops, shared by their CPU and CUDA
// registrations (torch-facing: never include this from a .cu kernel file). The Python wrappers validate
// first with clearer messages; these guard direct torch.ops calls.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "facekernels/check_message.h"
#include "facekernels/triplet_select.h"

namespace facekernels {

inline void check_triplet_args(const at::Tensor& embeddings, const at::Tensor& labels, double margin) {
  FK_CHECK_VALUE(embeddings.dim() == 2, "embeddings must be 2-D; got ", embeddings.sizes());
  FK_CHECK_TYPE(at::isFloatingType(embeddings.scalar_type()),
                   "embeddings must be float16, bfloat16, float32 or float64; got ", embeddings.scalar_type());
  FK_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64; got ", labels.scalar_type());
  FK_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0), "labels must have shape (",
                    embeddings.size(0), ",); got ", labels.sizes());
  FK_CHECK_VALUE(embeddings.device() == labels.device(), "embeddings and labels must be on one device");
  FK_CHECK_VALUE(margin >= 0, "margin must be >= 0; got ", margin);
}

// The rows' representatives (csrc/include/facekernels/triplet_select.h, pair_distance) as a pointer, nullptr
// when not given. Range-checked on the CPU; on CUDA (a check would be a host sync) the kernel reads an index
// outside [0, B) as the row itself.
inline const int64_t* representatives_ptr(const c10::optional<at::Tensor>& representatives,
                                          const at::Tensor& embeddings) {
  if (!representatives.has_value()) return nullptr;
  const at::Tensor& rep = *representatives;
  FK_CHECK_TYPE(rep.scalar_type() == at::kLong, "representatives must be int64; got ", rep.scalar_type());
  FK_CHECK_VALUE(rep.dim() == 1 && rep.size(0) == embeddings.size(0), "representatives must have shape (",
                    embeddings.size(0), ",); got ", rep.sizes());
  FK_CHECK_VALUE(rep.device() == embeddings.device(), "representatives and embeddings must be on one device");
  FK_CHECK_VALUE(rep.is_contiguous(), "representatives must be contiguous");
  if (rep.device().is_cpu() && rep.numel() > 0) {
    const int64_t* r = rep.data_ptr<int64_t>();
    for (int64_t i = 0; i < rep.numel(); ++i)
      FK_CHECK_VALUE(r[i] >= 0 && r[i] < rep.numel(), "representatives must be row indices in [0, ",
                        rep.numel(), "); got ", r[i], " at ", i);
  }
  return rep.data_ptr<int64_t>();
}

inline Mining parse_mining(const std::string& s) {
  if (s == "semihard") return Mining::kSemihard;
  if (s == "hard") return Mining::kHard;
  if (s == "all") return Mining::kAll;
  FK_CHECK_VALUE(false, "mining must be 'semihard', 'hard' or 'all'; got '", s, "'");
}

inline Distance parse_distance(const std::string& s) {
  if (s == "squared_euclidean") return Distance::kSquaredEuclidean;
  if (s == "euclidean") return Distance::kEuclidean;
  if (s == "cosine") return Distance::kCosine;
  FK_CHECK_VALUE(false, "distance must be 'squared_euclidean', 'euclidean' or 'cosine'; got '", s, "'");
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
