// The Python module facekernels._C. The schemas of the facekernels:: ops and their shape functions live in
// facekernels/_library.py (one place, loaded before this module); each op's kernels register their
// implementations (TORCH_LIBRARY_IMPL) in their own files.
#include <torch/extension.h>
#include <torch/library.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef FACEKERNELS_WITH_CUDA
  module.attr("cuda_built") = true;
#else
  module.attr("cuda_built") = false;
#endif
}
