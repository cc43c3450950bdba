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

#include "kernels.h"
#include "share.h"
#include "tile.h"
#include "vec.h"

namespace baton {

constexpr int KC = 256;      // k rows of a panel kept in L1 while every row block passes over them
constexpr int MC = 256;      // rows of x a pass over the weights serves: their k block (MC * KC floats,
                             // 256 KB) stays in L2 (a 512-row pass ran 10-15 % slower on a Zen 2)

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

// Runs each(p, dst, ld, scratch) for every panel p, handed out to torch's threads (share.h): dst (M, NR) with row
// stride ld is the panel's columns of out (M, N), or for the last panel an edge buffer whose real
// columns are copied out after (the padded ones land nowhere); scratch: KC * NR of the thread's own.
template <typename T, typename Each>
static void for_panels(int64_t M, int64_t P, T* out, int64_t N, Each each) {
  constexpr int NR = panel<T>();
  share_items(P, [&](auto next) {
    std::vector<T> edge;
    std::vector<T> scratch(KC * NR);
    for (int64_t p; (p = next()) < P;) {
      bool full = (p + 1) * NR <= N;
      if (!full) edge.assign(M * NR, T(0));
      each(p, full ? out + p * NR : edge.data(), full ? N : NR, scratch.data());
      if (!full)
        for (int64_t r = 0; r < M; r++) std::copy_n(edge.data() + r * NR, N - p * NR, out + r * N + p * NR);
    }
  });
}

// out (M, N) = x (M, K) @ W^T, W's panels given by rows: rows(p, k0, k1, scratch) -> rows k0..k1 of
// panel p in the (K, NR) layout, either the packed weight itself or `scratch` filled from another form.
// Rows are served MC at a time, one pass over the weights each (a prompt's rows too); no row's sum
// depends on which pass or block it falls in.
template <typename T, typename Rows>
static void gemm(const T* x, int64_t M, int64_t K, int64_t P, T* out, int64_t N, Rows rows) {
  constexpr int MR = row_block<T>();
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    int64_t mc = std::min<int64_t>(MC, M - m0);
    const T* xs = x + m0 * K;
    for_panels<T>(mc, P, out + m0 * N, N, [&](int64_t p, T* dst, int64_t ld, T* scratch) {
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t k1 = std::min<int64_t>(K, k0 + KC);
        Floats<T> block{rows(p, k0, k1, scratch)};
        for (int64_t m = 0; m < mc; m += MR)
          tile_rows<T, MR>(int(std::min<int64_t>(MR, mc - m)), xs + m * K + k0, K, k1 - k0, k0 == 0, block,
                           dst + m * ld, ld);
      }
    });
  }
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

// The rows of a GGUF panel (from some k0 on, a multiple of 32), widened to float32 on the way: d * q + m
// (Q4_1: column c's 4-bit q in the low nibble of byte c, column c + L's in the high) or d * q (Q8_0),
// each 32-k block with its own d (and m). d * q is exact in float32 (d is a float16 value), so each
// widened weight is GGUF's dequantisation, one rounding. Read in order of k (it keeps its block's d, m).
constexpr int QB = 32;
constexpr int AHEAD_BLOCKS = 4;   // blocks of a panel prefetched ahead, every cache line of them

struct Q4Rows {
  static constexpr int L = lanes<float>();
  typedef uint8_t U8 __attribute__((vector_size(L)));
  typedef uint16_t U16 __attribute__((vector_size(L)));
  const uint8_t* q;          // (k, L) bytes
  const float *d, *m;        // (k / 32, 2L)
  Vec<float> d0, d1, m0, m1;
  __attribute__((always_inline)) inline void operator()(int64_t k, Vec<float>* w) {
    if (k % QB == 0) {
      d0 = load(d + k / QB * 2 * L), d1 = load(d + k / QB * 2 * L + L);
      m0 = load(m + k / QB * 2 * L), m1 = load(m + k / QB * 2 * L + L);
      prefetch<2>(q + (k + AHEAD_BLOCKS * QB) * L, QB * L);
      prefetch<2>(d + (k / QB + AHEAD_BLOCKS) * 2 * L, 2 * L * sizeof(float));
      prefetch<2>(m + (k / QB + AHEAD_BLOCKS) * 2 * L, 2 * L * sizeof(float));
    }
    U8 bytes;
    __builtin_memcpy(&bytes, q + k * L, L);
    U8 high = (U8)((U16)bytes >> 4) & 15;   // shifted as 16-bit lanes: x86 has no byte shift (GCC scalarises one)
    w[0] = __builtin_convertvector(__builtin_convertvector(bytes & 15, Vec<int32_t>), Vec<float>) * d0 + m0;
    w[1] = __builtin_convertvector(__builtin_convertvector(high, Vec<int32_t>), Vec<float>) * d1 + m1;
  }
};

struct Q8Rows {
  static constexpr int L = lanes<float>();
  typedef uint8_t U8 __attribute__((vector_size(L)));
  const int8_t* q;           // (k, 2L) int8
  const float* d;            // (k / 32, 2L)
  Vec<float> d0, d1;
  __attribute__((always_inline)) inline void operator()(int64_t k, Vec<float>* w) {
    if (k % QB == 0) {
      d0 = load(d + k / QB * 2 * L), d1 = load(d + k / QB * 2 * L + L);
      prefetch<2>(q + (k + AHEAD_BLOCKS * QB) * 2 * L, QB * 2 * L);
      prefetch<2>(d + (k / QB + AHEAD_BLOCKS) * 2 * L, 2 * L * sizeof(float));
    }
    U8 a, b;   // int8 through uint8 (x ^ 0x80 = x + 128): what GCC widens in one instruction
    __builtin_memcpy(&a, q + k * 2 * L, L);
    __builtin_memcpy(&b, q + k * 2 * L + L, L);
    w[0] = __builtin_convertvector(__builtin_convertvector(a ^ 0x80, Vec<int32_t>) - 128, Vec<float>) * d0;
    w[1] = __builtin_convertvector(__builtin_convertvector(b ^ 0x80, Vec<int32_t>) - 128, Vec<float>) * d1;
  }
};

// GGUF's quantized weights, kept quantized in memory and widened to float32 as a step meets them:
//   q  (P, K, NR/2) uint8, two 4-bit values a byte (Q4_1), or (P, K, NR) int8 (Q8_0);
//   d, m (P, K/32, NR) float32: each 32-weight block's scale and minimum (m empty for Q8_0).
// Up to one row block of x (a decode step of a few rows) multiplies the widened rows straight from
// registers; more rows widen a panel block of KC rows into scratch once, for every row block to read.
// Either way each weight is the same float32 and each output sums over k in order: the same bits as the
// float32 weights give, whatever the number of rows. SmolLM2's 30 layers (2 threads, an AVX-512 Xeon;
// docs/benchmarks.md): 1 row 4.0 ms from registers (the blocks' stream) against 7.2 through scratch, 8
// rows 7.0 against 11.2; an AVX2 build 5.2 against 11.9 at 1 row. (The sources must inline: a call per
// k row made the register path slower than scratch at some row counts.)
at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m,
                            int64_t N) {
  constexpr int NR = panel<float>(), L = lanes<float>(), MR = row_block<float>();
  static_assert(NV == 2, "a GGUF panel row is two vectors");
  bool q4 = m.numel() > 0;
  int64_t P = q.size(0), K = q.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && K % QB == 0 && KC % QB == 0, "linear_quantized: float32 x, K of whole blocks");
  TORCH_CHECK(q.size(2) == (q4 ? NR / 2 : NR) && d.sizes() == at::IntArrayRef({P, K / QB, NR}) && P * NR >= N &&
              (!q4 || m.sizes() == d.sizes()), "linear_quantized: packing");
  auto x2 = rows_of(x, K);
  int64_t M = x2.size(0);
  auto out = at::empty({M, N}, x.options());
  const uint8_t* qp = (const uint8_t*)q.data_ptr();
  const float *dp = d.data_ptr<float>(), *mp = q4 ? m.data_ptr<float>() : nullptr, *xp = x2.data_ptr<float>();
  auto with_rows = [&](int64_t p, int64_t k0, auto&& f) {   // f(panel p's rows from k0 on)
    int64_t s = (p * (K / QB) + k0 / QB) * NR;
    if (q4) f(Q4Rows{qp + (p * K + k0) * L, dp + s, mp + s});
    else f(Q8Rows{(const int8_t*)qp + (p * K + k0) * NR, dp + s});
  };
  if (M <= MR) {
    for_panels<float>(M, P, out.data_ptr<float>(), N, [&](int64_t p, float* dst, int64_t ld, float*) {
      with_rows(p, 0, [&](auto src) { tile_rows<float, MR>(int(M), xp, K, K, true, src, dst, ld); });
    });
  } else {
    gemm<float>(xp, M, K, P, out.data_ptr<float>(), N, [&](int64_t p, int64_t k0, int64_t k1, float* buf) {
      with_rows(p, k0, [&](auto src) {
        for (int64_t k = 0; k < k1 - k0; k++) {
          Vec<float> w[NV];
          src(k, w);
          store(buf + k * NR, w[0]);
          store(buf + k * NR + L, w[1]);
        }
      });
      return (const float*)buf;
    });
  }
  return shaped_as(out, x, N);
}

}  // namespace baton
