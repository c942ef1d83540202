// Registers the primitives as torch.ops.deco_kernels_C.* for the CUDA and CPU dispatch keys. Backward
// primitives return undefined tensors (None in Python) for outputs whose output_mask entry is false.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(deco_kernels_C, m) {
  m.def("depthwise_conv2d_forward(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "depthwise_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("upsample_add_conv_forward(Tensor query, Tensor memory, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "upsample_add_conv_backward(Tensor grad_y, Tensor query, Tensor memory, Tensor weight, bool[4] output_mask)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("adaptive_max_pool2d_forward(Tensor x, int[2] output_size) -> (Tensor, Tensor)");
  m.def("adaptive_max_pool2d_backward(Tensor grad_y, Tensor indices, int[2] input_size) -> Tensor");
  m.def("adaptive_avg_pool2d_forward(Tensor x, int[2] output_size) -> Tensor");
  m.def("adaptive_avg_pool2d_backward(Tensor grad_y, int[2] input_size) -> Tensor");
  m.def(
      "scale_residual_max_pool_forward(Tensor z, Tensor ffn, Tensor gamma, int[2] output_size)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "scale_residual_max_pool_backward(Tensor grad_y, Tensor gamma, Tensor indices, Tensor picked_ffn,"
      " int[2] input_size) -> (Tensor, Tensor, Tensor)");
}

#define DECO_REGISTER_PRIMITIVES(NAMESPACE)                                                 \
  m.impl("depthwise_conv2d_forward", &NAMESPACE::depthwise_conv2d_forward);                 \
  m.impl("depthwise_conv2d_backward", &NAMESPACE::depthwise_conv2d_backward);               \
  m.impl("upsample_add_conv_forward", &NAMESPACE::upsample_add_conv_forward);               \
  m.impl("upsample_add_conv_backward", &NAMESPACE::upsample_add_conv_backward);             \
  m.impl("adaptive_max_pool2d_forward", &NAMESPACE::adaptive_max_pool2d_forward);           \
  m.impl("adaptive_max_pool2d_backward", &NAMESPACE::adaptive_max_pool2d_backward);         \
  m.impl("adaptive_avg_pool2d_forward", &NAMESPACE::adaptive_avg_pool2d_forward);           \
  m.impl("adaptive_avg_pool2d_backward", &NAMESPACE::adaptive_avg_pool2d_backward);         \
  m.impl("scale_residual_max_pool_forward", &NAMESPACE::scale_residual_max_pool_forward);   \
  m.impl("scale_residual_max_pool_backward", &NAMESPACE::scale_residual_max_pool_backward);

TORCH_LIBRARY_IMPL(deco_kernels_C, CUDA, m) { DECO_REGISTER_PRIMITIVES(deco::cuda) }

TORCH_LIBRARY_IMPL(deco_kernels_C, CPU, m) { DECO_REGISTER_PRIMITIVES(deco::cpu) }

// depthwise_conv2d_layernorm's primitives.
TORCH_LIBRARY_FRAGMENT(deco_kernels_C, m) {
  m.def(
      "depthwise_conv2d_layernorm_forward(Tensor x, Tensor weight, Tensor? bias, Tensor norm_weight, "
      "Tensor norm_bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "depthwise_conv2d_layernorm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor norm_weight, Tensor mean, Tensor rstd, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define DECO_REGISTER_CONV_LAYERNORM_PRIMITIVES(NAMESPACE)                                          \
  m.impl("depthwise_conv2d_layernorm_forward", &NAMESPACE::depthwise_conv2d_layernorm_forward);   \
  m.impl("depthwise_conv2d_layernorm_backward", &NAMESPACE::depthwise_conv2d_layernorm_backward);

TORCH_LIBRARY_IMPL(deco_kernels_C, CUDA, m) { DECO_REGISTER_CONV_LAYERNORM_PRIMITIVES(deco::cuda) }

TORCH_LIBRARY_IMPL(deco_kernels_C, CPU, m) { DECO_REGISTER_CONV_LAYERNORM_PRIMITIVES(deco::cpu) }

// The "cuda" backend's eager route (deco_kernels/ops/_kernel_op.py): each op as one C++ autograd node
// (autograd.cpp) around the primitives above. The arguments are those of the custom op deco_kernels::<op> without
// its backend. CompositeImplicitAutograd: the same kernel records the node where autograd is on and only runs
// the forward where it is not (no_grad, inference mode).
TORCH_LIBRARY_FRAGMENT(deco_kernels_C, m) {
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("upsample_add_conv(Tensor query, Tensor memory, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "depthwise_conv2d_layernorm(Tensor x, Tensor weight, Tensor? bias, Tensor norm_weight, Tensor norm_bias, "
      "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("adaptive_max_pool2d(Tensor x, int[2] output_size) -> (Tensor, Tensor)");
  m.def("adaptive_avg_pool2d(Tensor x, int[2] output_size) -> Tensor");
  m.def(
      "scale_residual_max_pool(Tensor z, Tensor ffn, Tensor gamma, int[2] output_size) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deco_kernels_C, CompositeImplicitAutograd, m) {
  m.impl("depthwise_conv2d", &deco::autograd::depthwise_conv2d);
  m.impl("upsample_add_conv", &deco::autograd::upsample_add_conv);
  m.impl("depthwise_conv2d_layernorm", &deco::autograd::depthwise_conv2d_layernorm);
  m.impl("adaptive_max_pool2d", &deco::autograd::adaptive_max_pool2d);
  m.impl("adaptive_avg_pool2d", &deco::autograd::adaptive_avg_pool2d);
  m.impl("scale_residual_max_pool", &deco::autograd::scale_residual_max_pool);
}

// The digest of the csrc/ files this module was built from (deco_kernels/_source_digest.py), defined by setup.py
// and CMakeLists.txt: deco_kernels._cuda refuses a module built from other sources than those beside it.
#ifndef DECO_KERNELS_SOURCE_DIGEST
#error "build deco_kernels._C with setup.py or CMakeLists.txt, which define DECO_KERNELS_SOURCE_DIGEST"
#endif
#define DECO_STRINGIFY_TOKEN(token) #token
#define DECO_STRINGIFY(macro) DECO_STRINGIFY_TOKEN(macro)

// Importing deco_kernels._C runs the registrations above; the module's one attribute is its source digest.
PYBIND11_MODULE(_C, module) {
  module.doc() = "deco_kernels CUDA/CPU primitives: see torch.ops.deco_kernels_C";
  module.attr("source_digest") = DECO_STRINGIFY(DECO_KERNELS_SOURCE_DIGEST);
}
