// The Python module facekernels._C and the schemas of the facekernels:: operator namespace.
// Each op's kernels register their implementations (TORCH_LIBRARY_IMPL) in their own files; later ops
// may add schemas with TORCH_LIBRARY_FRAGMENT next to their CPU implementation.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(facekernels, m) {
  m.def("target_cosine(Tensor embeddings, Tensor weight, Tensor labels, int class_start) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef FACEKERNELS_WITH_CUDA
  module.attr("cuda_built") = true;
#else
  module.attr("cuda_built") = false;
#endif
}
