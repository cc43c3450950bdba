// The vector type every kernel computes in: GCC vector extensions, as wide as the machine's registers
// (-march=native), so one source serves AVX-512 and AVX2 machines.
#pragma once

#include <cstdint>

namespace baton {

#ifdef __AVX512F__
constexpr int VBYTES = 64;   // a zmm register
#else
constexpr int VBYTES = 32;   // a ymm register (AVX2), or two xmm
#endif

template <typename T> struct VecOf { typedef T type __attribute__((vector_size(VBYTES))); };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> constexpr int lanes() { return VBYTES / sizeof(T); }

template <typename T> static inline Vec<T> load(const T* p) { Vec<T> v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
template <typename T> static inline void store(T* p, Vec<T> v) { __builtin_memcpy(p, &v, sizeof(v)); }

// The sum of a vector's lanes by halving (a fixed tree: the same order on every call).
template <typename T, int B>
static inline T hsum_bytes(const void* v) {
  typedef T H __attribute__((vector_size(B / 2)));
  H lo, hi;
  __builtin_memcpy(&lo, v, B / 2);
  __builtin_memcpy(&hi, (const char*)v + B / 2, B / 2);
  if constexpr (B / 2 == 2 * sizeof(T)) {
    return lo[0] + hi[0] + (lo[1] + hi[1]);
  } else {
    H s = lo + hi;
    return hsum_bytes<T, B / 2>(&s);
  }
}
template <typename T> static inline T hsum(Vec<T> v) { return hsum_bytes<T, VBYTES>(&v); }

}  // namespace baton
