// y = x @ W^T for a CPU decode step: W packed once into panels, each panel streamed from memory once
// per step, and every output summed over k = 0..K-1 in the same order whatever the number of rows:
// a row's result does not depend on its batch-mates, bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "vec.h"

namespace baton {

constexpr int NV = 2;        // vectors per panel row
constexpr int KC = 256;      // k rows of a panel kept in L1 while every row block passes over them
constexpr int PREFETCH = 32; // k rows ahead: the panel is streamed from memory, not yet cached

template <typename T> constexpr int panel() { return NV * lanes<T>(); }                  // NR: columns a panel
template <typename T> constexpr int row_block() { return VBYTES == 64 ? 12 : 6; }       // MR: NV*MR accumulators

// W (N, K) -> panels (ceil(N / NR), K, NR): panel p holds W[p*NR : (p+1)*NR, :] transposed, zero-padded.
at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "pack: a 2-D CPU weight");
  int64_t NR = 0;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack", [&] { NR = panel<scalar_t>(); });
  int64_t N = w.size(0), K = w.size(1), P = (N + NR - 1) / NR;
  auto padded = at::zeros({P * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({P, NR, K}).transpose(1, 2).contiguous();
}

// MR rows of x against one panel, over k in [k0, k1): accumulators start from `out` after the first
// k block, so each output's sum runs over k in order, exactly as if there were no blocks.
template <typename T, int MR>
static inline void tile(const T* __restrict x, int64_t K, int64_t k0, int64_t k1,
                        const T* __restrict p, T* __restrict out, int64_t ldo) {
  typedef Vec<T> V;
  constexpr int L = lanes<T>(), NR = panel<T>();
  V acc[MR][NV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) {
      if (k0 == 0) acc[r][v] = V{};
      else __builtin_memcpy(&acc[r][v], out + r * ldo + v * L, sizeof(V));
    }
  for (int64_t k = k0; k < k1; k++) {
    V w[NV];
    for (int v = 0; v < NV; v++) __builtin_memcpy(&w[v], p + k * NR + v * L, sizeof(V));
    for (int c = 0; c < NR * (int)sizeof(T); c += 64) __builtin_prefetch((const char*)(p + (k + PREFETCH) * NR) + c, 0, 3);
    for (int r = 0; r < MR; r++) {
      T s = x[r * K + k];
      for (int v = 0; v < NV; v++) acc[r][v] += s * w[v];
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) __builtin_memcpy(out + r * ldo + v * L, &acc[r][v], sizeof(V));
}

template <typename T, int R>
static void tile_rows(int rows, const T* x, int64_t K, int64_t k0, int64_t k1, const T* p, T* out, int64_t ldo) {
  if constexpr (R > 0) {
    if (rows == R) return tile<T, R>(x, K, k0, k1, p, out, ldo);
    tile_rows<T, R - 1>(rows, x, K, k0, k1, p, out, ldo);
  }
}

template <typename T>
static void gemm(const T* x, int64_t M, int64_t K, const T* packed, int64_t P, T* out, int64_t N) {
  constexpr int NR = panel<T>(), MR = row_block<T>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> edge;   // the last panel's padded columns land here, not past the output's rows
    for (int64_t p = p0; p < p1; p++) {
      const T* pp = packed + p * K * NR;
      bool full = (p + 1) * NR <= N;
      if (!full) edge.assign(M * NR, T(0));
      T* dst = full ? out + p * NR : edge.data();
      int64_t ld = full ? N : NR;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t k1 = std::min<int64_t>(K, k0 + KC);
        for (int64_t m = 0; m < M; m += MR)
          tile_rows<T, MR>(int(std::min<int64_t>(MR, M - m)), x + m * K, K, k0, k1, pp, dst + m * ld, ld);
      }
      if (!full)
        for (int64_t r = 0; r < M; r++) std::copy_n(edge.data() + r * NR, N - p * NR, out + r * N + p * NR);
    }
  });
}

// x (..., K) @ W^T with W packed by `pack` from an (N, K) weight -> (..., N).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == packed.scalar_type(), "linear: CPU tensors of one dtype");
  int64_t K = x.size(-1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K, "linear: packed weight (P, K, NR) with K = ", K);
  auto x2 = x.reshape({-1, K}).contiguous();
  int64_t M = x2.size(0);
  auto out = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear", [&] {
    TORCH_CHECK(packed.size(2) == panel<scalar_t>() && packed.size(0) * panel<scalar_t>() >= N, "linear: packing");
    gemm<scalar_t>(x2.data_ptr<scalar_t>(), M, K, packed.data_ptr<scalar_t>(), packed.size(0), out.data_ptr<scalar_t>(), N);
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

}  // namespace baton

