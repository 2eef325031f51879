// Fused CPU forward and backward of the margin-softmax heads (shared/spec/heads.md), and CurricularFace's
// t update. Schemas: TORCH_LIBRARY_FRAGMENT below; Python side: facekernels/ops/cpu_heads.py.
//
// The classes are cut into tiles of `class_tile` rows of W. A thread takes a tile, normalises it into its
// own (tile, d) scratch, forms the (B, tile) cosine block with one GEMM (at::mm_out on views, MKL/BLAS), and
// makes one fused pass over the block: clamp, target margin, hard-negative mask and reweighting, and an
// online log-sum-exp whose per-row partials (max, sum) stay with the thread and are merged at the end.
// The backward recomputes each block, turns it into dL/dc in place, and accumulates
//   d x_hat += dC @ w_hat_tile   (per-thread (B, d) partial, summed at the end)
//   d w_hat_tile = dC^T @ x_hat  (rows owned by the tile: no atomics, written once)
// then applies the normalisation backward. Threading over tiles (not over the rows of one tile with a
// BLAS-threaded GEMM) measured 3x faster at B = 256, d = 512, C = 100k: one parallel region per op instead
// of several barriers per tile (README, Results). Nothing of size (B, C) is ever allocated: only (B, tile) and
// (tile, d) per thread, O(B d) for x_hat and O(B) per-row statistics. Everything accumulates in float32
// (float64 for float64 inputs).
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

#include "facekernels/common.h"
#include "facekernels/head_math.h"

namespace facekernels {
namespace {

// Classes per tile when the caller passes class_tile = 0: a (256, 1024) float32 block is 1 MiB and the
// (B, tile) x (tile, d) GEMMs are large enough for BLAS to run near peak. At B = 256, d = 512, C = 100k,
// tiles of 256 to 2048 classes measured the same within noise (bench/cpu_heads_memory_time.py); smaller C
// gets smaller tiles so that every thread has one, and large batches too so that a (B, tile) block stays
// near kBlockElements (down to kMinClassTile).
constexpr int64_t kDefaultClassTile = 1024;
constexpr int64_t kMinClassTile = 128;
constexpr int64_t kBlockElements = int64_t(1) << 20;

int64_t resolve_class_tile(int64_t class_tile, int64_t batch, int64_t num_classes) {
  int64_t tile = class_tile;
  if (tile <= 0) {
    const int64_t per_thread = (num_classes + at::get_num_threads() - 1) / at::get_num_threads();
    const int64_t per_block = kBlockElements / std::max<int64_t>(batch, 1);
    tile = std::max(kMinClassTile, std::min({kDefaultClassTile, per_thread, per_block}));
  }
  return std::max<int64_t>(1, std::min(tile, num_classes));
}

at::ScalarType acc_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

void check_head_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                     const c10::optional<at::Tensor>& t, int64_t fallback, int64_t negatives, double s,
                     int64_t class_tile, const c10::optional<at::Tensor>& target_cos = c10::nullopt) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 2, "embeddings and weight must be 2-D; got ", x.sizes(), " and ",
                    w.sizes());
  TORCH_CHECK_VALUE(x.size(1) == w.size(1), "embeddings and weight must have the same number of features; got ",
                    x.sizes(), " and ", w.sizes());
  TORCH_CHECK_VALUE(w.size(0) > 0, "weight must have at least one class (row)");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "embeddings must be a floating-point tensor; got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "embeddings and weight must have one dtype; got ",
                   x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64; got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == x.size(0), "labels must have shape (", x.size(0),
                    ",); got ", labels.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() && w.device().is_cpu() && labels.device().is_cpu(),
                    "embeddings, weight and labels must be CPU tensors");
  TORCH_CHECK_VALUE(fallback >= 0 && fallback <= 3, "fallback must be 0..3 (facekernels.Fallback); got ", fallback);
  TORCH_CHECK_VALUE(negatives >= 0 && negatives <= 2, "negatives must be 0..2 (facekernels.Negatives); got ",
                    negatives);
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, "s must be a finite positive scale; got ", s);
  TORCH_CHECK_VALUE(class_tile >= 0, "class_tile must be >= 0 (0: default); got ", class_tile);
  if (target_cos.has_value() && target_cos->defined()) {
    TORCH_CHECK_VALUE(target_cos->dim() == 1 && target_cos->size(0) == x.size(0) && target_cos->device().is_cpu(),
                      "target_cos must be a CPU tensor of shape (", x.size(0), ",); got ", target_cos->sizes());
    TORCH_CHECK_TYPE(target_cos->scalar_type() == acc_dtype(x.scalar_type()), "target_cos must be ",
                     acc_dtype(x.scalar_type()), " for ", x.scalar_type(), " embeddings; got ",
                     target_cos->scalar_type());
  }
  if (negatives == static_cast<int64_t>(Negatives::kCurricular)) {
    TORCH_CHECK_VALUE(t.has_value() && t->defined(), "t is required when negatives is CURRICULAR");
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "t must be float32; got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 0 && t->device().is_cpu(), "t must be a 0-dim CPU tensor; got shape ",
                      t->sizes());
  }
}

// Per-row quantities shared by the forward and the backward (all O(B d) or O(B)).
template <typename acc_t>
struct Rows {
  at::Tensor x_hat;  // (B, d) acc_t, x / max(||x||, eps)
  at::Tensor inv_x;  // (B,)  1 / max(||x||, eps)
  std::vector<unsigned char> valid;
  std::vector<TargetLogit<acc_t>> target;  // phi, phi', tau of each valid row
  std::vector<unsigned char> target_inside;  // -1 < x_hat . w_hat_y < 1 (clamp gradient)
  std::vector<acc_t> target_cos;
  int64_t valid_rows = 0;
};

// w_hat rows [j0, j0 + n) of w into out (n, d), and their 1 / max(||w_j||, eps) into inv (n,).
template <typename scalar_t, typename acc_t>
void normalize_weight_rows(const scalar_t* w, int64_t j0, int64_t n, int64_t d, acc_t* out, acc_t* inv) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t* wj = w + (j0 + j) * d;
    acc_t* oj = out + j * d;
    acc_t sq = 0;
    for (int64_t k = 0; k < d; ++k) {
      const acc_t v = static_cast<acc_t>(wj[k]);
      oj[k] = v;
      sq += v * v;
    }
    const acc_t r = inv_norm(sq);
    for (int64_t k = 0; k < d; ++k) oj[k] *= r;
    inv[j] = r;
  }
}

// Class-sharded mode (facekernels/sharded.py): `target_cos` holds every row's (global) target cosine. A row
// whose label is outside [0, num_classes) and not ignore_index then has its target on another shard: its
// negatives here still enter the log-sum-exp and get gradients, its target term lives on the owning shard.
// Without it, every non-ignored label must be a class of `w` (the single-device op).
template <typename scalar_t, typename acc_t>
Rows<acc_t> prepare_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                         int64_t ignore_index, const HeadMath& p, const at::Tensor& target_cos = at::Tensor()) {
  const int64_t batch = x.size(0), d = x.size(1), num_classes = w.size(0);
  Rows<acc_t> r;
  const auto acc = acc_dtype(x.scalar_type());
  const at::Tensor x_acc = x.to(acc);
  r.inv_x = x_acc.norm(2, {1}, /*keepdim=*/true).clamp_min(kNormEps).reciprocal();
  r.x_hat = (x_acc * r.inv_x).contiguous();
  r.inv_x = r.inv_x.view({batch}).contiguous();
  r.valid.assign(batch, 0);
  r.target.resize(batch);
  r.target_inside.assign(batch, 0);
  r.target_cos.assign(batch, acc_t(0));
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(target_cos.defined() || (y[i] >= 0 && y[i] < num_classes), "labels must lie in [0, ",
                      num_classes, ") or equal ignore_index=", ignore_index, "; found ", y[i], " at row ", i);
    r.valid[i] = 1;
    ++r.valid_rows;
  }
  const acc_t* xh = r.x_hat.template data_ptr<acc_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const acc_t* given_cos = target_cos.defined() ? target_cos.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w_hat(d);
    acc_t inv;
    for (int64_t i = begin; i < end; ++i) {
      if (!r.valid[i]) continue;
      acc_t c = 0;
      if (y[i] >= 0 && y[i] < num_classes) {
        // the same w_hat values (w * inv computed in acc_t) as the GEMM tiles read
        normalize_weight_rows<scalar_t, acc_t>(wp, y[i], 1, d, w_hat.data(), &inv);
        acc_t raw = 0;
        for (int64_t k = 0; k < d; ++k) raw += xh[i * d + k] * w_hat[k];
        c = clamp_unit(raw);
        r.target_inside[i] = inside_unit(raw);
      }
      // every shard uses the one given value, so that phi and tau agree across shards
      if (given_cos) c = clamp_unit(given_cos[i]);
      r.target_cos[i] = c;
      r.target[i] = target_logit(c, p);
    }
  });
  return r;
}

// Per-thread scratch: rows of one tensor indexed by at::get_thread_num().
at::Tensor thread_slot(const at::Tensor& slots, int64_t rows, int64_t cols) {
  return slots[at::get_thread_num()].view(-1).narrow(0, 0, rows * cols).view({rows, cols});
}

constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                                                double t_value, const HeadMath& p, int64_t ignore_index,
                                                int64_t tile, const at::Tensor& target_cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), d = x.size(1), num_classes = w.size(0);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Rows<acc_t> rows = prepare_rows<scalar_t, acc_t>(x, w, labels, ignore_index, p, target_cos);
  const int64_t num_tiles = (num_classes + tile - 1) / tile;
  const int64_t threads = at::get_num_threads();
  const at::Tensor w_hat_slots = at::empty({threads, tile, d}, opts);
  const at::Tensor inv_slots = at::empty({threads, tile}, opts);
  const at::Tensor block_slots = at::empty({threads, batch, tile}, opts);
  // per-thread online log-sum-exp partials of every row, merged below
  std::vector<acc_t> run_max(threads * batch, -acc_t(kInf)), run_sum(threads * batch, acc_t(0));
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t s = acc_t(p.s), t = acc_t(t_value);

  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    const int64_t tid = at::get_thread_num();
    std::vector<acc_t> tile_max(batch);
    for (int64_t tile_index = tile_begin; tile_index < tile_end; ++tile_index) {
      const int64_t j0 = tile_index * tile, n = std::min(tile, num_classes - j0);
      at::Tensor w_hat = thread_slot(w_hat_slots, n, d);
      normalize_weight_rows<scalar_t, acc_t>(wp, j0, n, d, w_hat.data_ptr<acc_t>(),
                                             inv_slots[tid].data_ptr<acc_t>());
      at::Tensor block = thread_slot(block_slots, batch, n);
      at::mm_out(block, rows.x_hat, w_hat.t());  // raw cosines x_hat . w_hat
      acc_t* bp = block.data_ptr<acc_t>();
      // fused pass 1: logits z = s N(c) (s phi on the target), stored shifted by the tile's row max
      for (int64_t i = 0; i < batch; ++i) {
        acc_t* zi = bp + i * n;
        if (!rows.valid[i]) {
          std::fill(zi, zi + n, -acc_t(kInf));
          continue;
        }
        const acc_t tau = rows.target[i].tau;
        acc_t m = -acc_t(kInf);
        for (int64_t j = 0; j < n; ++j) {
          const acc_t z = s * negative_logit(clamp_unit(zi[j]), tau, t, p).value;
          zi[j] = z;
          m = std::max(m, z);
        }
        const int64_t target = y[i] - j0;
        if (target >= 0 && target < n) {
          zi[target] = s * rows.target[i].phi;
          m = *std::max_element(zi, zi + n);
        }
        tile_max[i] = m;
        for (int64_t j = 0; j < n; ++j) zi[j] -= m;
      }
      at::exp_(block);  // ATen's vectorised exp (single-threaded inside this parallel region)
      // pass 2: row sums, merged into this thread's running (max, sum)
      for (int64_t i = 0; i < batch; ++i) {
        if (!rows.valid[i]) continue;
        const acc_t* ei = bp + i * n;
        acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) sum += ei[j];
        acc_t& rm = run_max[tid * batch + i];
        acc_t& rs = run_sum[tid * batch + i];
        const acc_t m = std::max(rm, tile_max[i]);
        rs = rs * std::exp(rm - m) + sum * std::exp(tile_max[i] - m);
        rm = m;
      }
    }
  });

  at::Tensor lse = at::zeros({batch}, opts);
  at::Tensor row_loss = at::zeros({batch}, opts);
  acc_t* lp = lse.data_ptr<acc_t>();
  acc_t* rp = row_loss.data_ptr<acc_t>();
  for (int64_t i = 0; i < batch; ++i) {
    if (!rows.valid[i]) continue;
    acc_t m = -acc_t(kInf);
    for (int64_t k = 0; k < threads; ++k) m = std::max(m, run_max[k * batch + i]);
    acc_t sum = 0;
    for (int64_t k = 0; k < threads; ++k) {  // skip threads that saw no tile (their max is still -inf)
      if (run_max[k * batch + i] != -acc_t(kInf)) sum += run_sum[k * batch + i] * std::exp(run_max[k * batch + i] - m);
    }
    lp[i] = m + std::log(sum);
    rp[i] = lp[i] - s * rows.target[i].phi;
  }
  return {row_loss, lse};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& w,
                                                 const at::Tensor& labels, double t_value, const at::Tensor& lse,
                                                 const HeadMath& p, int64_t ignore_index, int64_t tile, bool need_dx,
                                                 bool need_dw, const at::Tensor& target_cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = x.size(0), d = x.size(1), num_classes = w.size(0);
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  Rows<acc_t> rows = prepare_rows<scalar_t, acc_t>(x, w, labels, ignore_index, p, target_cos);
  const at::Tensor grad = grad_rows.to(opts.dtype()).contiguous();
  const at::Tensor lse_acc = lse.to(opts.dtype()).contiguous();
  const int64_t num_tiles = (num_classes + tile - 1) / tile;
  const int64_t threads = at::get_num_threads();
  const at::Tensor w_hat_slots = at::empty({threads, tile, d}, opts);
  const at::Tensor inv_slots = at::empty({threads, tile}, opts);
  const at::Tensor raw_slots = at::empty({threads, batch, tile}, opts);
  const at::Tensor dc_slots = at::empty({threads, batch, tile}, opts);
  const at::Tensor dw_hat_slots = need_dw ? at::empty({threads, tile, d}, opts) : at::Tensor();
  const at::Tensor dx_hat_slots = need_dx ? at::zeros({threads, batch, d}, opts) : at::Tensor();
  at::Tensor dw = need_dw ? at::empty({num_classes, d}, w.options()) : at::empty({0}, w.options());
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const acc_t* gp = grad.data_ptr<acc_t>();
  const acc_t* lp = lse_acc.data_ptr<acc_t>();
  const acc_t s = acc_t(p.s), t = acc_t(t_value);

  at::parallel_for(0, num_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    const int64_t tid = at::get_thread_num();
    for (int64_t tile_index = tile_begin; tile_index < tile_end; ++tile_index) {
      const int64_t j0 = tile_index * tile, n = std::min(tile, num_classes - j0);
      at::Tensor w_hat = thread_slot(w_hat_slots, n, d);
      acc_t* inv = inv_slots[tid].data_ptr<acc_t>();
      normalize_weight_rows<scalar_t, acc_t>(wp, j0, n, d, w_hat.data_ptr<acc_t>(), inv);
      at::Tensor raw = thread_slot(raw_slots, batch, n);
      at::Tensor dc = thread_slot(dc_slots, batch, n);
      at::mm_out(raw, rows.x_hat, w_hat.t());  // recomputed, never stored across tiles
      const acc_t* rawp = raw.data_ptr<acc_t>();
      acc_t* dcp = dc.data_ptr<acc_t>();
      // z - lse, exponentiated below into softmax probabilities
      for (int64_t i = 0; i < batch; ++i) {
        const acc_t* ri = rawp + i * n;
        acc_t* di = dcp + i * n;
        if (!rows.valid[i]) {
          std::fill(di, di + n, -acc_t(kInf));
          continue;
        }
        const acc_t tau = rows.target[i].tau, shift = lp[i];
        for (int64_t j = 0; j < n; ++j) di[j] = s * negative_logit(clamp_unit(ri[j]), tau, t, p).value - shift;
        const int64_t target = y[i] - j0;
        if (target >= 0 && target < n) di[target] = s * rows.target[i].phi - shift;
      }
      at::exp_(dc);
      // dL/d raw = g_i (softmax - onehot) s dz/dc, times the clamp's 0/1 derivative
      for (int64_t i = 0; i < batch; ++i) {
        if (!rows.valid[i]) continue;  // exp(-inf) = 0 already
        const acc_t* ri = rawp + i * n;
        acc_t* di = dcp + i * n;
        const acc_t gs = gp[i] * s, tau = rows.target[i].tau;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t dn = negative_logit(clamp_unit(ri[j]), tau, t, p).derivative;
          di[j] = inside_unit(ri[j]) ? gs * di[j] * dn : acc_t(0);
        }
        const int64_t target = y[i] - j0;
        if (target >= 0 && target < n) {
          const acc_t prob = std::exp(s * rows.target[i].phi - lp[i]);
          di[target] = rows.target_inside[i] ? gs * (prob - 1) * rows.target[i].dphi : acc_t(0);
        }
      }
      if (need_dx) thread_slot(dx_hat_slots, batch, d).addmm_(dc, w_hat);
      if (need_dw) {
        at::Tensor dw_hat = thread_slot(dw_hat_slots, n, d);
        at::mm_out(dw_hat, dc.t(), rows.x_hat);
        // normalisation backward of w_j: (dw_hat - w_hat (w_hat . dw_hat)) / max(||w_j||, eps)
        const acc_t* whp = w_hat.data_ptr<acc_t>();
        const acc_t* dhp = dw_hat.data_ptr<acc_t>();
        scalar_t* out = dw.data_ptr<scalar_t>() + j0 * d;
        for (int64_t j = 0; j < n; ++j) {
          acc_t dot = 0;
          for (int64_t k = 0; k < d; ++k) dot += whp[j * d + k] * dhp[j * d + k];
          for (int64_t k = 0; k < d; ++k)
            out[j * d + k] = static_cast<scalar_t>((dhp[j * d + k] - whp[j * d + k] * dot) * inv[j]);
        }
      }
    }
  });

  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    const at::Tensor dx_hat = dx_hat_slots.sum(0);
    const at::Tensor radial = (rows.x_hat * dx_hat).sum(1, /*keepdim=*/true);
    dx = ((dx_hat - rows.x_hat * radial) * rows.inv_x.unsqueeze(1)).to(x.scalar_type());
  }
  return {dx, dw};
}

at::Tensor given_target_cos(const c10::optional<at::Tensor>& target_cos) {
  return target_cos.has_value() && target_cos->defined() ? target_cos->contiguous() : at::Tensor();
}

double read_t(const c10::optional<at::Tensor>& t, const HeadMath& p) {
  // a CPU scalar read, not a device sync; t is only read for CurricularFace (checked in check_head_args)
  if (p.negatives != Negatives::kCurricular) return 0.0;
  return static_cast<double>(*t->contiguous().data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor> margin_ce_cpu(const at::Tensor& embeddings, const at::Tensor& weight,
                                                 const at::Tensor& labels, const c10::optional<at::Tensor>& t,
                                                 double s, double m1, double m2, double m3, int64_t fallback,
                                                 int64_t negatives, double mv_t, int64_t ignore_index,
                                                 bool exact_margin_grad, int64_t class_tile,
                                                 const c10::optional<at::Tensor>& target_cos) {
  check_head_args(embeddings, weight, labels, t, fallback, negatives, s, class_tile, target_cos);
  at::NoGradGuard no_grad;
  const HeadMath p = make_head_math(s, m1, m2, m3, fallback, negatives, mv_t, exact_margin_grad);
  const auto x = embeddings.contiguous(), w = weight.contiguous(), y = labels.contiguous();
  const int64_t tile = resolve_class_tile(class_tile, x.size(0), w.size(0));
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_ce_cpu", [&] {
    out = forward_impl<scalar_t>(x, w, y, read_t(t, p), p, ignore_index, tile, given_target_cos(target_cos));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> margin_ce_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
    const c10::optional<at::Tensor>& t, const at::Tensor& lse, double s, double m1, double m2, double m3,
    int64_t fallback, int64_t negatives, double mv_t, int64_t ignore_index, bool exact_margin_grad,
    bool need_embeddings_grad, bool need_weight_grad, int64_t class_tile, const c10::optional<at::Tensor>& target_cos) {
  check_head_args(embeddings, weight, labels, t, fallback, negatives, s, class_tile, target_cos);
  const int64_t batch = embeddings.size(0);
  TORCH_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == batch && lse.dim() == 1 && lse.size(0) == batch,
                    "grad_rows and lse must have shape (", batch, ",); got ", grad_rows.sizes(), " and ", lse.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_rows.scalar_type()) && at::isFloatingType(lse.scalar_type()),
                   "grad_rows and lse must be floating-point tensors");
  at::NoGradGuard no_grad;
  const HeadMath p = make_head_math(s, m1, m2, m3, fallback, negatives, mv_t, exact_margin_grad);
  const auto x = embeddings.contiguous(), w = weight.contiguous(), y = labels.contiguous();
  const int64_t tile = resolve_class_tile(class_tile, x.size(0), w.size(0));
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "margin_ce_backward_cpu", [&] {
    out = backward_impl<scalar_t>(grad_rows, x, w, y, read_t(t, p), lse, p, ignore_index, tile, need_embeddings_grad,
                                  need_weight_grad, given_target_cos(target_cos));
  });
  return out;
}

void curricular_update_t_cpu(at::Tensor& t, const at::Tensor& embeddings, const at::Tensor& weight,
                             const at::Tensor& labels, int64_t ignore_index, double momentum) {
  check_head_args(embeddings, weight, labels, t, 0, static_cast<int64_t>(Negatives::kCurricular), 1.0, 0);
  TORCH_CHECK_VALUE(std::isfinite(momentum) && momentum >= 0 && momentum <= 1, "momentum must lie in [0, 1]; got ",
                    momentum);
  TORCH_CHECK_VALUE(t.is_contiguous(), "t must be contiguous");
  at::NoGradGuard no_grad;
  const HeadMath p = make_head_math(1.0, 1.0, 0.0, 0.0, 0, 0, 0.0, true);
  const auto x = embeddings.contiguous(), w = weight.contiguous(), y = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "curricular_update_t_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Rows<acc_t> rows = prepare_rows<scalar_t, acc_t>(x, w, y, ignore_index, p);
    double sum = 0;  // like the reference: float64 sum of the target cosines of valid rows
    for (int64_t i = 0; i < x.size(0); ++i)
      if (rows.valid[i]) sum += static_cast<double>(rows.target_cos[i]);
    float* tp = t.data_ptr<float>();
    *tp = static_cast<float>(curricular_t_update(static_cast<double>(*tp), sum, rows.valid_rows, momentum));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(facekernels, m) {
  // Per-row loss (0 on ignored rows; float32, float64 for float64 inputs) and per-row log-sum-exp (saved for
  // the backward). fallback / negatives are facekernels.Fallback / Negatives; class_tile 0: default.
  // exact_margin_grad (margin_grad="exact", else straight-through) only matters to the backward: it is an
  // argument here so that the autograd formula registered from Python sees it.
  // target_cos (class-sharded heads, facekernels/sharded.py): the global target cosine of every row; labels
  // outside [0, C_local) then mark rows whose target lives on another shard (see prepare_rows), and lse is
  // this shard's partial log-sum-exp (the backward takes the combined, global one).
  m.def(
      "margin_ce(Tensor embeddings, Tensor weight, Tensor labels, Tensor? t, float s, float m1, float m2, "
      "float m3, int fallback, int negatives, float mv_t, int ignore_index, bool exact_margin_grad, "
      "int class_tile=0, Tensor? target_cos=None) -> (Tensor, Tensor)");
  // (d embeddings, d weight) of sum_i grad_rows_i * loss_i; a gradient not asked for is an empty tensor.
  m.def(
      "margin_ce_backward(Tensor grad_rows, Tensor embeddings, Tensor weight, Tensor labels, Tensor? t, "
      "Tensor lse, float s, float m1, float m2, float m3, int fallback, int negatives, float mv_t, "
      "int ignore_index, bool exact_margin_grad, bool need_embeddings_grad, bool need_weight_grad, "
      "int class_tile=0, Tensor? target_cos=None) -> (Tensor, Tensor)");
  // CurricularFace: t <- momentum * mean(valid target cosines) + (1 - momentum) * t, in place.
  m.def(
      "curricular_update_t_(Tensor(a!) t, Tensor embeddings, Tensor weight, Tensor labels, int ignore_index, "
      "float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(facekernels, CPU, m) {
  m.impl("margin_ce", &margin_ce_cpu);
  m.impl("margin_ce_backward", &margin_ce_backward_cpu);
  m.impl("curricular_update_t_", &curricular_update_t_cpu);
}

}  // namespace facekernels
