// The product micro-kernel every kernel multiplies with: MR rows of x against a panel of NR = NV vectors of
// columns, the MR * NV sums kept in registers while k runs, each output summed over k in order (so a row's
// numbers never depend on the rows beside it). linear.cpp feeds it weight panels; attention.cpp a prompt's
// queries and values.
#pragma once

#include <cstdint>

#include "vec.h"

namespace baton {

constexpr int NV = 2;        // vectors per panel row
constexpr int PREFETCH = 32; // k rows ahead: the panel is streamed from memory, not yet cached

template <typename T> constexpr int panel() { return NV * lanes<T>(); }                  // NR: columns a panel
template <typename T> constexpr int row_block() { return VBYTES == 64 ? 12 : 6; }       // MR: NV*MR accumulators

// Where a tile's panel rows come from: floats in memory (a packed panel, or any rows with NR contiguous
// columns), prefetched PREFETCH rows ahead.
template <typename T>
struct Floats {
  const T* p;                 // (kn, NR) panel rows, `ld` apart (a packed panel's: NR)
  int64_t ld = panel<T>();
  __attribute__((always_inline)) inline void operator()(int64_t k, Vec<T>* w) const {
    constexpr int L = lanes<T>(), NR = panel<T>();
    for (int v = 0; v < NV; v++) __builtin_memcpy(&w[v], p + k * ld + v * L, sizeof(Vec<T>));
    prefetch(p + (k + PREFETCH) * ld, NR * sizeof(T));
  }
};

// MR rows of x (row stride K, from column k0) against kn panel rows from `src`: the accumulators start
// from `out` after the first k block, so each output's sum runs over k in order, exactly as if there
// were no blocks.
template <typename T, int MR, typename Src>
static inline void tile(const T* __restrict x, int64_t K, int64_t kn, bool first, Src src, T* __restrict out,
                        int64_t ldo) {
  typedef Vec<T> V;
  constexpr int L = lanes<T>();
  V acc[MR][NV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) {
      if (first) acc[r][v] = V{};
      else __builtin_memcpy(&acc[r][v], out + r * ldo + v * L, sizeof(V));
    }
  for (int64_t k = 0; k < kn; k++) {
    V w[NV];
    src(k, w);
    for (int r = 0; r < MR; r++) {
      T s = x[r * K + k];
      for (int v = 0; v < NV; v++) acc[r][v] += s * w[v];
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) __builtin_memcpy(out + r * ldo + v * L, &acc[r][v], sizeof(V));
}

template <typename T, int R, typename Src>
static void tile_rows(int rows, const T* x, int64_t K, int64_t kn, bool first, const Src& src, T* out, int64_t ldo) {
  if constexpr (R > 0) {
    if (rows == R) return tile<T, R>(x, K, kn, first, src, out, ldo);
    tile_rows<T, R - 1>(rows, x, K, kn, first, src, out, ldo);
  }
}

}  // namespace baton
