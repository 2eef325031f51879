// The ops' argument checks (torch-facing: never include this from a .cu kernel file). FK_CHECK_VALUE / FK_CHECK_TYPE
// are TORCH_CHECK_VALUE / TORCH_CHECK_TYPE with the message built here, without an ostream: TORCH_CHECK streams its
// arguments through std::ostringstream (c10::str), and in the CUDA build on the H200 machine (torch 2.11, g++ 13)
// the extension carried its own copy of std::ostream::_M_insert<long>, so every message with a number in it
// segfaulted (cuda-gdb's backtrace: bench/results/h200-2026-12-04b/followup-seg.txt; why that copy was linked
// in is not established). One std::string argument takes c10::str's path without a stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace facekernels {
namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, double v) {  // %g: what an ostream's default precision prints
  char text[32];
  std::snprintf(text, sizeof text, "%g", v);
  s += text;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, at::IntArrayRef v) {  // [4, 6], as c10 prints sizes
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ']';
}
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const at::Device& v) { s += v.str(); }

}  // namespace detail

template <typename... Args>
std::string check_message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace facekernels

#define FK_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::facekernels::check_message(__VA_ARGS__))
#define FK_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::facekernels::check_message(__VA_ARGS__))
