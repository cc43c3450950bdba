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

int float_panel() { return panel<float>(); }

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

// MR rows of x (row stride K, from column k0) against kn rows of a panel (from its row k0): the
// accumulators start from `out` after the first k block, so each output's sum runs over k in order,
// exactly as if there were no blocks.
template <typename T, int MR>
static inline void tile(const T* __restrict x, int64_t K, int64_t kn, bool first,
                        const T* __restrict p, T* __restrict out, int64_t ldo) {
  typedef Vec<T> V;
  constexpr int L = lanes<T>(), NR = panel<T>();
  V acc[MR][NV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) {
      if (first) acc[r][v] = V{};
      else __builtin_memcpy(&acc[r][v], out + r * ldo + v * L, sizeof(V));
    }
  for (int64_t k = 0; k < kn; k++) {
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
static void tile_rows(int rows, const T* x, int64_t K, int64_t kn, bool first, const T* p, T* out, int64_t ldo) {
  if constexpr (R > 0) {
    if (rows == R) return tile<T, R>(x, K, kn, first, p, out, ldo);
    tile_rows<T, R - 1>(rows, x, K, kn, first, p, out, ldo);
  }
}

// out (M, N) = x (M, K) @ W^T, W's panels given by rows: rows(p, k0, k1, scratch) -> rows k0..k1 of
// panel p in the (K, NR) layout, either the packed weight itself or `scratch` filled from another form.
template <typename T, typename Rows>
static void gemm(const T* x, int64_t M, int64_t K, int64_t P, T* out, int64_t N, Rows rows) {
  constexpr int NR = panel<T>(), MR = row_block<T>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> edge;   // the last panel's padded columns land here, not past the output's rows
    std::vector<T> scratch(KC * NR);
    for (int64_t p = p0; p < p1; p++) {
      bool full = (p + 1) * NR <= N;
      if (!full) edge.assign(M * NR, T(0));
      T* dst = full ? out + p * NR : edge.data();
      int64_t ld = full ? N : NR;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t k1 = std::min<int64_t>(K, k0 + KC);
        const T* block = rows(p, k0, k1, scratch.data());
        for (int64_t m = 0; m < M; m += MR)
          tile_rows<T, MR>(int(std::min<int64_t>(MR, M - m)), x + m * K + k0, K, k1 - k0, k0 == 0, block,
                           dst + m * ld, ld);
      }
      if (!full)
        for (int64_t r = 0; r < M; r++) std::copy_n(edge.data() + r * NR, N - p * NR, out + r * N + p * NR);
    }
  });
}

static at::Tensor rows_of(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.size(-1) == K, "linear: x (..., ", K, ") on the CPU");
  return x.reshape({-1, K}).contiguous();
}

static at::Tensor shaped_as(const at::Tensor& out, const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// x (..., K) @ W^T with W packed by `pack` from an (N, K) weight -> (..., N).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.scalar_type() == packed.scalar_type() && packed.dim() == 3, "linear: packed (P, K, NR) of x's dtype");
  int64_t K = packed.size(1);
  auto x2 = rows_of(x, K);
  auto out = at::empty({x2.size(0), N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear", [&] {
    constexpr int NR = panel<scalar_t>();
    TORCH_CHECK(packed.size(2) == NR && packed.size(0) * NR >= N, "linear: packing");
    const scalar_t* w = packed.data_ptr<scalar_t>();
    gemm<scalar_t>(x2.data_ptr<scalar_t>(), x2.size(0), K, packed.size(0), out.data_ptr<scalar_t>(), N,
                   [&](int64_t p, int64_t k0, int64_t, scalar_t*) { return w + (p * K + k0) * NR; });
  });
  return shaped_as(out, x, N);
}

// GGUF's quantized weights, kept quantized in memory and widened to float32 a panel block at a time, to
// exactly the values GGUF's dequantisation gives (d * q + m: d * q is exact in float32, so one rounding):
//   q  (P, K, NR/2) uint8: column c's 4-bit q in the low nibble, column c + NR/2's in the high (Q4_1), or
//      (P, K, NR) int8 (Q8_0);
//   d, m (P, K/32, NR) float32: each 32-weight block's scale and minimum (m empty for Q8_0: d * q).
// The float32 block then meets x exactly as a packed float32 weight would: the same bits out.
at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m,
                            int64_t N) {
  constexpr int NR = panel<float>(), QB = 32;
  bool q4 = m.numel() > 0;
  int64_t P = q.size(0), K = q.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && K % QB == 0 && KC % QB == 0, "linear_quantized: float32 x, K of whole blocks");
  TORCH_CHECK(q.size(2) == (q4 ? NR / 2 : NR) && d.sizes() == at::IntArrayRef({P, K / QB, NR}) && P * NR >= N &&
              (!q4 || m.sizes() == d.sizes()), "linear_quantized: packing");
  auto x2 = rows_of(x, K);
  auto out = at::empty({x2.size(0), N}, x.options());
  const uint8_t* qp = (const uint8_t*)q.data_ptr();
  const float *dp = d.data_ptr<float>(), *mp = q4 ? m.data_ptr<float>() : nullptr;
  gemm<float>(x2.data_ptr<float>(), x2.size(0), K, P, out.data_ptr<float>(), N,
              [&](int64_t p, int64_t k0, int64_t k1, float* buf) {
    constexpr int L = lanes<float>();   // NR = 2 L: a panel row is two vectors
    typedef uint8_t U8 __attribute__((vector_size(L)));
    typedef uint16_t U16 __attribute__((vector_size(L)));
    typedef int32_t I32 __attribute__((vector_size(VBYTES)));
    for (int64_t b0 = k0; b0 < k1; b0 += QB) {   // one block of 32 k: one d (and m) per column
      const float* db = dp + (p * (K / QB) + b0 / QB) * NR;
      Vec<float> d0 = load(db), d1 = load(db + L);
      if (q4) {
        const float* mb = mp + (p * (K / QB) + b0 / QB) * NR;
        Vec<float> m0 = load(mb), m1 = load(mb + L);
        const uint8_t* qk = qp + (p * K + b0) * L;
        __builtin_prefetch(qk + 8 * QB * L, 0, 3);
        for (int k = 0; k < QB; k++) {
          U8 bytes;
          __builtin_memcpy(&bytes, qk + k * L, L);
          U8 high = (U8)((U16)bytes >> 4) & 15;   // shifted as 16-bit lanes: x86 has no byte shift (GCC scalarises one)
          Vec<float> lo = __builtin_convertvector(__builtin_convertvector(bytes & 15, I32), Vec<float>);
          Vec<float> hi = __builtin_convertvector(__builtin_convertvector(high, I32), Vec<float>);
          store(buf + (b0 - k0 + k) * NR, lo * d0 + m0);
          store(buf + (b0 - k0 + k) * NR + L, hi * d1 + m1);
        }
      } else {
        const int8_t* qk = (const int8_t*)qp + (p * K + b0) * NR;
        __builtin_prefetch(qk + 4 * QB * NR, 0, 3);
        for (int k = 0; k < QB; k++) {   // int8 through uint8 (x ^ 0x80 = x + 128): what GCC widens in one instruction
          U8 a, b;
          __builtin_memcpy(&a, qk + k * NR, L);
          __builtin_memcpy(&b, qk + k * NR + L, L);
          Vec<float> lo = __builtin_convertvector(__builtin_convertvector(a ^ 0x80, I32) - 128, Vec<float>);
          Vec<float> hi = __builtin_convertvector(__builtin_convertvector(b ^ 0x80, I32) - 128, Vec<float>);
          store(buf + (b0 - k0 + k) * NR, lo * d0);
          store(buf + (b0 - k0 + k) * NR + L, hi * d1);
        }
      }
    }
    return (const float*)buf;
  });
  return shaped_as(out, x, N);
}

}  // namespace baton
