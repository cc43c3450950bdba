// Attention on a CPU. A decode step's, for each (row, K/V head) of BATON's batch cache: the group's query
// heads over the row's own tokens only (right-aligned, the last `len` columns of the window), never over
// the padding a shorter row has in a wide batch; a row's result depends on its own q, K, V and length only.
// A prompt chunk's (prompt_attention, below): causal, over the prompt's own K/V buffer.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"
#include "share.h"
#include "tile.h"
#include "vec.h"

namespace baton {

constexpr int AHEAD = 16;   // rows of K or V prefetched ahead: a (row, head)'s tokens cross a 4 KiB page every 16

// out (GB, D) = the softmax weights s (GB, len) over v (len, D) rows `tstride` apart, / each head's total:
// GB query heads at once, so each row of V is read once for all of them. Each output still sums over
// u = 0..len-1 in order.
template <typename T, int DV, int GB>
static void weigh(const T* s, int64_t len, const T* v, int64_t tstride, const T* totals, T* out) {
  constexpr int L = lanes<T>(), D = DV * L;
  Vec<T> acc[GB][DV] = {};
  for (int64_t u = 0; u < len; u++) {
    const T* vt = v + u * tstride;
    prefetch(vt + AHEAD * tstride, DV * VBYTES);
    for (int i = 0; i < DV; i++) {
      Vec<T> x = load(vt + i * L);
      for (int g = 0; g < GB; g++) acc[g][i] += s[g * len + u] * x;
    }
  }
  for (int g = 0; g < GB; g++)
    for (int i = 0; i < DV; i++) store(out + g * D + i * L, acc[g][i] / totals[g]);
}

// Softmax numerators in place: s[t] = exp(s[t] - max) for t < len; returns their total (summed in lanes,
// then the fixed tree, the tail after), which the caller divides by once its weighted sum is done.
template <typename T>
static T softmax_(T* s, int64_t len) {
  constexpr int L = lanes<T>();
  T m = *std::max_element(s, s + len);
  Vec<T> sum{};
  int64_t t = 0;
  for (; t + L <= len; t += L) {
    Vec<T> p = vexp(load(s + t) - m);
    store(s + t, p);
    sum += p;
  }
  T total = hsum<T>(sum);
  if (t < len) {   // the tail: a vector of the last scores, padded with what exp sends to ~0
    T tail[L];
    std::fill_n(tail, L, m - T(1000));
    std::copy(s + t, s + len, tail);
    Vec<T> p = vexp(load(tail) - m);
    store(tail, p);
    for (int64_t i = 0; t + i < len; i++) { s[t + i] = tail[i]; total += tail[i]; }
  }
  return total;
}

// One (row, K/V head): q (G, D) over k, v (len, D) rows `tstride` apart -> out (G, D). s: G * (len + 1)
// scratch (the scores, then each head's total).
template <typename T, int DV>
static void attend(const T* q, int G, const T* k, const T* v, int64_t tstride, int64_t len, T scale, T* s, T* out) {
  constexpr int L = lanes<T>(), D = DV * L;
  T* totals = s + G * len;
  for (int64_t t = 0; t < len; t++) {
    const T* kt = k + t * tstride;
    prefetch(kt + AHEAD * tstride, DV * VBYTES);
    prefetch<2>(v + (t + AHEAD) * tstride, DV * VBYTES);   // V into L2 meanwhile: two streams in flight, not one
    Vec<T> kv[DV];
    for (int i = 0; i < DV; i++) kv[i] = load(kt + i * L);
    for (int g = 0; g < G; g++) {
      Vec<T> acc{};
      for (int i = 0; i < DV; i++) acc += load(q + g * D + i * L) * kv[i];
      s[g * len + t] = hsum<T>(acc) * scale;
    }
  }
  for (int g = 0; g < G; g++) totals[g] = softmax_(s + g * len, len);
  for (int g0 = 0; g0 < G; g0 += 4) {
    int gb = std::min(4, G - g0);
    const T *sg = s + g0 * len, *tg = totals + g0;
    T* og = out + g0 * D;
    switch (gb) {
      case 1: weigh<T, DV, 1>(sg, len, v, tstride, tg, og); break;
      case 2: weigh<T, DV, 2>(sg, len, v, tstride, tg, og); break;
      case 3: weigh<T, DV, 3>(sg, len, v, tstride, tg, og); break;
      default: weigh<T, DV, 4>(sg, len, v, tstride, tg, og);
    }
  }
}

template <typename T>
static void attend_dispatch(int64_t D, const T* q, int G, const T* k, const T* v, int64_t ts, int64_t len, T scale,
                            T* s, T* out) {
  switch (D / lanes<T>()) {
    case 1: return attend<T, 1>(q, G, k, v, ts, len, scale, s, out);
    case 2: return attend<T, 2>(q, G, k, v, ts, len, scale, s, out);
    case 4: return attend<T, 4>(q, G, k, v, ts, len, scale, s, out);
    case 8: return attend<T, 8>(q, G, k, v, ts, len, scale, s, out);
    case 16: return attend<T, 16>(q, G, k, v, ts, len, scale, s, out);
    default: TORCH_CHECK(false, "decode_attention: head_dim ", D, " is not 1, 2, 4, 8 or 16 vectors");
  }
}

// q (n, Hkv, G, D) contiguous; keys, values (n, Hkv, T, D) with D contiguous (BatchKVCache.layer_views);
// lens (n,) int64: row r attends over columns [T - lens[r], T). -> (n, Hkv, G, D)
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                               const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && keys.sizes() == values.sizes() && keys.strides() == values.strides(),
              "decode_attention: q (n, Hkv, G, D), keys/values (n, Hkv, T, D) alike");
  int64_t n = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), T = keys.size(2);
  TORCH_CHECK(keys.size(0) == n && keys.size(1) == H && keys.size(3) == D && keys.stride(3) == 1,
              "decode_attention: keys (n, Hkv, T, D) with D contiguous");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.numel() == n, "decode_attention: lens (n,) int64");
  auto qc = q.contiguous();
  auto lc = lens.contiguous();
  auto out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decode_attention", [&] {
    constexpr int L = lanes<scalar_t>();
    TORCH_CHECK(D % L == 0, "decode_attention: head_dim a multiple of ", L);
    const scalar_t *qp = qc.data_ptr<scalar_t>(), *kp = keys.data_ptr<scalar_t>(), *vp = values.data_ptr<scalar_t>();
    const int64_t* lp = lc.data_ptr<int64_t>();
    for (int64_t r = 0; r < n; r++) TORCH_CHECK(lp[r] >= 1 && lp[r] <= T, "decode_attention: a row's length outside the window");
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t rs = keys.stride(0), hs = keys.stride(1), ts = keys.stride(2);
    share_items(n * H, [&](auto next) {   // rows of unequal lengths, handed out as threads come free
      std::vector<scalar_t> s(G * (T + 1));
      for (int64_t b; (b = next()) < n * H;) {
        int64_t r = b / H, h = b % H, len = lp[r];
        int64_t off = r * rs + h * hs + (T - len) * ts;
        const scalar_t* qb = qp + b * G * D;
        scalar_t* ob = op + b * G * D;
        attend_dispatch<scalar_t>(D, qb, G, kp + off, vp + off, ts, len, scalar_t(scale), s.data(), ob);
      }
    });
  });
  return out;
}

// A prompt chunk's causal attention: its m tokens, at positions start .. start + m - 1 of the prompt, each
// over the prompt's keys up to its own position. Items are (K/V head, block of QB tokens), their rows r =
// (token, query head of the group), R = QB * G of them; each item runs three products on tile.h's kernel:
//   1. scores, transposed: st (t, r) = K[t] . q_r, K's rows as x and the block's queries as a packed panel;
//   2. p (r, t) = st (t, r) * scale, softmax'd over the row's own t <= its position, zeros beyond;
//   3. out_r = sum_t p (r, t) V[t] / total_r, p's rows as x and V's columns as the panel.
// A row's numbers depend on its own query and the prompt's K/V only (the zeros add nothing), not on the
// block, the chunk or the batch around it.
template <typename T>
static void attend_prompt(const T* q, int64_t qs, int64_t m, int64_t H, int64_t G, int64_t D, const T* keys,
                          const T* values, int64_t hs, int64_t ts, int64_t start, T scale, T* out) {
  constexpr int NR = panel<T>(), MR = row_block<T>();
  const int64_t QB = std::max<int64_t>(1, 3 * NR / G), R = QB * G, RP = (R + NR - 1) / NR * NR, span = start + m;
  const int64_t blocks = (m + QB - 1) / QB, Hq = H * G;
  share_items(H * blocks, [&](auto next) {
    std::vector<T> qt(RP * D), st(span * RP), p(R * span), o(R * D), totals(R);
    for (int64_t item; (item = next()) < H * blocks;) {
      int64_t h = item % H, i0 = item / H * QB, rows = std::min(QB, m - i0) * G, width = start + i0 + rows / G;
      const T *k = keys + h * hs, *v = values + h * hs;
      std::fill(qt.begin(), qt.end(), T(0));
      for (int64_t r = 0; r < rows; r++)      // qt (RP / NR panels, D, NR): the queries, transposed
        for (int64_t d = 0; d < D; d++)
          qt[(r / NR * D + d) * NR + r % NR] = q[(i0 + r / G) * qs + (h * G + r % G) * D + d];
      for (int64_t t = 0; t < width; t += MR)
        for (int64_t c = 0; c < RP; c += NR)
          tile_rows<T, MR>(int(std::min<int64_t>(MR, width - t)), k + t * ts, ts, D, true,
                           Floats<T>{qt.data() + c * D}, st.data() + t * RP + c, RP);
      for (int64_t r = 0; r < rows; r++) {
        int64_t len = start + i0 + r / G + 1;
        T* pr = p.data() + r * width;
        for (int64_t t = 0; t < len; t++) pr[t] = st[t * RP + r] * scale;
        totals[r] = softmax_(pr, len);
        std::fill(pr + len, pr + width, T(0));
      }
      for (int64_t r = 0; r < rows; r += MR)
        for (int64_t c = 0; c < D; c += NR)
          tile_rows<T, MR>(int(std::min<int64_t>(MR, rows - r)), p.data() + r * width, width, width, true,
                           Floats<T>{v + c, ts}, o.data() + r * D + c, D);
      for (int64_t r = 0; r < rows; r++) {
        T* dst = out + (i0 + r / G) * Hq * D + (h * G + r % G) * D;
        for (int64_t d = 0; d < D; d++) dst[d] = o[r * D + d] / totals[r];
      }
    }
  });
}

// q (m, Hq, D) with D contiguous, heads D apart; keys, values (Hkv, T, D), D contiguous, alike, holding the
// prompt's K/V through position start + m - 1 -> (m, Hq * D)
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t start,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && keys.sizes() == values.sizes() && keys.strides() == values.strides(),
              "prompt_attention: q (m, Hq, D), keys/values (Hkv, T, D) alike");
  int64_t m = q.size(0), Hq = q.size(1), D = q.size(2), H = keys.size(0);
  TORCH_CHECK(keys.size(2) == D && keys.stride(2) == 1 && q.stride(2) == 1 && q.stride(1) == D && Hq % H == 0,
              "prompt_attention: D contiguous, q's heads D apart, Hq a multiple of Hkv");
  TORCH_CHECK(start >= 0 && start + m <= keys.size(1), "prompt_attention: the chunk ends past the keys");
  auto out = at::empty({m, Hq * D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "prompt_attention", [&] {
    TORCH_CHECK(D % panel<scalar_t>() == 0, "prompt_attention: head_dim a multiple of ", panel<scalar_t>());
    attend_prompt<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), m, H, Hq / H, D, keys.data_ptr<scalar_t>(),
                            values.data_ptr<scalar_t>(), keys.stride(0), keys.stride(1), start, scalar_t(scale),
                            out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace baton
