// CUDA registration of facekernels::triplet_reduce and facekernels::triplet_terms (schemas and semantics
// in csrc/cpu/triplet.cpp): the Gram matrix through cuBLAS (at::mm), then the kernels of triplet.cu on
// raw pointers. Built only against a CUDA torch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "facekernels/cuda_dtype.h"
#include "facekernels/cuda_launchers.h"
#include "facekernels/triplet_checks.h"

namespace facekernels {
namespace {

// The (B, B) distance matrix D from the embeddings, in the accumulation dtype.
at::Tensor distance_matrix_cuda(const at::Tensor& embeddings, Distance distance, const int64_t* rep,
                                cudaStream_t stream) {
  const auto gram = triplet_gram(embeddings);
  auto dist = at::empty_like(gram);
  C10_CUDA_CHECK(launch_triplet_distance(to_kernel_dtype(gram.scalar_type()), gram.data_ptr(), gram.size(0),
                                         static_cast<int>(distance), rep, dist.data_ptr(), stream));
  return dist;
}

std::tuple<at::Tensor, at::Tensor> triplet_reduce_cuda(const at::Tensor& embeddings, const at::Tensor& labels,
                                                       c10::string_view mining_name,
                                                       c10::string_view distance_name, double margin,
                                                       bool soft, const c10::optional<at::Tensor>& representatives) {
  check_triplet_args(embeddings, labels, margin);
  const Mining mining = parse_mining(std::string(mining_name));
  const Distance distance = parse_distance(std::string(distance_name));
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dist =
      distance_matrix_cuda(embeddings, distance, representatives_ptr(representatives, embeddings), stream);
  const auto y = labels.contiguous();
  const int64_t batch = embeddings.size(0);
  auto stats = at::empty({batch, 3}, dist.options());
  auto coef = at::zeros({batch, batch}, dist.options());  // receives W^T (coalesced), see triplet.cpp
  C10_CUDA_CHECK(launch_triplet_reduce(to_kernel_dtype(dist.scalar_type()), dist.data_ptr(), y.data_ptr<int64_t>(),
                                       batch, static_cast<int>(mining), static_cast<int>(distance), margin, soft,
                                       stats.data_ptr(), coef.data_ptr(), stream));
  return {stats, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_terms_cuda(const at::Tensor& embeddings,
                                                                  const at::Tensor& labels,
                                                                  c10::string_view mining_name,
                                                                  c10::string_view distance_name, double margin,
                                                                  bool soft,
                                                                  const c10::optional<at::Tensor>& representatives) {
  check_triplet_args(embeddings, labels, margin);
  const Mining mining = parse_mining(std::string(mining_name));
  const Distance distance = parse_distance(std::string(distance_name));
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto dist =
      distance_matrix_cuda(embeddings, distance, representatives_ptr(representatives, embeddings), stream);
  const auto y = labels.contiguous();
  const int64_t batch = embeddings.size(0);
  auto counts = at::empty({batch}, y.options());
  C10_CUDA_CHECK(launch_triplet_count(y.data_ptr<int64_t>(), batch, static_cast<int>(mining),
                                      counts.data_ptr<int64_t>(), stream));
  const auto ends = counts.cumsum(0);
  // the number of terms sizes the outputs: the one host sync of reduction="none"
  const int64_t total = batch == 0 ? 0 : ends[batch - 1].item<int64_t>();
  const auto offsets = ends - counts;
  auto terms = at::empty({total}, dist.options());
  auto triplets = at::empty({total, 3}, y.options());
  auto slopes = at::empty({total, 2}, dist.options());
  C10_CUDA_CHECK(launch_triplet_fill(to_kernel_dtype(dist.scalar_type()), dist.data_ptr(), y.data_ptr<int64_t>(),
                                     batch, static_cast<int>(mining), static_cast<int>(distance), margin, soft,
                                     offsets.data_ptr<int64_t>(), terms.data_ptr(), triplets.data_ptr<int64_t>(),
                                     slopes.data_ptr(), stream));
  return {terms, triplets, slopes};
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CUDA, m) {
  m.impl("triplet_reduce", &triplet_reduce_cuda);
  m.impl("triplet_terms", &triplet_terms_cuda);
}

}  // namespace facekernels
