// The Python face of baton's CPU kernels (one extension module, built by baton/engine/kernels/__init__.py).
#include <torch/extension.h>

#include "vec.h"

namespace baton {
torch::Tensor pack(const torch::Tensor& w);
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& lens, double scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_bytes", [] { return baton::VBYTES; }, "the vector width the kernels were built for: 64 (AVX-512) or 32");
  m.def("pack", &baton::pack, "W (N, K) -> panels (P, K, NR)");
  m.def("linear", &baton::linear, "x (..., K) @ W^T with W packed -> (..., N)");
  m.def("decode_attention", &baton::decode_attention,
        "q (n, Hkv, G, D) over each row's last lens[r] columns of keys/values (n, Hkv, T, D) -> (n, Hkv, G, D)");
}
