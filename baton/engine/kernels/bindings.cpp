// The Python face of baton's CPU kernels (one extension module, built by baton/engine/kernels/__init__.py).
#include <torch/extension.h>

#include "kernels.h"
#include "vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_bytes", [] { return baton::VBYTES; }, "the vector width the kernels were built for: 64 (AVX-512) or 32");
  m.def("pack", &baton::pack, "W (N, K) -> panels (P, K, NR)");
  m.def("linear", &baton::linear, "x (..., K) @ W^T with W packed -> (..., N)");
  m.def("linear_quantized", &baton::linear_quantized,
        "x (..., K) @ W^T with W as GGUF Q4_1 (q, d, m) or Q8_0 (q, d, empty m) panels -> (..., N), float32");
  m.def("float_panel", &baton::float_panel, "columns of a packed float32 panel (linear_quantized's layout)");
  m.def("decode_attention", &baton::decode_attention,
        "q (n, Hkv, G, D) over each row's last lens[r] columns of keys/values (n, Hkv, T, D) -> (n, Hkv, G, D)");
  m.def("prompt_attention", &baton::prompt_attention,
        "q (m, Hq, D) of prompt positions start.., causal over keys/values (Hkv, T, D) -> (m, Hq * D)");
  m.def("add_rms_norm", &baton::add_rms_norm, "h (rows, H) += delta (if given), in place; -> RMSNorm(h) * weight");
  m.def("silu_mul", &baton::silu_mul, "gate_up (rows, 2I) -> silu(gate) * up (rows, I)");
  m.def("rope_", &baton::rope_, "x (rows, heads, D) rotated in place by cos, signed sin (rows, D)");
  m.def("decode_layers", &baton::decode_layers,
        "h (n, hidden) through every layer of a decode step in place, K/V into the batch cache's step column");
  m.def("argmax_rows", &baton::argmax_rows, "x (n, V) -> (n,) int64: torch.argmax(x, -1), vectorised");
}
