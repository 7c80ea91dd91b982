// Shared by the non-kernel C++ files: the shape legend and argument checks that throw.
// Not included by kernels/*.cpp: those are compiled with -m flags, and an inline function
// shared with baseline code could be linked in its AVX-512 form (see simd.h).
//
// Shape legend (used in every comment): B batch, T time, C channels, V vocabulary,
// NH query heads, NKV key/value heads, HS head size, N rows (B*T or any flattening).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pyllm {

// Argument checks at the C++ boundary; pybind11 turns std::invalid_argument into ValueError.
inline void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace pyllm
