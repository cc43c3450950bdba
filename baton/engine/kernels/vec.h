// The vector type every kernel computes in: GCC vector extensions, as wide as the machine's registers
// (-march=native), so one source serves AVX-512 and AVX2 machines.
#pragma once

#include <cmath>
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

// Every cache line of [p, p + bytes) fetched ahead of use; LOCALITY as __builtin_prefetch's (3: into L1,
// 2: into L2). Always inlined: a call in a kernel's inner loop costs more than the prefetch gains.
template <int LOCALITY = 3>
__attribute__((always_inline)) static inline void prefetch(const void* p, int bytes) {
  for (int c = 0; c < bytes; c += 64) __builtin_prefetch((const char*)p + c, 0, LOCALITY);
}

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

// exp, lane by lane: float by Cephes' expf polynomial (range-reduced by ln 2; ~1 ulp), double by libm.
static inline Vec<float> vexp(Vec<float> x) {
  typedef Vec<int32_t> VI;
  x = x < -87.3f ? Vec<float>{} - 87.3f : x;   // exp(-87.3) is near FLT_MIN, exp(88.7) near FLT_MAX
  x = x > 88.7f ? Vec<float>{} + 88.7f : x;
  Vec<float> fx = x * 1.44269504088896341f + 0.5f;
  VI n = __builtin_convertvector(fx, VI);
  n += (VI)(__builtin_convertvector(n, Vec<float>) > fx);      // truncation -> floor (true is -1)
  Vec<float> fn = __builtin_convertvector(n, Vec<float>);
  Vec<float> r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  Vec<float> y = r * 1.9875691500E-4f + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * r * r + r + 1.0f;
  return y * (Vec<float>)((n + 127) << 23);
}
static inline Vec<double> vexp(Vec<double> x) {
  double a[lanes<double>()];
  store(a, x);
  for (double& e : a) e = std::exp(e);
  return load(a);
}

}  // namespace baton
