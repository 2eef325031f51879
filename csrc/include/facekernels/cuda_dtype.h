// torch dtype -> the kernels' DType (torch-facing: for the *_glue.cpp files only).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "facekernels/check_message.h"
#include "facekernels/cuda_launchers.h"

namespace facekernels {

inline DType to_kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat:
      return DType::kFloat32;
    case c10::kHalf:
      return DType::kFloat16;
    case c10::kBFloat16:
      return DType::kBFloat16;
    case c10::kDouble:
      return DType::kFloat64;
    default:
      FK_CHECK_TYPE(false, "expected float32, float16, bfloat16 or float64 tensors; got ", t);
  }
}

}  // namespace facekernels
