// The compiled CPU kernels of the margin-softmax heads: the "cpu" implementation of the kernel interface of
// facekernels/_algorithm.py (the one head algorithm; Python side facekernels/kernels/cpu.py). Schemas and
// shape functions: facekernels/_library.py.
//
// The algorithm hands every op the per-row inputs it computed once in torch (facekernels/_rowmath.py): the
// inverse norms, the target column of each row in this weight (-1 or >= C: none here), the target logit phi,
// its derivative phi' (already times the clamp's 0/1 derivative), the hard-negative threshold tau, and t.
// The classes are cut into tiles of `class_tile` rows of W. A thread takes a tile, normalises it into its own
// (tile, d) scratch, forms the (B, tile) cosine block with one GEMM (at::mm_out on views, MKL/BLAS), and
// makes one fused pass over the block: clamp, hard-negative mask and reweighting, and an online log-sum-exp
// whose per-row partials (max, sum) stay with the thread and are merged at the end. The backward recomputes
// each block once, turns it into dL/d raw cosine in place, and accumulates
//   A     += dC @ w_hat_tile * inv_x  (per-thread (B, d) partial, summed at the end; the algorithm finishes
//                                      dx = A - x_hat (x_hat . A), the embeddings' normalisation backward)
//   dW_tile = dC^T @ x_hat            (rows owned by the tile: no atomics, written once, through the weight's
//                                      normalisation backward here)
// Threading over tiles (not over the rows of one tile with a BLAS-threaded GEMM) measured 3x faster at
// B = 256, d = 512, C = 100k than BLAS threads: one parallel region per op instead of several barriers per
// tile. Nothing of size (B, C) is ever allocated: only (B, tile) and (tile, d) per thread, O(B d) for x_hat
// and O(B) per-row statistics. Everything accumulates in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "facekernels/check_message.h"
#include "facekernels/common.h"
#include "facekernels/head_math.h"

namespace facekernels {
namespace {

// Classes per tile when the caller passes class_tile = 0: a (256, 1024) float32 block is 1 MiB and the
// (B, tile) x (tile, d) GEMMs are large enough for BLAS to run near peak; smaller C gets smaller tiles so
// that every thread has one, and large batches too so that a (B, tile) block stays near kBlockElements
// (down to kMinClassTile).
constexpr int64_t kDefaultClassTile = 1024;
constexpr int64_t kMinClassTile = 128;
constexpr int64_t kBlockElements = int64_t(1) << 20;
constexpr double kInf = std::numeric_limits<double>::infinity();

int64_t resolve_class_tile(int64_t class_tile, int64_t batch, int64_t num_classes, int64_t k) {
  int64_t tile = class_tile;
  if (tile <= 0) {
    // sized in rows of W (k per class: sub-centers), so that the (B, tile k) blocks keep the same bound
    const int64_t rows = num_classes * k;
    const int64_t per_thread = (rows + at::get_num_threads() - 1) / at::get_num_threads();
    const int64_t per_block = kBlockElements / std::max<int64_t>(batch, 1);
    tile = std::max(kMinClassTile, std::min({kDefaultClassTile, per_thread, per_block})) / k;
  }
  return std::max<int64_t>(1, std::min(tile, num_classes));
}

at::ScalarType acc_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

void check_row_tensor(const at::Tensor& v, const char* name, int64_t n, at::ScalarType dtype) {
  FK_CHECK_VALUE(v.dim() == 1 && v.size(0) == n && v.device().is_cpu(), name, " must be a CPU tensor of shape (",
                    n, ",); got ", v.sizes(), " on ", v.device());
  FK_CHECK_TYPE(v.scalar_type() == dtype, name, " must be ", dtype, "; got ", v.scalar_type());
}

// The checks both head kernels share. The Python algorithm validated the user's inputs already; these catch
// a direct call of the op with inconsistent arguments (a clear error instead of an out-of-bounds read).
void check_head_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& inv_x, const at::Tensor& inv_w,
                     const at::Tensor& target, const at::Tensor& phi, const at::Tensor& tau,
                     const c10::optional<at::Tensor>& t, double s, int64_t negatives, double cos_bound,
                     int64_t subcenters, int64_t class_tile) {
  FK_CHECK_VALUE(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
                    "embeddings and weight must be 2-D with the same number of features; got ", x.sizes(), " and ",
                    w.sizes());
  FK_CHECK_VALUE(w.size(0) > 0, "weight must have at least one class (row)");
  FK_CHECK_TYPE(at::isFloatingType(x.scalar_type()) && x.scalar_type() == w.scalar_type(),
                   "embeddings and weight must be floating-point tensors of one dtype; got ", x.scalar_type(),
                   " and ", w.scalar_type());
  FK_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu(), "embeddings and weight must be CPU tensors");
  const auto acc = acc_dtype(x.scalar_type());
  const int64_t batch = x.size(0);
  check_row_tensor(inv_x, "inv_x", batch, acc);
  FK_CHECK_VALUE(subcenters >= 1 && w.size(0) % subcenters == 0,
                    "subcenters must be >= 1 and divide the weight's rows; got ", subcenters, " for ", w.size(0),
                    " rows");
  FK_CHECK_VALUE(cos_bound > 0 && cos_bound <= 1, "cos_bound must be in (0, 1]; got ", cos_bound);
  check_row_tensor(inv_w, "inv_w", w.size(0), acc);
  check_row_tensor(target, "target", batch, at::kLong);
  check_row_tensor(phi, "phi", batch, acc);
  check_row_tensor(tau, "tau", batch, acc);
  FK_CHECK_VALUE(negatives >= 0 && negatives <= 2, "negatives must be 0..2 (facekernels.Negatives); got ",
                    negatives);
  FK_CHECK_VALUE(std::isfinite(s) && s > 0, "s must be a finite positive scale; got ", s);
  FK_CHECK_VALUE(class_tile >= 0, "class_tile must be >= 0 (0: default); got ", class_tile);
  if (negatives == static_cast<int64_t>(Negatives::kCurricular)) {
    FK_CHECK_VALUE(t.has_value() && t->defined() && t->dim() == 0 && t->device().is_cpu(),
                      "t (a 0-dim CPU tensor) is required when negatives is CURRICULAR");
    FK_CHECK_TYPE(t->scalar_type() == at::kFloat, "t must be float32; got ", t->scalar_type());
  }
}

double read_t(const c10::optional<at::Tensor>& t, int64_t negatives) {
  // a CPU scalar read, not a device sync; t is only read for CurricularFace (checked in check_head_args)
  if (negatives != static_cast<int64_t>(Negatives::kCurricular)) return 0.0;
  return static_cast<double>(*t->contiguous().data_ptr<float>());
}

// w_hat rows [j0, j0 + n) of w into out (n, d): w_j * inv_w_j, in acc_t.
template <typename scalar_t, typename acc_t>
void normalize_weight_rows(const scalar_t* w, const acc_t* inv_w, int64_t j0, int64_t n, int64_t d, acc_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* wj = w + (j0 + j) * d;
    const acc_t r = inv_w[j0 + j];
    acc_t* oj = out + j * d;
    for (int64_t k = 0; k < d; ++k) oj[k] = static_cast<acc_t>(wj[k]) * r;
  }
}

// Per-thread scratch: rows of one tensor indexed by at::get_thread_num().
at::Tensor thread_slot(const at::Tensor& slots, int64_t rows, int64_t cols) {
  return slots[at::get_thread_num()].view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}

// The per-row inputs of both kernels, as raw pointers (all contiguous, acc_t or int64).
template <typename acc_t>
struct Rows {
  at::Tensor x_hat;  // (B, d) acc_t, x * inv_x
  const acc_t* inv_x;
  const acc_t* inv_w;
  const int64_t* target;
  const acc_t* phi;
  const acc_t* dphi;  // may be null (forward)
  const acc_t* tau;
};

template <typename acc_t>
Rows<acc_t> make_rows(const at::Tensor& x, const at::Tensor& inv_x, const at::Tensor& inv_w, const at::Tensor& target,
                      const at::Tensor& phi, const at::Tensor& dphi, const at::Tensor& tau) {
  Rows<acc_t> r;
  r.x_hat = (x.to(inv_x.scalar_type()) * inv_x.unsqueeze(1)).contiguous();
  r.inv_x = inv_x.data_ptr<acc_t>();
  r.inv_w = inv_w.data_ptr<acc_t>();
  r.target = target.data_ptr<int64_t>();
  r.phi = phi.data_ptr<acc_t>();
  r.dphi = dphi.defined() ? dphi.data_ptr<acc_t>() : nullptr;
  r.tau = tau.data_ptr<acc_t>();
  return r;
}

// rank_cos: null, or the rows' target cosines; then the third output counts, per row, the classes other than
// the target column (left out by index: its recomputed cosine may differ from rank_cos by a rounding) whose
// clamped margin-free cosine c beats it: !(c <= rank_cos), strictly greater or NaN (facekernels/_rowmath.py,
// beats_target; one compare per class through rank_threshold). Without it the op computes nothing of the kind
// and returns an empty third output.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_impl(const at::Tensor& x, const at::Tensor& w,
                                                        const Rows<at::opmath_type<scalar_t>>& rows,
                                                        double t_value, const NegativeMath& p, int64_t tile,
                                                        int64_t k, const at::opmath_type<scalar_t>* rank_cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), d = x.size(1), num_classes = w.size(0) / k;
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const int64_t num_tiles = (num_classes + tile - 1) / tile;
  const int64_t threads = at::get_num_threads();
  const at::Tensor w_hat_slots = at::empty({threads, tile * k, d}, opts);
  const at::Tensor block_slots = at::empty({threads, batch, tile * k}, opts);
  // per-thread online log-sum-exp partials of every row, merged below
  std::vector<acc_t> run_max(threads * batch, -acc_t(kInf)), run_sum(threads * batch, acc_t(0));
  std::vector<int64_t> run_rank(rank_cos != nullptr ? threads * batch : 0, 0);  // per-thread counts, summed below
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const acc_t s = acc_t(p.s), t = acc_t(t_value), bound = acc_t(p.bound);

  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    const int64_t tid = at::get_thread_num();
    std::vector<acc_t> tile_max(batch);
    for (int64_t tile_index = tile_begin; tile_index < tile_end; ++tile_index) {
      const int64_t j0 = tile_index * tile, n = std::min(tile, num_classes - j0);
      at::Tensor w_hat = thread_slot(w_hat_slots, n * k, d);
      normalize_weight_rows<scalar_t, acc_t>(wp, rows.inv_w, j0 * k, n * k, d, w_hat.data_ptr<acc_t>());
      at::Tensor block = thread_slot(block_slots, batch, n * k);
      at::mm_out(block, rows.x_hat, w_hat.t());  // raw cosines x_hat . w_hat of every sub-center
      acc_t* bp = block.data_ptr<acc_t>();
      // fused pass 1: logits z_j = s N(c_j) (s phi on the target), c_j the max over class j's k sub-centers,
      // written in place over the row's first n entries (class j reads entries >= j k >= j before writing j),
      // shifted by the tile's row max
      for (int64_t i = 0; i < batch; ++i) {
        acc_t* zi = bp + i * n * k;
        const acc_t tau = rows.tau[i];
        const int64_t target = rows.target[i] - j0;
        if (rank_cos != nullptr) {  // before the raw cosines are overwritten by the logits
          const acc_t threshold = rank_threshold(rank_cos[i], bound);
          auto class_raw = [&](int64_t j) { return k == 1 ? zi[j] : subcenter_max(zi + j * k, k).raw; };
          int64_t beats = 0;
          if (k == 1) {
#pragma omp simd reduction(+ : beats)
            for (int64_t j = 0; j < n; ++j) beats += !(zi[j] <= threshold);
          } else {
            for (int64_t j = 0; j < n; ++j) beats += !(class_raw(j) <= threshold);
          }
          // the target column is left out by index (its recomputed cosine may beat rank_cos by a rounding)
          if (target >= 0 && target < n) beats -= !(class_raw(target) <= threshold);
          run_rank[tid * batch + i] += beats;
        }
        for (int64_t j = 0; j < n; ++j) {
          const acc_t raw = k == 1 ? zi[j] : subcenter_max(zi + j * k, k).raw;
          zi[j] = s * negative_logit(clamp_cosine(raw, bound), tau, t, p).value;
        }
        if (target >= 0 && target < n) zi[target] = s * rows.phi[i];
        acc_t m = -acc_t(kInf);
        for (int64_t j = 0; j < n; ++j) m = max_keep_nan(m, zi[j]);
        tile_max[i] = m;
        for (int64_t j = 0; j < n; ++j) zi[j] -= m;
      }
      block.narrow(1, 0, n).exp_();  // ATen's vectorised exp (single-threaded inside this parallel region)
      // pass 2: row sums, merged into this thread's running (max, sum)
      for (int64_t i = 0; i < batch; ++i) {
        const acc_t* ei = bp + i * n * k;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) sum += ei[j];
        acc_t& rm = run_max[tid * batch + i];
        acc_t& rs = run_sum[tid * batch + i];
        const acc_t m = max_keep_nan(rm, tile_max[i]);
        rs = rs * std::exp(rm - m) + sum * std::exp(tile_max[i] - m);
        rm = m;
      }
    }
  });

  at::Tensor lse = at::empty({batch}, opts);
  at::Tensor row_max = at::empty({batch}, opts);
  acc_t* lp = lse.data_ptr<acc_t>();
  acc_t* mp = row_max.data_ptr<acc_t>();
  for (int64_t i = 0; i < batch; ++i) {
    acc_t m = -acc_t(kInf);
    for (int64_t q = 0; q < threads; ++q) m = max_keep_nan(m, run_max[q * batch + i]);
    mp[i] = m;
    acc_t sum = 0;
    for (int64_t q = 0; q < threads; ++q) {  // skip threads that saw no tile (their max is still -inf)
      const acc_t mq = run_max[q * batch + i];
      if (mq != -acc_t(kInf)) sum += run_sum[q * batch + i] * std::exp(mq - m);
    }
    lp[i] = m + std::log(sum);  // NaN when any partial is NaN (max_keep_nan)
  }
  at::Tensor rank = at::zeros({rank_cos != nullptr ? batch : 0}, opts.dtype(at::kLong));
  int64_t* rp = rank.data_ptr<int64_t>();
  for (int64_t q = 0; q < static_cast<int64_t>(run_rank.size()); ++q) rp[q % batch] += run_rank[q];
  return {lse, row_max, rank};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_rows, const at::Tensor& x,
                                                 const at::Tensor& w, const Rows<at::opmath_type<scalar_t>>& rows,
                                                 double t_value, const at::Tensor& lse, const NegativeMath& p,
                                                 int64_t tile, int64_t k, bool need_dx, bool need_dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), d = x.size(1), num_rows = w.size(0), num_classes = num_rows / k;
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  const at::Tensor grad = grad_rows.to(opts.dtype()).contiguous();
  const at::Tensor lse_acc = lse.to(opts.dtype()).contiguous();
  const int64_t num_tiles = (num_classes + tile - 1) / tile;
  const int64_t threads = at::get_num_threads();
  const at::Tensor w_hat_slots = at::empty({threads, tile * k, d}, opts);
  const at::Tensor raw_slots = at::empty({threads, batch, tile * k}, opts);
  const at::Tensor dc_slots = at::empty({threads, batch, tile * k}, opts);
  const at::Tensor dw_hat_slots = need_dw ? at::empty({threads, tile * k, d}, opts) : at::Tensor();
  const at::Tensor dx_hat_slots = need_dx ? at::zeros({threads, batch, d}, opts) : at::Tensor();
  at::Tensor dw = need_dw ? at::empty({num_rows, d}, w.options()) : at::empty({0}, w.options());
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const acc_t* gp = grad.data_ptr<acc_t>();
  const acc_t* lp = lse_acc.data_ptr<acc_t>();
  const acc_t s = acc_t(p.s), t = acc_t(t_value), bound = acc_t(p.bound);

  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    for (int64_t tile_index = tile_begin; tile_index < tile_end; ++tile_index) {
      const int64_t j0 = tile_index * tile, n = std::min(tile, num_classes - j0), nk = n * k;
      at::Tensor w_hat = thread_slot(w_hat_slots, nk, d);
      normalize_weight_rows<scalar_t, acc_t>(wp, rows.inv_w, j0 * k, nk, d, w_hat.data_ptr<acc_t>());
      at::Tensor raw = thread_slot(raw_slots, batch, nk);
      at::Tensor dc = thread_slot(dc_slots, batch, nk);
      at::mm_out(raw, rows.x_hat, w_hat.t());  // recomputed, never stored across tiles
      const acc_t* rawp = raw.data_ptr<acc_t>();
      acc_t* dcp = dc.data_ptr<acc_t>();
      // the class cosine: the raw value itself, or the max over the class's k sub-centers
      auto class_raw = [&](const acc_t* ri, int64_t j) { return k == 1 ? ri[j] : subcenter_max(ri + j * k, k).raw; };
      // z - lse in the row's first n entries of dc, exponentiated below into softmax probabilities
      for (int64_t i = 0; i < batch; ++i) {
        const acc_t* ri = rawp + i * nk;
        acc_t* di = dcp + i * nk;
        const acc_t tau = rows.tau[i], shift = lp[i];
        for (int64_t j = 0; j < n; ++j)
          di[j] = s * negative_logit(clamp_cosine(class_raw(ri, j), bound), tau, t, p).value - shift;
        const int64_t target = rows.target[i] - j0;
        if (target >= 0 && target < n) di[target] = s * rows.phi[i] - shift;
      }
      dc.narrow(1, 0, n).exp_();
      // dL/d raw = g_i (softmax - onehot) s dz/dc, times the clamp's 0/1 derivative (in dphi for the target);
      // with sub-centers it goes to the class's first maximum, the others 0: spread in place from the last
      // class down (class j's entries j k .. j k + k - 1 hold the values of classes >= j, already spread)
      for (int64_t i = 0; i < batch; ++i) {
        const acc_t* ri = rawp + i * nk;
        acc_t* di = dcp + i * nk;
        const acc_t gs = gp[i] * s, tau = rows.tau[i];
        const int64_t target = rows.target[i] - j0;
        const bool has_target = target >= 0 && target < n;
        const acc_t target_prob = has_target ? di[target] : acc_t(0);
        for (int64_t j = 0; j < n; ++j) {
          const acc_t cr = class_raw(ri, j);
          const acc_t dn = negative_logit(clamp_cosine(cr, bound), tau, t, p).derivative;
          di[j] = inside_bound(cr, bound) ? gs * di[j] * dn : acc_t(0);
        }
        if (has_target) di[target] = gs * (target_prob - 1) * rows.dphi[i];
        if (k > 1) {
          for (int64_t j = n - 1; j >= 0; --j) {
            const acc_t value = di[j];
            const int64_t winner = subcenter_max(ri + j * k, k).index;
            for (int64_t q = 0; q < k; ++q) di[j * k + q] = q == winner ? value : acc_t(0);
          }
        }
      }
      if (need_dx) thread_slot(dx_hat_slots, batch, d).addmm_(dc, w_hat);
      if (need_dw) {
        at::Tensor dw_hat = thread_slot(dw_hat_slots, nk, d);
        at::mm_out(dw_hat, dc.t(), rows.x_hat);
        // normalisation backward of w_j: (dw_hat - w_hat (w_hat . dw_hat)) / max(||w_j||, eps)
        const acc_t* whp = w_hat.data_ptr<acc_t>();
        const acc_t* dhp = dw_hat.data_ptr<acc_t>();
        scalar_t* out = dw.data_ptr<scalar_t>() + j0 * k * d;
        for (int64_t j = 0; j < nk; ++j) {
          acc_t dot = 0;
          for (int64_t q = 0; q < d; ++q) dot += whp[j * d + q] * dhp[j * d + q];
          const acc_t inv = rows.inv_w[j0 * k + j];
          for (int64_t q = 0; q < d; ++q)
            out[j * d + q] = static_cast<scalar_t>((dhp[j * d + q] - whp[j * d + q] * dot) * inv);
        }
      }
    }
  });

  // A = inv_x * d x_hat; the algorithm applies the embeddings' normalisation backward once, for every backend
  at::Tensor a = need_dx ? dx_hat_slots.sum(0) * at::from_blob(const_cast<acc_t*>(rows.inv_x), {batch, 1}, opts)
                         : at::empty({0}, opts);
  return {a, dw};
}

NegativeMath negative_math(double s, int64_t negatives, double mv_t, double cos_bound, double filter) {
  return NegativeMath{s, mv_t, static_cast<Negatives>(negatives), cos_bound, filter};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_lse_cpu(
    const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& inv_x, const at::Tensor& inv_w,
    const at::Tensor& target, const at::Tensor& phi, const at::Tensor& tau, const c10::optional<at::Tensor>& t,
    double s, int64_t negatives, double mv_t, double cos_bound, double filter_threshold, int64_t subcenters,
    int64_t class_tile, const c10::optional<at::Tensor>& rank_cos) {
  check_head_args(embeddings, weight, inv_x, inv_w, target, phi, tau, t, s, negatives, cos_bound, subcenters,
                  class_tile);
  const bool rank = rank_cos.has_value() && rank_cos->defined();
  if (rank) check_row_tensor(*rank_cos, "rank_cos", embeddings.size(0), acc_dtype(embeddings.scalar_type()));
  at::NoGradGuard no_grad;
  const auto x = embeddings.contiguous(), w = weight.contiguous();
  const auto ix = inv_x.contiguous(), iw = inv_w.contiguous(), y = target.contiguous(), ph = phi.contiguous(),
             ta = tau.contiguous();
  const int64_t tile = resolve_class_tile(class_tile, x.size(0), w.size(0) / subcenters, subcenters);
  const at::Tensor rc = rank ? rank_cos->contiguous() : at::Tensor();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_lse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto rows = make_rows<acc_t>(x, ix, iw, y, ph, at::Tensor(), ta);
    out = lse_impl<scalar_t>(x, w, rows, read_t(t, negatives),
                             negative_math(s, negatives, mv_t, cos_bound, filter_threshold), tile, subcenters,
                             rank ? rc.data_ptr<acc_t>() : nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> margin_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& inv_x,
    const at::Tensor& inv_w, const at::Tensor& target, const at::Tensor& phi, const at::Tensor& dphi,
    const at::Tensor& tau, const c10::optional<at::Tensor>& t, const at::Tensor& lse, double s, int64_t negatives,
    double mv_t, double cos_bound, double filter_threshold, int64_t subcenters, bool need_embeddings_grad,
    bool need_weight_grad, int64_t class_tile) {
  check_head_args(embeddings, weight, inv_x, inv_w, target, phi, tau, t, s, negatives, cos_bound, subcenters,
                  class_tile);
  const int64_t batch = embeddings.size(0);
  const auto acc = acc_dtype(embeddings.scalar_type());
  check_row_tensor(dphi, "dphi", batch, acc);
  check_row_tensor(lse, "lse", batch, acc);
  check_row_tensor(grad_rows, "grad_rows", batch, acc);
  at::NoGradGuard no_grad;
  const auto x = embeddings.contiguous(), w = weight.contiguous();
  const auto ix = inv_x.contiguous(), iw = inv_w.contiguous(), y = target.contiguous(), ph = phi.contiguous(),
             dph = dphi.contiguous(), ta = tau.contiguous();
  const int64_t tile = resolve_class_tile(class_tile, x.size(0), w.size(0) / subcenters, subcenters);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto rows = make_rows<acc_t>(x, ix, iw, y, ph, dph, ta);
    out = backward_impl<scalar_t>(grad_rows, x, w, rows, read_t(t, negatives), lse,
                                  negative_math(s, negatives, mv_t, cos_bound, filter_threshold), tile, subcenters,
                                  need_embeddings_grad, need_weight_grad);
  });
  return out;
}

// 1 / max(||a_r||, eps) per row, in float32 (float64 for float64 input). The squares are summed in double:
// a float32 sum overflows for rows with norms above ~1.8e19 and would turn them into zero vectors.
at::Tensor inv_norms_cpu(const at::Tensor& a) {
  FK_CHECK_VALUE(a.dim() == 2 && a.device().is_cpu(), "inv_norms takes a 2-D CPU tensor; got ", a.sizes());
  FK_CHECK_TYPE(at::isFloatingType(a.scalar_type()), "inv_norms takes a floating-point tensor; got ",
                   a.scalar_type());
  const auto rows = a.contiguous();
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor out = at::empty({n}, rows.options().dtype(acc_dtype(rows.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "inv_norms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = rows.data_ptr<scalar_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        double sq = 0;
        for (int64_t k = 0; k < d; ++k) {
          const double v = static_cast<double>(ap[r * d + k]);
          sq += v * v;
        }
        // NaN-keeping max with eps: a NaN row keeps a NaN inverse norm
        op[r] = static_cast<acc_t>(1.0 / max_keep_nan(std::sqrt(sq), kNormEps));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("margin_lse", &margin_lse_cpu);
  m.impl("margin_backward", &margin_backward_cpu);
  m.impl("inv_norms", &inv_norms_cpu);
}

}  // namespace facekernels
