// Schemas of the fused triplet ops and their CPU implementation: the Gram matrix through BLAS, then the
// mining of csrc/include/facekernels/triplet_select.h over anchors in parallel (at::parallel_for).
//
//   triplet_reduce -> stats (B, 3): per anchor (sum of terms, number of terms, number of terms > 0),
//                     coef (B, B): W[a, j] = d (sum of anchor a's terms) / d raw(a, j) on CPU, its
//                     transpose on CUDA (coalesced writes there); the backward uses only W + W^T and
//                     rowsum W + colsum W, which do not tell the two apart
//   triplet_terms  -> terms (T,), triplets (T, 3) int64 (a, p, n) ordered by (a, p, n),
//                     slopes (T, 2): d term / d raw(a, p), d term / d raw(a, n)
// Both take the rows the loss sees (normalised by the caller when the loss normalises) and optionally their
// representatives (pair_distance); outputs are float32 (float64 for float64 inputs). "raw" and the backward
// are explained in triplet_select.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "facekernels/triplet_checks.h"
#include "facekernels/triplet_select.h"

namespace facekernels {
namespace {

constexpr int64_t kAnchorGrain = 8;

// The (B, B) distance matrix D (see pair_distance) from the embeddings, in the accumulation dtype.
at::Tensor distance_matrix(const at::Tensor& embeddings, Distance distance, const int64_t* rep) {
  const auto gram = triplet_gram(embeddings);
  auto dist = at::empty_like(gram);
  const int64_t batch = gram.size(0);
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "triplet_distance_cpu", [&] {
    const scalar_t* g = gram.data_ptr<scalar_t>();
    scalar_t* d = dist.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kAnchorGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < batch; ++j) d[i * batch + j] = pair_distance(distance, g, batch, rep, i, j);
    });
  });
  return dist;
}

std::tuple<at::Tensor, at::Tensor> triplet_reduce_cpu(const at::Tensor& embeddings, const at::Tensor& labels,
                                                      c10::string_view mining_name,
                                                      c10::string_view distance_name, double margin, bool soft,
                                                      const c10::optional<at::Tensor>& representatives) {
  check_triplet_args(embeddings, labels, margin);
  const Mining mining = parse_mining(std::string(mining_name));
  const Distance distance = parse_distance(std::string(distance_name));
  const auto dist = distance_matrix(embeddings, distance, representatives_ptr(representatives, embeddings));
  const auto y = labels.contiguous();
  const int64_t batch = embeddings.size(0);
  auto stats = at::empty({batch, 3}, dist.options());
  auto coef = at::zeros({batch, batch}, dist.options());
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "triplet_reduce_cpu", [&] {
    const scalar_t* d = dist.data_ptr<scalar_t>();
    const int64_t* yp = y.data_ptr<int64_t>();
    scalar_t* sp = stats.data_ptr<scalar_t>();
    scalar_t* cp = coef.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kAnchorGrain, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row{d + a * batch, 1, yp, batch, a, distance};
        reduce_anchor(row, mining, static_cast<scalar_t>(margin), soft, sp + 3 * a, cp + a * batch, 1);
      }
    });
  });
  return {stats, coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_terms_cpu(const at::Tensor& embeddings,
                                                                 const at::Tensor& labels,
                                                                 c10::string_view mining_name,
                                                                 c10::string_view distance_name, double margin,
                                                                 bool soft,
                                                                 const c10::optional<at::Tensor>& representatives) {
  check_triplet_args(embeddings, labels, margin);
  const Mining mining = parse_mining(std::string(mining_name));
  const Distance distance = parse_distance(std::string(distance_name));
  const auto dist = distance_matrix(embeddings, distance, representatives_ptr(representatives, embeddings));
  const auto y = labels.contiguous();
  const int64_t batch = embeddings.size(0);
  // pass 1: terms per anchor; their exclusive prefix sum is where each anchor writes
  auto counts = at::empty({batch}, y.options());
  {
    const int64_t* yp = y.data_ptr<int64_t>();
    int64_t* cnt = counts.data_ptr<int64_t>();
    at::parallel_for(0, batch, kAnchorGrain, [&](int64_t begin, int64_t end) {
      // the count reads the labels only
      for (int64_t a = begin; a < end; ++a)
        cnt[a] = count_anchor_terms(AnchorRow<float>{nullptr, 0, yp, batch, a, distance}, mining);
    });
  }
  const auto ends = counts.cumsum(0);
  const int64_t total = batch == 0 ? 0 : ends[batch - 1].item<int64_t>();
  const auto offsets = ends - counts;
  auto terms = at::empty({total}, dist.options());
  auto triplets = at::empty({total, 3}, y.options());
  auto slopes = at::empty({total, 2}, dist.options());
  // pass 2: every anchor fills its own slice
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "triplet_terms_cpu", [&] {
    const scalar_t* d = dist.data_ptr<scalar_t>();
    const int64_t* yp = y.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    scalar_t* tp = terms.data_ptr<scalar_t>();
    int64_t* ip = triplets.data_ptr<int64_t>();
    scalar_t* sp = slopes.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kAnchorGrain, [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        const AnchorRow<scalar_t> row{d + a * batch, 1, yp, batch, a, distance};
        fill_anchor_terms(row, mining, static_cast<scalar_t>(margin), soft, off[a], tp, ip, sp);
      }
    });
  });
  return {terms, triplets, slopes};
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("triplet_reduce", &triplet_reduce_cpu);
  m.impl("triplet_terms", &triplet_terms_cpu);
}

}  // namespace facekernels
