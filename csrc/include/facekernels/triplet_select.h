// Triplet mining of docs/triplet.md, written once for the CPU (csrc/cpu/triplet.cpp) and CUDA
// (csrc/cuda/triplet.cu) kernels. No torch: plain `nvcc -c` compiles every file that includes it.
//
// Both kernels start from the (B, B) Gram matrix g = E E^T of the rows the loss sees (already
// L2-normalised by the Python wrapper when normalize=True or distance=cosine, so the chain through the
// normalisation is left to autograd there) and turn it into the distance matrix D with pair_distance,
// which reads each unordered pair the same way so that D is exactly symmetric: row a of D is also its
// column a, which lets a CUDA thread per anchor read it coalesced. One anchor a is then handled by one CPU
// iteration / one CUDA thread, which visits its triplets in (p, n) order. For every term the kernels also
// produce the slope of the term with respect to the "raw" quantity behind each distance it reads:
//   squared_euclidean, euclidean: raw = ||e_a - e_b||^2 = g_aa + g_bb - 2 g_ab  (before the floor)
//   cosine:                       raw = e_a . e_b = g_ab                        (rows are unit vectors)
// so the backward is one formula on the (B, B) matrix W of accumulated slopes (facekernels/ops/triplet.py):
//   euclidean kinds: grad E = 2 (diag(rowsum W + colsum W) - W - W^T) E;   cosine: grad E = (W + W^T) E.
#pragma once

#include <cmath>
#include <cstdint>

#include "facekernels/common.h"

namespace facekernels {

using std::exp;
using std::fabs;
using std::log1p;

enum class Mining : int { kSemihard = 0, kHard = 1, kAll = 2 };
enum class Distance : int { kSquaredEuclidean = 0, kEuclidean = 1, kCosine = 2 };

constexpr double kSoftplusThreshold = 20.0;

// The hinge max(gap + margin, 0), or softplus(gap) when soft, and its derivative with respect to the gap:
// 1 where the hinge is strictly positive and 0 elsewhere (relu's subgradient at 0), sigmoid(gap) for soft.
template <typename Acc>
struct Term {
  Acc value;
  Acc slope;
};

template <typename Acc>
FK_HOST_DEVICE Term<Acc> triplet_term(Acc gap, Acc margin, bool soft) {
  if (soft) {
    // torch.nn.functional.softplus (the reference): x itself, with slope 1, above its threshold 20
    if (gap > Acc(kSoftplusThreshold)) return {gap, Acc(1)};
    // softplus(x) = max(x, 0) + log1p(exp(-|x|)), stable for any x; sigmoid written to avoid overflow
    const Acc z = exp(-fabs(gap));
    const Acc sigmoid = gap >= Acc(0) ? Acc(1) / (Acc(1) + z) : z / (Acc(1) + z);
    return {fmax(gap, Acc(0)) + log1p(z), sigmoid};
  }
  const Acc h = gap + margin;
  return (h > Acc(0) || h != h) ? Term<Acc>{h, Acc(1)} : Term<Acc>{Acc(0), Acc(0)};  // NaN stays NaN
}

// d(i, j) from the Gram matrix (gram: (batch, batch) row-major), floored at 0, read at the rows'
// representatives rep (the lowest index of an equal row, facekernels/_pairs.py; nullptr: every row its own)
// and from the upper triangle only: equal rows are at bitwise equal distances from every row, whatever the
// GEMM's rounding by position, and at exactly 0 from each other (the diagonal too); d(i, j) = d(j, i).
template <typename Acc>
FK_HOST_DEVICE Acc pair_distance(Distance distance, const Acc* gram, int64_t batch, const int64_t* rep, int64_t i,
                                 int64_t j) {
  if (rep != nullptr) {
    // an index outside [0, batch) (unchecked on CUDA, where a check would be a host sync) reads the row itself
    const int64_t ri = rep[i], rj = rep[j];
    i = ri >= 0 && ri < batch ? ri : i;
    j = rj >= 0 && rj < batch ? rj : j;
  }
  if (i == j) return Acc(0);
  const int64_t lo = i < j ? i : j, hi = i < j ? j : i;
  const Acc dot = gram[lo * batch + hi];
  if (distance == Distance::kCosine) return relu_keep_nan(Acc(1) - dot);
  const Acc sq = relu_keep_nan(gram[lo * batch + lo] + gram[hi * batch + hi] - Acc(2) * dot);
  return distance == Distance::kEuclidean ? sqrt(sq) : sq;
}

// d d / d raw as a function of the distance d itself: 0 where a floor is active or the distance is 0
// (relu's subgradient, and torch.cdist's choice for sqrt at 0). d > 0 exactly when the floored quantity
// (raw for the euclidean kinds, 1 - raw for cosine) is > 0.
template <typename Acc>
FK_HOST_DEVICE Acc distance_slope(Distance distance, Acc d) {
  if (!(d > Acc(0))) return Acc(0);
  if (distance == Distance::kCosine) return Acc(-1);
  return distance == Distance::kEuclidean ? Acc(0.5) / d : Acc(1);
}

// One anchor's view of the batch: its distances D[anchor, j] = dist[j * stride] (stride 1 for a row of D,
// batch for a column, the same values since D is symmetric) and the labels.
template <typename Acc>
struct AnchorRow {
  const Acc* dist_row;
  int64_t stride;
  const int64_t* labels;
  int64_t batch;
  int64_t anchor;
  Distance distance;

  FK_HOST_DEVICE bool is_positive(int64_t j) const { return j != anchor && labels[j] == labels[anchor]; }
  FK_HOST_DEVICE bool is_negative(int64_t j) const { return labels[j] != labels[anchor]; }
  FK_HOST_DEVICE Acc dist(int64_t j) const { return dist_row[j * stride]; }
  FK_HOST_DEVICE Acc dist_slope(int64_t j) const { return distance_slope(distance, dist(j)); }

  FK_HOST_DEVICE int64_t count_positives() const {
    int64_t c = 0;
    for (int64_t j = 0; j < batch; ++j) c += is_positive(j);
    return c;
  }
  FK_HOST_DEVICE int64_t count_negatives() const {
    int64_t c = 0;
    for (int64_t j = 0; j < batch; ++j) c += is_negative(j);
    return c;
  }

  // Ties: scanning j upwards and replacing only on a strict improvement keeps the lowest index.
  FK_HOST_DEVICE int64_t farthest_positive() const {
    int64_t best = -1;
    Acc best_d = Acc(0);
    for (int64_t j = 0; j < batch; ++j) {
      if (!is_positive(j)) continue;
      const Acc d = dist(j);
      if (best < 0 || d > best_d) best = j, best_d = d;
    }
    return best;
  }
  FK_HOST_DEVICE int64_t closest_negative() const {
    int64_t best = -1;
    Acc best_d = Acc(0);
    for (int64_t j = 0; j < batch; ++j) {
      if (!is_negative(j)) continue;
      const Acc d = dist(j);
      if (best < 0 || d < best_d) best = j, best_d = d;
    }
    return best;
  }
  // TF-Addons semi-hard: the closest negative strictly farther than d_ap, else the farthest negative
  FK_HOST_DEVICE int64_t semihard_negative(Acc d_ap) const {
    int64_t above = -1, farthest = -1;
    Acc above_d = Acc(0), farthest_d = Acc(0);
    for (int64_t j = 0; j < batch; ++j) {
      if (!is_negative(j)) continue;
      const Acc d = dist(j);
      if (d > d_ap && (above < 0 || d < above_d)) above = j, above_d = d;
      if (farthest < 0 || d > farthest_d) farthest = j, farthest_d = d;
    }
    return above >= 0 ? above : farthest;
  }
};

// Number of terms of one anchor: hard 1 (if it has a positive and a negative), semihard one per positive
// (if it has a negative), all P * N.
template <typename Acc>
FK_HOST_DEVICE int64_t count_anchor_terms(const AnchorRow<Acc>& row, Mining mining) {
  const int64_t positives = row.count_positives();
  const int64_t negatives = row.count_negatives();
  if (mining == Mining::kAll) return positives * negatives;
  if (negatives == 0) return 0;
  return mining == Mining::kHard ? (positives > 0 ? 1 : 0) : positives;
}

// Calls visit(p, n, term, slope_ap, slope_an) for every term of the anchor in (p, n) order; slope_ap and
// slope_an are d term / d raw(a, p) and d term / d raw(a, n).
template <typename Acc, typename Visit>
FK_HOST_DEVICE void for_each_anchor_term(const AnchorRow<Acc>& row, Mining mining, Acc margin, bool soft,
                                         Visit&& visit) {
  auto emit = [&](int64_t p, Acc d_ap, int64_t n) {
    const Term<Acc> t = triplet_term(d_ap - row.dist(n), margin, soft);
    visit(p, n, t.value, t.slope * row.dist_slope(p), -t.slope * row.dist_slope(n));
  };
  if (mining == Mining::kHard) {
    const int64_t p = row.farthest_positive();
    const int64_t n = row.closest_negative();
    if (p >= 0 && n >= 0) emit(p, row.dist(p), n);
    return;
  }
  if (mining == Mining::kSemihard && row.count_negatives() == 0) return;
  for (int64_t p = 0; p < row.batch; ++p) {
    if (!row.is_positive(p)) continue;
    const Acc d_ap = row.dist(p);
    if (mining == Mining::kSemihard) {
      emit(p, d_ap, row.semihard_negative(d_ap));
      continue;
    }
    for (int64_t n = 0; n < row.batch; ++n)
      if (row.is_negative(n)) emit(p, d_ap, n);
  }
}

// Per-anchor statistics of a reduced loss (stats[0..2] = sum of terms, number of terms, number of terms
// > 0) and row `anchor` of W (coef_row[j * coef_stride] += d (sum of terms) / d raw(a, j); zero-initialised
// by the caller). Everything is written by the owner of the anchor: no atomics, deterministic.
// The sum of terms is kept in double whatever Acc: with mining="all" one anchor has P * N terms (a quarter
// million for two classes of 512), and a float32 running sum of that many terms of similar size loses
// ~log2(count) bits (3e-4 relative at 2.6e5 terms). Each coef entry gets only P or N slopes, like a dot
// product of that length, so it stays in Acc.
template <typename Acc>
FK_HOST_DEVICE void reduce_anchor(const AnchorRow<Acc>& row, Mining mining, Acc margin, bool soft, Acc* stats,
                                  Acc* coef_row, int64_t coef_stride) {
  double total = 0.0;
  int64_t count = 0, nonzero = 0;  // exact; rounded once when stored (float32 is exact below 2^24)
  for_each_anchor_term(row, mining, margin, soft, [&](int64_t p, int64_t n, Acc value, Acc s_ap, Acc s_an) {
    total += value;
    count += 1;
    nonzero += value > Acc(0) ? 1 : 0;
    coef_row[p * coef_stride] += s_ap;
    coef_row[n * coef_stride] += s_an;
  });
  stats[0] = static_cast<Acc>(total);
  stats[1] = static_cast<Acc>(count);
  stats[2] = static_cast<Acc>(nonzero);
}

// Writes the anchor's terms from position `offset` on (offset = the number of terms of all lower anchors):
// terms[t], triplets[3t..3t+2] = (a, p, n), slopes[2t..2t+1] = (d term / d raw_ap, d term / d raw_an).
template <typename Acc>
FK_HOST_DEVICE void fill_anchor_terms(const AnchorRow<Acc>& row, Mining mining, Acc margin, bool soft,
                                      int64_t offset, Acc* terms, int64_t* triplets, Acc* slopes) {
  int64_t t = offset;
  for_each_anchor_term(row, mining, margin, soft, [&](int64_t p, int64_t n, Acc value, Acc s_ap, Acc s_an) {
    terms[t] = value;
    triplets[3 * t] = row.anchor;
    triplets[3 * t + 1] = p;
    triplets[3 * t + 2] = n;
    slopes[2 * t] = s_ap;
    slopes[2 * t + 1] = s_an;
    ++t;
  });
}

}  // namespace facekernels
