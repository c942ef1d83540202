// The eager route of the "cuda" backend (deco_kernels/ops/_kernel_op.py): each op's forward and backward as one
// C++ autograd node around the primitives. The Python autograd.Function of the same formulas costs tens of
// microseconds of host time per call, as long as a DECO-sized kernel runs, most of it in its backward (a Python
// node, which on a GPU the engine's device thread must take the GIL to run, then the backward custom op's Python
// layers); this backward runs no Python. The formulas are those of deco_kernels/ops/<op>.py (setup_context and
// backward), which the custom-op route (torch.compile, tracing, dispatch modes) keeps running. A backward under
// create_graph calls that route's registered backward op, so that double backward behaves exactly as there: the
// pools' formulas, the others' error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "ops.h"

namespace deco {
namespace autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kPrimitiveNamespace = "deco_kernels_C::";

c10::OperatorHandle find_op(const std::string& qualname) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualname.c_str(), "");
}

template <class Signature>
c10::TypedOperatorHandle<Signature> primitive(const char* name) {
  return find_op(std::string(kPrimitiveNamespace) + name).typed<Signature>();
}

// A parameter as the contiguous float32 tensor the primitives take (deco_kernels.ops._common.parameter_as_fp32);
// itself, without a call, where it is one (the common case, on every call).
at::Tensor as_fp32(const at::Tensor& t) {
  if (!t.defined() || (t.scalar_type() == at::kFloat && t.is_contiguous())) return t;
  return t.to(at::kFloat).contiguous();
}

c10::optional<at::Tensor> optional_as_fp32(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return as_fp32(*t);
}

// deco_kernels.ops._common.memory_format_of, NCHW where neither: the format a pool's gradient is brought into.
at::MemoryFormat memory_format_of(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

// A backward primitive deco_kernels_C::<name>, called on boxed arguments; under create_graph the custom op
// deco_kernels::<name> with backend "cuda" runs instead (the same arguments, then the backend), whose own autograd
// formula or error then applies. Returns the outputs: undefined where the primitive skipped one, empty where the
// custom op did (the callers drop both by the same mask).
class BackwardOp {
 public:
  explicit BackwardOp(const char* name) : name_(name), primitive_(find_op(kPrimitiveNamespace + name_)) {}

  variable_list operator()(torch::jit::Stack arguments) const {
    if (at::GradMode::is_enabled()) {
      arguments.emplace_back(std::string("cuda"));
      find_op("deco_kernels::" + name_).callBoxed(&arguments);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      primitive_.callBoxed(&arguments);
    }
    variable_list outputs;
    outputs.reserve(arguments.size());
    for (const c10::IValue& value : arguments) outputs.push_back(value.isTensor() ? value.toTensor() : at::Tensor());
    return outputs;
  }

 private:
  std::string name_;
  c10::OperatorHandle primitive_;
};

using OptionalTensor = c10::optional<at::Tensor>;

// As on the Python route (KernelOp.register_autograd): the gradients of outputs no loss reaches (argmax indices,
// LayerNorm statistics) stay undefined instead of zero tensors that no backward reads, and an undefined gradient
// of the differentiable output (a consumer whose backward returned none) gives undefined gradients.
void no_zero_filled_gradients(AutogradContext* ctx) { ctx->set_materialize_grads(false); }

c10::IValue optional_argument(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

c10::List<bool> mask_argument(std::initializer_list<bool> mask) { return c10::List<bool>(mask); }

// A parameter's gradient in the parameter's dtype (the primitives return float32), or none where not needed.
at::Tensor parameter_grad(bool needed, const at::Tensor& grad, const at::Tensor& parameter) {
  if (!needed) return at::Tensor();
  return grad.scalar_type() == parameter.scalar_type() ? grad : grad.to(parameter.scalar_type());
}

}  // namespace

// Named, not anonymous: the node's name (CppNode<deco::autograd::...Function>) shows in profiles and grad_fn.
struct DepthwiseConv2dFunction : public torch::autograd::Function<DepthwiseConv2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptionalTensor& bias) {
    static const auto forward_primitive =
        primitive<at::Tensor(const at::Tensor&, const at::Tensor&, const OptionalTensor&)>("depthwise_conv2d_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    no_zero_filled_gradients(ctx);
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor())});
    return forward_primitive.call(x, as_fp32(weight), optional_as_fp32(bias));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const BackwardOp backward_op("depthwise_conv2d_backward");
    if (!grads[0].defined()) return variable_list(3);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_bias = bias.defined() && ctx->needs_input_grad(2);
    const variable_list g =
        backward_op({grads[0], x, as_fp32(weight), mask_argument({need_x, need_weight, need_bias})});
    return {need_x ? g[0] : at::Tensor(), parameter_grad(need_weight, g[1], weight),
            parameter_grad(need_bias, g[2], bias)};
  }
};

struct UpsampleAddConvFunction : public torch::autograd::Function<UpsampleAddConvFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& memory,
                            const at::Tensor& weight, const OptionalTensor& bias) {
    static const auto forward_primitive =
        primitive<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&)>(
            "upsample_add_conv_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    no_zero_filled_gradients(ctx);
    ctx->save_for_backward({query, memory, weight, bias.value_or(at::Tensor())});
    return forward_primitive.call(query, memory, as_fp32(weight), optional_as_fp32(bias));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const BackwardOp backward_op("upsample_add_conv_backward");
    if (!grads[0].defined()) return variable_list(4);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &query = saved[0], &memory = saved[1], &weight = saved[2], &bias = saved[3];
    const bool need_query = ctx->needs_input_grad(0), need_memory = ctx->needs_input_grad(1),
               need_weight = ctx->needs_input_grad(2), need_bias = bias.defined() && ctx->needs_input_grad(3);
    const variable_list g = backward_op(
        {grads[0], query, memory, as_fp32(weight), mask_argument({need_query, need_memory, need_weight, need_bias})});
    return {need_query ? g[0] : at::Tensor(), need_memory ? g[1] : at::Tensor(),
            parameter_grad(need_weight, g[2], weight), parameter_grad(need_bias, g[3], bias)};
  }
};

struct DepthwiseConv2dLayerNormFunction : public torch::autograd::Function<DepthwiseConv2dLayerNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptionalTensor& bias, const at::Tensor& norm_weight,
                               const at::Tensor& norm_bias, double eps) {
    static const auto forward_primitive =
        primitive<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const OptionalTensor&, const at::Tensor&,
                                                                 const at::Tensor&, double)>(
            "depthwise_conv2d_layernorm_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    no_zero_filled_gradients(ctx);
    auto [out, mean, rstd] = forward_primitive.call(x, as_fp32(weight), optional_as_fp32(bias), as_fp32(norm_weight),
                                                    as_fp32(norm_bias), eps);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), norm_weight, norm_bias, mean, rstd});
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const BackwardOp backward_op("depthwise_conv2d_layernorm_backward");
    if (!grads[0].defined()) return variable_list(6);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &norm_weight = saved[3],
                     &norm_bias = saved[4], &mean = saved[5], &rstd = saved[6];
    // needs_input_grad counts the tensor arguments given: norm_weight is the third without a bias.
    const size_t norm_input = bias.defined() ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_bias = bias.defined() && ctx->needs_input_grad(2),
               need_norm_weight = ctx->needs_input_grad(norm_input),
               need_norm_bias = ctx->needs_input_grad(norm_input + 1);
    const variable_list g = backward_op(
        {grads[0], x, as_fp32(weight), optional_argument(as_fp32(bias)), as_fp32(norm_weight), mean, rstd,
         mask_argument({need_x, need_weight, need_bias, need_norm_weight, need_norm_bias})});
    return {need_x ? g[0] : at::Tensor(),
            parameter_grad(need_weight, g[1], weight),
            parameter_grad(need_bias, g[2], bias),
            parameter_grad(need_norm_weight, g[3], norm_weight),
            parameter_grad(need_norm_bias, g[4], norm_bias),
            at::Tensor()};
  }
};

struct AdaptiveMaxPool2dFunction : public torch::autograd::Function<AdaptiveMaxPool2dFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef output_size) {
    static const auto forward_primitive =
        primitive<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef)>(
            "adaptive_max_pool2d_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    no_zero_filled_gradients(ctx);
    auto [y, indices] = forward_primitive.call(x, output_size);
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({indices});
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.size(2), x.size(3)};
    return {y, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const BackwardOp backward_op("adaptive_max_pool2d_backward");
    if (!grads[0].defined()) return variable_list(2);
    const at::Tensor indices = ctx->get_saved_variables()[0];
    // In the indices' (= x's) layout, so that grad_x comes back in x's layout.
    const at::Tensor grad_y = grads[0].contiguous(memory_format_of(indices));
    return {backward_op({grad_y, indices, ctx->saved_data["input_size"]})[0], at::Tensor()};
  }
};

struct AdaptiveAvgPool2dFunction : public torch::autograd::Function<AdaptiveAvgPool2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef output_size) {
    static const auto forward_primitive =
        primitive<at::Tensor(const at::Tensor&, at::IntArrayRef)>("adaptive_avg_pool2d_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    no_zero_filled_gradients(ctx);
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.size(2), x.size(3)};
    ctx->saved_data["channels_last"] = memory_format_of(x) == at::MemoryFormat::ChannelsLast;
    return forward_primitive.call(x, output_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const BackwardOp backward_op("adaptive_avg_pool2d_backward");
    if (!grads[0].defined()) return variable_list(2);
    const at::Tensor grad_y = grads[0].contiguous(
        ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    return {backward_op({grad_y, ctx->saved_data["input_size"]})[0], at::Tensor()};
  }
};

struct ScaleResidualMaxPoolFunction : public torch::autograd::Function<ScaleResidualMaxPoolFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& ffn,
                               const at::Tensor& gamma, at::IntArrayRef output_size) {
    static const auto forward_primitive =
        primitive<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, at::IntArrayRef)>(
            "scale_residual_max_pool_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    no_zero_filled_gradients(ctx);
    auto [y, indices, picked_ffn] = forward_primitive.call(z, ffn, gamma, output_size);
    ctx->mark_non_differentiable({indices, picked_ffn});
    ctx->save_for_backward({gamma, indices, picked_ffn});
    ctx->saved_data["input_size"] = std::vector<int64_t>{z.size(1), z.size(2)};
    return {y, indices, picked_ffn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const BackwardOp backward_op("scale_residual_max_pool_backward");
    if (!grads[0].defined()) return variable_list(4);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor grad_y = grads[0].contiguous(at::MemoryFormat::ChannelsLast);
    variable_list g = backward_op({grad_y, saved[0], saved[1], saved[2], ctx->saved_data["input_size"]});
    g.emplace_back();  // output_size
    return g;
  }
};

at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return DepthwiseConv2dFunction::apply(x, weight, bias);
}

at::Tensor upsample_add_conv(const at::Tensor& query, const at::Tensor& memory, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias) {
  return UpsampleAddConvFunction::apply(query, memory, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  const variable_list out = DepthwiseConv2dLayerNormFunction::apply(x, weight, bias, norm_weight, norm_bias, eps);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d(const at::Tensor& x, at::IntArrayRef output_size) {
  const variable_list out = AdaptiveMaxPool2dFunction::apply(x, output_size);
  return {out[0], out[1]};
}

at::Tensor adaptive_avg_pool2d(const at::Tensor& x, at::IntArrayRef output_size) {
  return AdaptiveAvgPool2dFunction::apply(x, output_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool(const at::Tensor& z, const at::Tensor& ffn,
                                                                       const at::Tensor& gamma,
                                                                       at::IntArrayRef output_size) {
  const variable_list out = ScaleResidualMaxPoolFunction::apply(z, ffn, gamma, output_size);
  return {out[0], out[1], out[2]};
}

}  // namespace autograd
}  // namespace deco
