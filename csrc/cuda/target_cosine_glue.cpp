// CUDA registration of facekernels::target_cosine: torch tensors in, raw pointers to the kernel file.
// Built only against a CUDA torch.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "facekernels/cuda_dtype.h"
#include "facekernels/cuda_launchers.h"
#include "facekernels/target_cosine_checks.h"

namespace facekernels {
namespace {

at::Tensor target_cosine_cuda(const at::Tensor& embeddings, const at::Tensor& weight, const at::Tensor& labels,
                              int64_t class_start) {
  check_target_cosine_args(embeddings, weight, labels);
  const c10::cuda::CUDAGuard guard(embeddings.device());
  // rows may be strided; features must be contiguous
  const auto x = embeddings.stride(1) == 1 ? embeddings : embeddings.contiguous();
  const auto w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const auto y = labels.contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(target_cosine_out_dtype(x.scalar_type())));
  C10_CUDA_CHECK(launch_target_cosine(to_kernel_dtype(x.scalar_type()), x.data_ptr(), x.stride(0), w.data_ptr(),
                                      w.stride(0), y.data_ptr<int64_t>(), out.data_ptr(), x.size(0), w.size(0),
                                      x.size(1), class_start, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(facekernels, CUDA, m) { m.impl("target_cosine", &target_cosine_cuda); }

}  // namespace facekernels
