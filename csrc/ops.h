// The primitives of deco_kernels, one set per device (kernels.cu: CUDA, cpu_kernels.cpp: CPU); both are
// Ops<Backend> and ConvLayerNormOps<Backend> from ops_host.h. Registered as torch.ops.deco_kernels_C.* in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#define DECO_DECLARE_PRIMITIVES                                                                                 \
  at::Tensor depthwise_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,                            \
                                      const c10::optional<at::Tensor>& bias);                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward(                                     \
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, std::array<bool, 3> output_mask); \
  at::Tensor upsample_add_conv_forward(const at::Tensor& query, const at::Tensor& memory,                        \
                                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias);        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_add_conv_backward(                        \
      const at::Tensor& grad_y, const at::Tensor& query, const at::Tensor& memory, const at::Tensor& weight,    \
      std::array<bool, 4> output_mask);                                                                         \
  std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(const at::Tensor& x,                           \
                                                                 at::IntArrayRef output_size);                  \
  at::Tensor adaptive_max_pool2d_backward(const at::Tensor& grad_y, const at::Tensor& indices,                  \
                                          at::IntArrayRef input_size);                                          \
  at::Tensor adaptive_avg_pool2d_forward(const at::Tensor& x, at::IntArrayRef output_size);                     \
  at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& grad_y, at::IntArrayRef input_size);                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool_forward(                               \
      const at::Tensor& z, const at::Tensor& ffn, const at::Tensor& gamma, at::IntArrayRef output_size);        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool_backward(                              \
      const at::Tensor& grad_y, const at::Tensor& gamma, const at::Tensor& indices,                             \
      const at::Tensor& picked_ffn, at::IntArrayRef input_size);

// Defines the primitives of namespace deco::<device> as Ops<BACKEND>'s.
#define DECO_DEFINE_PRIMITIVES(BACKEND)                                                                         \
  at::Tensor depthwise_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,                            \
                                      const c10::optional<at::Tensor>& bias) {                                  \
    return Ops<BACKEND>::depthwise_conv2d_forward(x, weight, bias);                                             \
  }                                                                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward(                                     \
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, std::array<bool, 3> output_mask) { \
    return Ops<BACKEND>::depthwise_conv2d_backward(grad_y, x, weight, output_mask);                             \
  }                                                                                                             \
  at::Tensor upsample_add_conv_forward(const at::Tensor& query, const at::Tensor& memory,                        \
                                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {       \
    return Ops<BACKEND>::upsample_add_conv_forward(query, memory, weight, bias);                                \
  }                                                                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_add_conv_backward(                        \
      const at::Tensor& grad_y, const at::Tensor& query, const at::Tensor& memory, const at::Tensor& weight,    \
      std::array<bool, 4> output_mask) {                                                                        \
    return Ops<BACKEND>::upsample_add_conv_backward(grad_y, query, memory, weight, output_mask);                \
  }                                                                                                             \
  std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(const at::Tensor& x,                           \
                                                                 at::IntArrayRef output_size) {                 \
    return Ops<BACKEND>::adaptive_max_pool2d_forward(x, output_size);                                           \
  }                                                                                                             \
  at::Tensor adaptive_max_pool2d_backward(const at::Tensor& grad_y, const at::Tensor& indices,                  \
                                          at::IntArrayRef input_size) {                                         \
    return Ops<BACKEND>::adaptive_max_pool2d_backward(grad_y, indices, input_size);                             \
  }                                                                                                             \
  at::Tensor adaptive_avg_pool2d_forward(const at::Tensor& x, at::IntArrayRef output_size) {                    \
    return Ops<BACKEND>::adaptive_avg_pool2d_forward(x, output_size);                                           \
  }                                                                                                             \
  at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& grad_y, at::IntArrayRef input_size) {               \
    return Ops<BACKEND>::adaptive_avg_pool2d_backward(grad_y, input_size);                                      \
  }                                                                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool_forward(                               \
      const at::Tensor& z, const at::Tensor& ffn, const at::Tensor& gamma, at::IntArrayRef output_size) {       \
    return Ops<BACKEND>::scale_residual_max_pool_forward(z, ffn, gamma, output_size);                           \
  }                                                                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool_backward(                              \
      const at::Tensor& grad_y, const at::Tensor& gamma, const at::Tensor& indices,                             \
      const at::Tensor& picked_ffn, at::IntArrayRef input_size) {                                               \
    return Ops<BACKEND>::scale_residual_max_pool_backward(grad_y, gamma, indices, picked_ffn, input_size);      \
  }

// depthwise_conv2d_layernorm's two primitives (ConvLayerNormOps<BACKEND> of ops_host.h).
#define DECO_DECLARE_CONV_LAYERNORM_PRIMITIVES                                                                   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm_forward(                            \
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,                     \
      const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps);                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm_backward(   \
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,                                \
      const c10::optional<at::Tensor>& bias, const at::Tensor& norm_weight, const at::Tensor& mean,            \
      const at::Tensor& rstd, std::array<bool, 5> output_mask);

#define DECO_DEFINE_CONV_LAYERNORM_PRIMITIVES(BACKEND)                                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm_forward(                            \
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,                     \
      const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {                                 \
    return ConvLayerNormOps<BACKEND>::depthwise_conv2d_layernorm_forward(x, weight, bias, norm_weight,          \
                                                                         norm_bias, eps);                       \
  }                                                                                                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm_backward(   \
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,                                \
      const c10::optional<at::Tensor>& bias, const at::Tensor& norm_weight, const at::Tensor& mean,            \
      const at::Tensor& rstd, std::array<bool, 5> output_mask) {                                                \
    return ConvLayerNormOps<BACKEND>::depthwise_conv2d_layernorm_backward(grad_out, x, weight, bias,            \
                                                                          norm_weight, mean, rstd, output_mask); \
  }

namespace deco {
// The ops of the "cuda" backend's eager route (autograd.cpp): forward and backward of each op as one C++ autograd
// node around the primitives above, whichever device they run on.
namespace autograd {
at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor upsample_add_conv(const at::Tensor& query, const at::Tensor& memory, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps);
std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d(const at::Tensor& x, at::IntArrayRef output_size);
at::Tensor adaptive_avg_pool2d(const at::Tensor& x, at::IntArrayRef output_size);
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool(const at::Tensor& z, const at::Tensor& ffn,
                                                                       const at::Tensor& gamma,
                                                                       at::IntArrayRef output_size);
}  // namespace autograd
namespace cpu {
DECO_DECLARE_PRIMITIVES
DECO_DECLARE_CONV_LAYERNORM_PRIMITIVES
}  // namespace cpu
namespace cuda {
DECO_DECLARE_PRIMITIVES
DECO_DECLARE_CONV_LAYERNORM_PRIMITIVES
}  // namespace cuda
}  // namespace deco
