// The small per-token operations around a layer's matmuls, each one pass over a token's vector instead
// of torch's several kernels (RMSNorm alone is six): residual add + RMSNorm, SiLU(gate) * up, RoPE.
// Every token row is computed alone, in a fixed order, whatever the rows beside it.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels.h"
#include "vec.h"

namespace baton {

// sum of squares of x[0, n), in vector lanes then the fixed tree; the tail added after
template <typename T>
static inline T sum_squares(const T* x, int64_t n) {
  constexpr int L = lanes<T>();
  Vec<T> acc{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    Vec<T> v = load(x + i);
    acc += v * v;
  }
  T s = hsum<T>(acc);
  for (; i < n; i++) s += x[i] * x[i];
  return s;
}

// h (rows, H) += delta (when given), then out = weight * h / sqrt(mean(h^2) + eps): RMSNorm as HF's
// in h's dtype (the runner calls it for float32 only: HF computes RMSNorm in float32, so a float64 model
// keeps torch's). Returns out; h is updated in place.
at::Tensor add_rms_norm(at::Tensor& h, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                           double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && weight.numel() == h.size(1), "add_rms_norm: h (rows, H) contiguous");
  auto d = delta.has_value() ? delta->contiguous() : at::Tensor();
  TORCH_CHECK(!d.defined() || d.sizes() == h.sizes(), "add_rms_norm: delta shaped as h");
  auto w = weight.contiguous();
  auto out = at::empty_like(h);
  int64_t rows = h.size(0), H = h.size(1);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "add_rms_norm", [&] {
    scalar_t *hp = h.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
    const scalar_t* dp = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        scalar_t* x = hp + r * H;
        if (dp)
          for (int64_t i = 0; i < H; i++) x[i] += dp[r * H + i];
        scalar_t inv = scalar_t(1) / std::sqrt(sum_squares(x, H) / scalar_t(H) + scalar_t(eps));
        for (int64_t i = 0; i < H; i++) op[r * H + i] = wp[i] * (x[i] * inv);
      }
    });
  });
  return out;
}

// gate_up (rows, 2I): gate then up -> silu(gate) * up (rows, I)
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: (rows, 2I)");
  auto gu = gate_up.contiguous();
  int64_t rows = gu.size(0), I = gu.size(1) / 2;
  auto out = at::empty({rows, I}, gu.options());
  AT_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "silu_mul", [&] {
    using T = scalar_t;
    constexpr int L = lanes<T>();
    const T* gp = gu.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        const T *g = gp + r * 2 * I, *u = g + I;
        T* o = op + r * I;
        int64_t i = 0;
        for (; i + L <= I; i += L) {
          Vec<T> gv = load(g + i);
          store(o + i, gv / (T(1) + vexp(-gv)) * load(u + i));
        }
        for (; i < I; i++) o[i] = g[i] / (T(1) + std::exp(-g[i])) * u[i];
      }
    });
  });
  return out;
}

// x (rows, heads, D) rotated in place by RoPE with cos, signed sin (rows, D) (ModelRunner.rope: the sin's
// first half negated): x * cos + rotate(x) * sin, rotate swapping the halves.
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope_: x (rows, heads, D), D contiguous");
  int64_t rows = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  auto c = cos.reshape({rows, D}).contiguous(), s = sin.reshape({rows, D}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rope_", [&] {
    using T = scalar_t;
    T* xp = x.data_ptr<T>();
    const T *cp = c.data_ptr<T>(), *sp = s.data_ptr<T>();
    int64_t rs = x.stride(0), hs = x.stride(1);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++)
        for (int64_t h = 0; h < heads; h++) {
          T* v = xp + r * rs + h * hs;
          const T *cr = cp + r * D, *sr = sp + r * D;
          for (int64_t i = 0; i < half; i++) {
            T a = v[i], b = v[i + half];
            v[i] = a * cr[i] + b * sr[i];
            v[i + half] = b * cr[i + half] + a * sr[i + half];
          }
        }
    });
  });
}

}  // namespace baton
