// CPU implementation of facekernels::target_cosine (schema in csrc/module.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "facekernels/common.h"
#include "facekernels/target_cosine_checks.h"

namespace facekernels {
namespace {

at::Tensor target_cosine_cpu(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
                             int64_t class_start) {
  check_target_cosine_args(embeddings, weight, labels);
  const auto x = embeddings.contiguous();
  const auto w = weight.contiguous();
  const auto y = labels.contiguous();
  const int64_t rows = x.size(0), num_classes = w.size(0), features = x.size(1);
  auto out = at::empty({rows}, x.options().dtype(target_cosine_out_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "target_cosine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* yp = y.data_ptr<int64_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t j = yp[i] - class_start;
        if (j < 0 || j >= num_classes) {
          op[i] = acc_t(0);
          continue;
        }
        const scalar_t* xi = xp + i * features;
        const scalar_t* wj = wp + j * features;
        acc_t xw = 0, xx = 0, ww = 0;
        for (int64_t k = 0; k < features; ++k) {
          const acc_t a = static_cast<acc_t>(xi[k]), b = static_cast<acc_t>(wj[k]);
          xw += a * b;
          xx += a * a;
          ww += b * b;
        }
        op[i] = cosine_from_dots(xw, xx, ww);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CPU, m) { m.impl("target_cosine", &target_cosine_cpu); }

}  // namespace facekernels
