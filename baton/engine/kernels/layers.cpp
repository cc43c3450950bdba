// A CPU decode step's layers in one call: the same kernels the runner calls one by one from Python
// (products, RMSNorm, RoPE, attention, SiLU), in the same order on the same buffers, so the same bits,
// without ~25 Python-level tensor ops a layer around them (~8 ms of a 47 ms step of 8 rows on 2 Zen 2
// cores; baton/engine/cpu_layers.py says when it runs).
#include <ATen/ATen.h>

#include <vector>

#include "kernels.h"

namespace baton {

constexpr int PRODUCT = 5;            // a product's tensors: packed, q, d, m (GGUF panels), bias; empty if absent
constexpr int LAYER = 2 + 4 * PRODUCT; // in_norm, post_norm, then qkv, o, gate_up, down

// x @ W^T (+ bias) by the packed floats or the GGUF panels, whichever the product has (Linear.__call__'s
// kernel branch: the loop runs only where no product falls back to torch's)
static at::Tensor product(const at::Tensor* p, const at::Tensor& x, int64_t N) {
  const at::Tensor &packed = p[0], &q = p[1], &d = p[2], &m = p[3], &bias = p[4];
  at::Tensor y = q.numel() ? linear_quantized(x, q, d, m, N) : linear(x, packed, N);
  return bias.numel() ? y.add_(bias) : y;
}

// h (n, hidden) through every layer, in place. w: LAYER tensors a layer; Ns: each product's output width
// (4 a layer); buf: the batch cache (L, 2, rows, Hkv, cols, D), the step's window its columns [start,
// start + width), the step's own column the last; lens (n,): each row's columns; cos, sin (n, 1, D).
void decode_layers(at::Tensor& h, const std::vector<at::Tensor>& w, const std::vector<int64_t>& Ns,
                   const at::Tensor& buf, int64_t start, int64_t width, const at::Tensor& lens, const at::Tensor& cos,
                   const at::Tensor& sin, int64_t Hq, double eps, double scale) {
  int64_t L = buf.size(0), n = h.size(0), Hkv = buf.size(3), D = buf.size(5);
  TORCH_CHECK((int64_t)w.size() == L * LAYER && (int64_t)Ns.size() == L * 4 && h.is_contiguous() && n <= buf.size(2),
              "decode_layers: a layer's tensors, h (n, hidden) contiguous, n rows in the cache");
  for (int64_t li = 0; li < L; li++) {
    const at::Tensor* lw = w.data() + li * LAYER;
    const int64_t* N = Ns.data() + li * 4;
    at::Tensor qkv = product(lw + 2, add_rms_norm(h, c10::nullopt, lw[0], eps), N[0]);   // (n, (Hq + 2 Hkv) D)
    at::Tensor qk = qkv.narrow(1, 0, (Hq + Hkv) * D).view({n, Hq + Hkv, D});
    rope_(qk, cos, sin);
    at::Tensor keys = buf[li][0].narrow(0, 0, n).narrow(2, start, width);               // (n, Hkv, T, D)
    at::Tensor values = buf[li][1].narrow(0, 0, n).narrow(2, start, width);
    keys.select(2, width - 1).copy_(qk.narrow(1, Hq, Hkv));
    values.select(2, width - 1).copy_(qkv.narrow(1, (Hq + Hkv) * D, Hkv * D).view({n, Hkv, D}));
    at::Tensor q = qk.narrow(1, 0, Hq).reshape({n, Hkv, Hq / Hkv, D});
    at::Tensor attn = decode_attention(q, keys, values, lens, scale).view({n, Hq * D});
    at::Tensor normed = add_rms_norm(h, product(lw + 2 + PRODUCT, attn, N[1]), lw[1], eps);
    h.add_(product(lw + 2 + 3 * PRODUCT, silu_mul(product(lw + 2 + 2 * PRODUCT, normed, N[2])), N[3]));
  }
}

}  // namespace baton
