// The kernels' entry points, declared once for the .cpp files that define them: bindings.cpp gives them to Python,
// layers.cpp calls them in a decode step's layer loop.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace baton {
at::Tensor pack(const at::Tensor& w);
int float_panel();
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N);
at::Tensor linear_quantized(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m,
                            int64_t N);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& lens, double scale);
at::Tensor prompt_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, int64_t start,
                            double scale);
at::Tensor add_rms_norm(at::Tensor& h, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor argmax_rows(const at::Tensor& x);
void decode_layers(at::Tensor& h, const std::vector<at::Tensor>& w, const std::vector<int64_t>& Ns,
                   const at::Tensor& buf, int64_t start, int64_t width, const at::Tensor& lens, const at::Tensor& cos,
                   const at::Tensor& sin, int64_t Hq, double eps, double scale);
}  // namespace baton
