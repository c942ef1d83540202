// Host side of the primitives, written once for both builds: argument checks, memory-format handling,
// output allocation and the sequence of passes. `Backend` (CudaBackend in kernels.cu, CpuBackend in
// cpu_kernels.cpp) only says how a pass runs over its grid:
//   Backend::Guard                      device guard constructed from the inputs' device
//   Backend::for_each(op)               op(e) for e in [0, op.size())  (the element-wise passes)
//   Backend::conv_tiled<T>(s, in, weights, epilogue, out, layout)       the NCHW shared-memory conv pass
//   Backend::weight_grad_partials<T>(s, tiling, in, grad_out, partials)  NCHW per-tile weight/bias gradient sums
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <climits>
#include <tuple>

#include "kernel_math.h"

namespace deco {

#define DECO_DISPATCH_FLOATING(TYPE, NAME, ...)                       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// ---------------------------------------------------------------------------------------------------------
// Checks. Messages name the argument and what was expected.

// `dims` names the four dimensions for the error message: the CIM back end takes B x H x W x C tensors.
inline void check_activation(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name,
                             const char* dims = "B x C x H x W") {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (", dims, "), got shape ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.device() == like.device(), name, " must be on the same device as ", like_name, " (", like.device(),
              "), got ", t.device());
  TORCH_CHECK(dtype == like.scalar_type(), name, " must have the dtype of ", like_name, " (", like.scalar_type(),
              "), got ", dtype);
  TORCH_CHECK(t.size(1) * t.size(2) * t.size(3) <= INT_MAX && t.size(0) <= INT_MAX, name, " of shape ", t.sizes(),
              " is too large: one image (C * H * W elements) must fit 32-bit indexing");
}

inline void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* x_name) {
  TORCH_CHECK(weight.defined(), "weight must be a tensor, got None");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1, "weight must be C x 1 x kh x kw, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) == x.size(1), "weight has ", weight.size(0), " channels but ", x_name, " has ", x.size(1));
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(kh % 2 == 1 && kw % 2 == 1 && kh <= 31 && kw <= 31,
              "weight's kernel size must be odd and at most 31 in each dimension, got ", kh, " x ", kw);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on the same device as ", x_name, " (", x.device(),
              "), got ", weight.device());
}

// A float32 vector of one value per channel (a bias, a layer scale) on the device of `x`, whose channel count
// is `channels`.
inline void check_channel_vector(const at::Tensor& t, const char* name, int64_t channels, const at::Tensor& x,
                                 const char* x_name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape (", channels, ",) to match ", x_name,
              "'s channels, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " must be on the same device as ", x_name, " (", x.device(), "), got ",
              t.device());
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, const char* x_name) {
  if (!bias.has_value() || !bias->defined()) return;
  check_channel_vector(*bias, "bias", x.size(1), x, x_name);
}

inline void check_same_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, " (", what, "), got ", t.sizes());
}

inline std::pair<int, int> check_output_size(at::IntArrayRef output_size) {
  TORCH_CHECK(output_size.size() == 2, "output_size must be (out_h, out_w), got ", output_size);
  TORCH_CHECK(output_size[0] > 0 && output_size[1] > 0 && output_size[0] <= INT_MAX && output_size[1] <= INT_MAX,
              "output_size must be positive, got ", output_size);
  return {static_cast<int>(output_size[0]), static_cast<int>(output_size[1])};
}

// ---------------------------------------------------------------------------------------------------------
// Memory formats. The primary activation's format (NCHW unless it is channels-last) decides the format of
// every activation of the call and of the outputs; other tensors (e.g. an expanded, stride-0 gradient) are
// made contiguous in it.

inline bool is_channels_last(const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline at::Tensor in_format(const at::Tensor& t, bool channels_last) {
  return t.contiguous(memory_format(channels_last));
}

inline Layout layout_of(const at::Tensor& t, bool channels_last) {
  return make_layout(static_cast<int>(t.size(1)), static_cast<int>(t.size(2)), static_cast<int>(t.size(3)),
                     channels_last);
}

template <typename T>
TensorSource<T> source_of(const at::Tensor& t, bool channels_last) {
  return TensorSource<T>{t.data_ptr<T>(), layout_of(t, channels_last)};
}

inline ConvShape conv_shape(const at::Tensor& x, const at::Tensor& weight) {
  return ConvShape{static_cast<int>(x.size(0)),      static_cast<int>(x.size(1)),
                   static_cast<int>(x.size(2)),      static_cast<int>(x.size(3)),
                   static_cast<int>(weight.size(2)), static_cast<int>(weight.size(3))};
}

inline at::Tensor fp32_contiguous(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// An optional fp32 bias (from fp32_contiguous, or undefined) as the kernels take it.
inline const float* bias_data(const at::Tensor& b) { return b.defined() ? b.data_ptr<float>() : nullptr; }

// C x 1 x kh x kw fp32 weights as a kernel reads them (ConvWeights), with the tensor that holds them: a tap-major
// copy where consecutive threads take consecutive channels (`channel_lanes`), else the weights themselves;
// `flip` reads the kernel rotated by 180 degrees.
struct LaidOutWeights {
  at::Tensor storage;
  ConvWeights view;
};

inline LaidOutWeights lay_out_weights(const at::Tensor& weight, bool channel_lanes, bool flip) {
  const int channels = static_cast<int>(weight.size(0)), taps = static_cast<int>(weight.size(2) * weight.size(3));
  LaidOutWeights w;
  w.storage = channel_lanes ? weight.flatten(1).t().contiguous() : weight;
  w.view = channel_lanes ? ConvWeights{w.storage.data_ptr<float>(), 1, channels}
                         : ConvWeights{w.storage.data_ptr<float>(), taps, 1};
  if (flip) {
    w.view.data += static_cast<int64_t>(taps - 1) * w.view.tap_stride;
    w.view.tap_stride = -w.view.tap_stride;
  }
  return w;
}

template <class Backend>
struct Ops {
  // One convolution pass over `s` (with `flip`, the kernel rotated by 180 degrees: the grad input's): the
  // channels-last path runs the element-wise direct kernel, NCHW the shared-memory tiled one. A caller whose
  // source exists in one layout only calls that layout's pass, so that no kernel is built for the other.
  template <typename T, class Source, class Epilogue>
  static void conv(const ConvShape& s, bool channels_last, const Source& in, const at::Tensor& weight, bool flip,
                   const Epilogue& epilogue, const at::Tensor& out) {
    if (channels_last)
      conv_channels_last<T>(s, in, weight, flip, epilogue, out);
    else
      conv_nchw<T>(s, in, weight, flip, epilogue, out);
  }

  template <typename T, class Source, class Epilogue>
  static void conv_channels_last(const ConvShape& s, const Source& in, const at::Tensor& weight, bool flip,
                                 const Epilogue& epilogue, const at::Tensor& out) {
    if (out.numel() == 0) return;
    const LaidOutWeights w = lay_out_weights(weight, true, flip);
    Backend::for_each(
        ConvDirectOp<T, Source, Epilogue>{s, in, w.view, epilogue, out.data_ptr<T>(), layout_of(out, true)});
  }

  template <typename T, class Source, class Epilogue>
  static void conv_nchw(const ConvShape& s, const Source& in, const at::Tensor& weight, bool flip,
                        const Epilogue& epilogue, const at::Tensor& out) {
    if (out.numel() == 0) return;
    const LaidOutWeights w = lay_out_weights(weight, false, flip);
    Backend::template conv_tiled<T>(s, in, w.view, epilogue, out.data_ptr<T>(), layout_of(out, false));
  }

  // grad weight (C x 1 x kh x kw) and grad bias (C), float32, summed over a batch of `in` and `grad_out`, both
  // in the format `channels_last` says: NCHW blocks stage one channel's tiles in shared memory, channels-last
  // threads take consecutive channels and read the tensors where they are (WeightGradDirectOp). As with conv,
  // a source that exists in one layout only calls that layout's function.
  template <typename T, class Source>
  static std::pair<at::Tensor, at::Tensor> weight_grad(const ConvShape& s, bool channels_last, const Source& in,
                                                       const TensorSource<T>& grad_out, const at::Tensor& like) {
    return channels_last ? weight_grad_channels_last<T>(s, in, grad_out, like)
                         : weight_grad_nchw<T>(s, in, grad_out, like);
  }

  template <typename T, class Source>
  static std::pair<at::Tensor, at::Tensor> weight_grad_channels_last(const ConvShape& s, const Source& in,
                                                                     const TensorSource<T>& grad_out,
                                                                     const at::Tensor& like) {
    return weight_grad_of_partials(s, true, like, [&](const GradTiling& tiling, const GradPartials& partials) {
      Backend::for_each(WeightGradDirectOp<T, Source>{s, tiling, make_grad_work(s), in, grad_out, partials});
    });
  }

  template <typename T, class Source>
  static std::pair<at::Tensor, at::Tensor> weight_grad_nchw(const ConvShape& s, const Source& in,
                                                            const TensorSource<T>& grad_out, const at::Tensor& like) {
    return weight_grad_of_partials(s, false, like, [&](const GradTiling& tiling, const GradPartials& partials) {
      Backend::template weight_grad_partials<T>(s, tiling, in, grad_out, partials);
    });
  }

  // The weight and bias gradients from the per-tile partial sums that partial_sums(tiling, partials) writes,
  // added over the tiles in a fixed order.
  template <class PartialSums>
  static std::pair<at::Tensor, at::Tensor> weight_grad_of_partials(const ConvShape& s, bool channels_last,
                                                                   const at::Tensor& like,
                                                                   const PartialSums& partial_sums) {
    const auto options = like.options().dtype(at::kFloat);
    at::Tensor grad_weight = at::empty({s.channels, 1, s.kh, s.kw}, options);
    at::Tensor grad_bias = at::empty({s.channels}, options);
    if (static_cast<int64_t>(s.batch) * s.height * s.width == 0) {
      grad_weight.zero_();
      grad_bias.zero_();
      return {grad_weight, grad_bias};
    }
    if (s.channels == 0) return {grad_weight, grad_bias};
    const GradTiling tiling =
        channels_last ? channels_last_grad_tiling(s) : make_grad_tiling(s, kGradTileH, kGradTileW);
    const int taps = s.kh * s.kw;
    TORCH_CHECK(static_cast<int64_t>(s.channels) * tiling.tiles <= INT_MAX,
                "too many (channel, tile) blocks for the weight gradient: ", s.channels, " x ", tiling.tiles);
    at::Tensor partials_storage = at::empty({static_cast<int64_t>(s.channels) * tiling.tiles * (taps + 1)}, options);
    const GradPartials partials =
        make_grad_partials(partials_storage.data_ptr<float>(), tiling, s.channels, taps + 1, channels_last);
    partial_sums(tiling, partials);
    Backend::for_each(WeightGradReduceOp{partials, tiling.tiles, s.channels, taps, grad_weight.data_ptr<float>(),
                                         grad_bias.data_ptr<float>()});
    return {grad_weight, grad_bias};
  }

  static at::Tensor depthwise_conv2d_forward(const at::Tensor& x, const at::Tensor& weight,
                                             const c10::optional<at::Tensor>& bias) {
    check_activation(x, "x", x, "x");
    check_weight(weight, x, "x");
    check_bias(bias, x, "x");
    typename Backend::Guard guard(x.device());
    const bool cl = is_channels_last(x);
    const at::Tensor xc = in_format(x, cl);
    const at::Tensor w = fp32_contiguous(weight);
    const at::Tensor b = bias.has_value() && bias->defined() ? fp32_contiguous(*bias) : at::Tensor();
    at::Tensor y = at::empty_like(xc, memory_format(cl));
    const ConvShape s = conv_shape(xc, w);
    DECO_DISPATCH_FLOATING(x.scalar_type(), "depthwise_conv2d_forward", [&] {
      conv<scalar_t>(s, cl, source_of<scalar_t>(xc, cl), w, false, BiasEpilogue{bias_data(b)}, y);
    });
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward(const at::Tensor& grad_y,
                                                                                   const at::Tensor& x,
                                                                                   const at::Tensor& weight,
                                                                                   std::array<bool, 3> output_mask) {
    check_activation(x, "x", x, "x");
    check_activation(grad_y, "grad_y", x, "x");
    check_same_shape(grad_y, "grad_y", x.sizes(), "the shape of x");
    check_weight(weight, x, "x");
    typename Backend::Guard guard(x.device());
    const bool cl = is_channels_last(x);
    const at::Tensor xc = in_format(x, cl), gyc = in_format(grad_y, cl);
    const at::Tensor w = fp32_contiguous(weight);
    const ConvShape s = conv_shape(xc, w);
    at::Tensor grad_x, grad_weight, grad_bias;
    DECO_DISPATCH_FLOATING(x.scalar_type(), "depthwise_conv2d_backward", [&] {
      if (output_mask[0]) {
        grad_x = at::empty_like(xc, memory_format(cl));
        conv<scalar_t>(s, cl, source_of<scalar_t>(gyc, cl), w, true, BiasEpilogue{nullptr}, grad_x);
      }
      if (output_mask[1] || output_mask[2])
        std::tie(grad_weight, grad_bias) =
            weight_grad<scalar_t>(s, cl, source_of<scalar_t>(xc, cl), source_of<scalar_t>(gyc, cl), xc);
    });
    return {grad_x, output_mask[1] ? grad_weight : at::Tensor(), output_mask[2] ? grad_bias : at::Tensor()};
  }

  template <typename T>
  static UpsampleSumSource<T> upsample_sum(const at::Tensor& query, const at::Tensor& memory, bool cl) {
    return UpsampleSumSource<T>{query.data_ptr<T>(),
                                layout_of(query, cl),
                                static_cast<int>(query.size(2)),
                                static_cast<int>(query.size(3)),
                                memory.data_ptr<T>(),
                                layout_of(memory, cl),
                                static_cast<int>(memory.size(2)),
                                static_cast<int>(memory.size(3))};
  }

  // The channels-last passes' input: upsample_nearest(query) + memory, B x C x H x W channels-last fp32
  // (UpsampleSumStoreOp).
  template <typename T>
  static at::Tensor stored_upsample_sum(const ConvShape& s, const UpsampleSumSource<T>& sum,
                                       const at::Tensor& memory) {
    const auto options = memory.options().dtype(at::kFloat).memory_format(memory_format(true));
    at::Tensor stored = at::empty(memory.sizes(), options);
    Backend::for_each(UpsampleSumStoreOp<T>{s, sum, stored.data_ptr<float>()});
    return stored;
  }

  static void check_query(const at::Tensor& query, const at::Tensor& memory) {
    check_activation(query, "query", memory, "memory");
    TORCH_CHECK(query.size(0) == memory.size(0) && query.size(1) == memory.size(1),
                "query must have memory's batch and channels (", memory.size(0), ", ", memory.size(1), "), got ",
                query.sizes());
    TORCH_CHECK(query.size(2) > 0 && query.size(3) > 0, "query's H and W must be positive, got ", query.sizes());
  }

  static at::Tensor upsample_add_conv_forward(const at::Tensor& query, const at::Tensor& memory,
                                              const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
    check_activation(memory, "memory", memory, "memory");
    check_query(query, memory);
    check_weight(weight, memory, "memory");
    check_bias(bias, memory, "memory");
    typename Backend::Guard guard(memory.device());
    const bool cl = is_channels_last(memory);
    const at::Tensor qc = in_format(query, cl), mc = in_format(memory, cl);
    const at::Tensor w = fp32_contiguous(weight);
    const at::Tensor b = bias.has_value() && bias->defined() ? fp32_contiguous(*bias) : at::Tensor();
    at::Tensor y = at::empty_like(mc, memory_format(cl));
    const ConvShape s = conv_shape(mc, w);
    DECO_DISPATCH_FLOATING(memory.scalar_type(), "upsample_add_conv_forward", [&] {
      const UpsampleSumSource<scalar_t> sum = upsample_sum<scalar_t>(qc, mc, cl);
      const UpsampleResidualEpilogue<scalar_t> epilogue{bias_data(b), sum};
      if (cl)
        conv_channels_last<scalar_t>(s, source_of<float>(stored_upsample_sum(s, sum, mc), true), w, false, epilogue,
                                     y);
      else
        conv_nchw<scalar_t>(s, sum, w, false, epilogue, y);
    });
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> upsample_add_conv_backward(
      const at::Tensor& grad_y, const at::Tensor& query, const at::Tensor& memory, const at::Tensor& weight,
      std::array<bool, 4> output_mask) {
    check_activation(memory, "memory", memory, "memory");
    check_query(query, memory);
    check_activation(grad_y, "grad_y", memory, "memory");
    check_same_shape(grad_y, "grad_y", memory.sizes(), "the shape of memory");
    check_weight(weight, memory, "memory");
    typename Backend::Guard guard(memory.device());
    const bool cl = is_channels_last(memory);
    const at::Tensor qc = in_format(query, cl), mc = in_format(memory, cl), gyc = in_format(grad_y, cl);
    const at::Tensor w = fp32_contiguous(weight);
    const ConvShape s = conv_shape(mc, w);
    at::Tensor grad_query, grad_sum, grad_weight, grad_bias;
    DECO_DISPATCH_FLOATING(memory.scalar_type(), "upsample_add_conv_backward", [&] {
      const TensorSource<scalar_t> gy = source_of<scalar_t>(gyc, cl);
      if (output_mask[0] || output_mask[1]) {
        // grad of (u + m): the transposed conv of grad y; it is grad memory, and grad u = it + grad y.
        grad_sum = at::empty_like(mc, memory_format(cl));
        conv<scalar_t>(s, cl, gy, w, true, BiasEpilogue{nullptr}, grad_sum);
      }
      if (output_mask[0]) {
        grad_query = at::empty_like(qc, memory_format(cl));
        if (grad_query.numel() > 0)
          Backend::for_each(QueryGradOp<scalar_t>{s, static_cast<int>(qc.size(2)), static_cast<int>(qc.size(3)), cl,
                                                  source_of<scalar_t>(grad_sum, cl), gy, grad_query.data_ptr<scalar_t>(),
                                                  layout_of(qc, cl)});
      }
      if (output_mask[2] || output_mask[3]) {
        const UpsampleSumSource<scalar_t> sum = upsample_sum<scalar_t>(qc, mc, cl);
        std::tie(grad_weight, grad_bias) =
            cl ? weight_grad_channels_last<scalar_t>(s, source_of<float>(stored_upsample_sum(s, sum, mc), true), gy,
                                                     mc)
               : weight_grad_nchw<scalar_t>(s, sum, gy, mc);
      }
    });
    return {grad_query, output_mask[1] ? grad_sum : at::Tensor(), output_mask[2] ? grad_weight : at::Tensor(),
            output_mask[3] ? grad_bias : at::Tensor()};
  }

  static void check_pool_input(const at::Tensor& x, const char* name) {
    check_activation(x, name, x, name);
    TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, name, "'s H and W must be positive, got ", x.sizes());
  }

  static std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_forward(const at::Tensor& x,
                                                                        at::IntArrayRef output_size) {
    check_pool_input(x, "x");
    const auto [out_h, out_w] = check_output_size(output_size);
    typename Backend::Guard guard(x.device());
    const bool cl = is_channels_last(x);
    const at::Tensor xc = in_format(x, cl);
    const PoolShape s{static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
                      static_cast<int>(x.size(3)), out_h, out_w};
    at::Tensor y = at::empty({x.size(0), x.size(1), out_h, out_w}, xc.options().memory_format(memory_format(cl)));
    at::Tensor indices = at::empty_like(y, y.options().dtype(at::kLong), memory_format(cl));
    if (y.numel() == 0) return {y, indices};
    DECO_DISPATCH_FLOATING(x.scalar_type(), "adaptive_max_pool2d_forward", [&] {
      Backend::for_each(MaxPoolForwardOp<scalar_t>{s, cl, source_of<scalar_t>(xc, cl), y.data_ptr<scalar_t>(),
                                                   indices.data_ptr<int64_t>(), layout_of(y, cl)});
    });
    return {y, indices};
  }

  static std::pair<int, int> check_input_size(at::IntArrayRef input_size) {
    TORCH_CHECK(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0 && input_size[0] <= INT_MAX &&
                    input_size[1] <= INT_MAX,
                "input_size must be (H, W) with positive entries, got ", input_size);
    return {static_cast<int>(input_size[0]), static_cast<int>(input_size[1])};
  }

  static at::Tensor pool_grad_input(const at::Tensor& grad_y, int height, int width, bool cl) {
    TORCH_CHECK(grad_y.size(1) * height * width <= INT_MAX, "input_size ", height, " x ", width,
                " is too large: one image must fit 32-bit indexing");
    return at::empty({grad_y.size(0), grad_y.size(1), height, width},
                     grad_y.options().memory_format(memory_format(cl)));
  }

  // The argmax saved by a max-pool forward, one per element of grad_y.
  static void check_indices(const at::Tensor& indices, const at::Tensor& grad_y) {
    TORCH_CHECK(indices.defined() && indices.scalar_type() == at::kLong, "indices must be an int64 tensor");
    TORCH_CHECK(indices.device() == grad_y.device(), "indices must be on the same device as grad_y (",
                grad_y.device(), "), got ", indices.device());
    check_same_shape(indices, "indices", grad_y.sizes(), "the shape of grad_y");
  }

  static at::Tensor adaptive_max_pool2d_backward(const at::Tensor& grad_y, const at::Tensor& indices,
                                                 at::IntArrayRef input_size) {
    check_activation(grad_y, "grad_y", grad_y, "grad_y");
    const auto [height, width] = check_input_size(input_size);
    check_indices(indices, grad_y);
    typename Backend::Guard guard(grad_y.device());
    const bool cl = is_channels_last(grad_y);
    const at::Tensor gyc = in_format(grad_y, cl), ic = in_format(indices, cl);
    const PoolShape s{static_cast<int>(grad_y.size(0)), static_cast<int>(grad_y.size(1)), height, width,
                      static_cast<int>(grad_y.size(2)), static_cast<int>(grad_y.size(3))};
    at::Tensor grad_x = pool_grad_input(grad_y, height, width, cl);
    if (grad_x.numel() == 0) return grad_x;
    grad_x.zero_();  // the routing writes only the inputs some window picked
    DECO_DISPATCH_FLOATING(grad_y.scalar_type(), "adaptive_max_pool2d_backward", [&] {
      Backend::for_each(MaxPoolBackwardOp<scalar_t>{s, cl, source_of<scalar_t>(gyc, cl), ic.data_ptr<int64_t>(),
                                                    grad_x.data_ptr<scalar_t>(), layout_of(grad_x, cl)});
    });
    return grad_x;
  }

  // adaptive_max_pool2d((z + gamma * ffn) as B x C x H x W) for z, ffn of B x H x W x C: the memory of such a
  // tensor is that of a channels-last B x C x H x W map, so everything here runs channels-last.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool_forward(
      const at::Tensor& z, const at::Tensor& ffn, const at::Tensor& gamma, at::IntArrayRef output_size) {
    constexpr const char* dims = "B x H x W x C";
    check_activation(z, "z", z, "z", dims);
    check_activation(ffn, "ffn", z, "z", dims);
    check_same_shape(ffn, "ffn", z.sizes(), "the shape of z");
    TORCH_CHECK(z.size(1) > 0 && z.size(2) > 0, "z's H and W must be positive (z is ", dims, "), got ", z.sizes());
    check_channel_vector(gamma, "gamma", z.size(3), z, "z");
    const auto [out_h, out_w] = check_output_size(output_size);
    typename Backend::Guard guard(z.device());
    const at::Tensor zc = z.contiguous(), fc = ffn.contiguous(), gc = gamma.contiguous();
    const PoolShape s{static_cast<int>(z.size(0)), static_cast<int>(z.size(3)), static_cast<int>(z.size(1)),
                      static_cast<int>(z.size(2)), out_h, out_w};
    const auto options = z.options().memory_format(at::MemoryFormat::ChannelsLast);
    at::Tensor y = at::empty({z.size(0), z.size(3), out_h, out_w}, options);
    at::Tensor indices = at::empty_like(y, y.options().dtype(at::kLong), at::MemoryFormat::ChannelsLast);
    at::Tensor picked_ffn = at::empty_like(y, at::MemoryFormat::ChannelsLast);
    if (y.numel() == 0) return {y, indices, picked_ffn};
    DECO_DISPATCH_FLOATING(z.scalar_type(), "scale_residual_max_pool_forward", [&] {
      const ScaleResidualSource<scalar_t> sum{zc.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>(),
                                              make_layout(s.channels, s.height, s.width, true), gc.data_ptr<float>()};
      Backend::for_each(ScaleResidualMaxPoolForwardOp<scalar_t>{s, sum, y.data_ptr<scalar_t>(),
                                                                indices.data_ptr<int64_t>(),
                                                                picked_ffn.data_ptr<scalar_t>(), layout_of(y, true)});
    });
    return {y, indices, picked_ffn};
  }

  // grad_y, indices, picked_ffn: B x C x OH x OW -> (grad_z, grad_ffn: B x H x W x C contiguous in grad_y's
  // dtype, grad_gamma: C float32).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_residual_max_pool_backward(
      const at::Tensor& grad_y, const at::Tensor& gamma, const at::Tensor& indices, const at::Tensor& picked_ffn,
      at::IntArrayRef input_size) {
    check_activation(grad_y, "grad_y", grad_y, "grad_y");
    check_activation(picked_ffn, "picked_ffn", grad_y, "grad_y");
    check_same_shape(picked_ffn, "picked_ffn", grad_y.sizes(), "the shape of grad_y");
    check_indices(indices, grad_y);
    check_channel_vector(gamma, "gamma", grad_y.size(1), grad_y, "grad_y");
    const auto [height, width] = check_input_size(input_size);
    typename Backend::Guard guard(grad_y.device());
    const at::Tensor gyc = in_format(grad_y, true), ic = in_format(indices, true), pc = in_format(picked_ffn, true);
    const at::Tensor gc = gamma.contiguous();
    const PoolShape s{static_cast<int>(grad_y.size(0)), static_cast<int>(grad_y.size(1)), height, width,
                      static_cast<int>(grad_y.size(2)), static_cast<int>(grad_y.size(3))};
    // Channels-last B x C x H x W memory is dense B x H x W x C: allocated as the former, returned as the latter.
    at::Tensor grad_z = pool_grad_input(grad_y, height, width, true);
    at::Tensor grad_ffn = at::empty_like(grad_z, at::MemoryFormat::ChannelsLast);
    at::Tensor grad_gamma = at::empty({grad_y.size(1)}, grad_y.options().dtype(at::kFloat));
    const int64_t positions = static_cast<int64_t>(s.batch) * s.out_h * s.out_w;
    if (positions == 0) grad_gamma.zero_();
    DECO_DISPATCH_FLOATING(grad_y.scalar_type(), "scale_residual_max_pool_backward", [&] {
      const TensorSource<scalar_t> gy = source_of<scalar_t>(gyc, true);
      if (grad_z.numel() > 0) {
        // The routing writes only the inputs some window picked.
        grad_z.zero_();
        grad_ffn.zero_();
        Backend::for_each(ScaleResidualMaxPoolBackwardOp<scalar_t>{
            s, gy, ic.data_ptr<int64_t>(), gc.data_ptr<float>(), grad_z.data_ptr<scalar_t>(),
            grad_ffn.data_ptr<scalar_t>(), layout_of(grad_z, true)});
      }
      if (positions > 0 && s.channels > 0) {
        const int64_t splits = gamma_grad_splits(positions);
        at::Tensor partials = at::empty({splits, static_cast<int64_t>(s.channels)}, grad_gamma.options());
        Backend::for_each(
            GammaGradPartialsOp<scalar_t>{s, gy, source_of<scalar_t>(pc, true), partials.data_ptr<float>(), splits});
        Backend::for_each(
            GammaGradReduceOp{partials.data_ptr<float>(), splits, s.channels, grad_gamma.data_ptr<float>()});
      }
    });
    return {grad_z.permute({0, 2, 3, 1}), grad_ffn.permute({0, 2, 3, 1}), grad_gamma};
  }

  static at::Tensor adaptive_avg_pool2d_forward(const at::Tensor& x, at::IntArrayRef output_size) {
    check_pool_input(x, "x");
    const auto [out_h, out_w] = check_output_size(output_size);
    typename Backend::Guard guard(x.device());
    const bool cl = is_channels_last(x);
    const at::Tensor xc = in_format(x, cl);
    const PoolShape s{static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), static_cast<int>(x.size(2)),
                      static_cast<int>(x.size(3)), out_h, out_w};
    at::Tensor y = at::empty({x.size(0), x.size(1), out_h, out_w}, xc.options().memory_format(memory_format(cl)));
    if (y.numel() == 0) return y;
    DECO_DISPATCH_FLOATING(x.scalar_type(), "adaptive_avg_pool2d_forward", [&] {
      Backend::for_each(AvgPoolForwardOp<scalar_t>{s, cl, source_of<scalar_t>(xc, cl), y.data_ptr<scalar_t>(),
                                                   layout_of(y, cl)});
    });
    return y;
  }

  static at::Tensor adaptive_avg_pool2d_backward(const at::Tensor& grad_y, at::IntArrayRef input_size) {
    check_activation(grad_y, "grad_y", grad_y, "grad_y");
    const auto [height, width] = check_input_size(input_size);
    typename Backend::Guard guard(grad_y.device());
    const bool cl = is_channels_last(grad_y);
    const at::Tensor gyc = in_format(grad_y, cl);
    const PoolShape s{static_cast<int>(grad_y.size(0)), static_cast<int>(grad_y.size(1)), height, width,
                      static_cast<int>(grad_y.size(2)), static_cast<int>(grad_y.size(3))};
    at::Tensor grad_x = pool_grad_input(grad_y, height, width, cl);
    if (grad_x.numel() == 0) return grad_x;
    DECO_DISPATCH_FLOATING(grad_y.scalar_type(), "adaptive_avg_pool2d_backward", [&] {
      Backend::for_each(AvgPoolBackwardOp<scalar_t>{s, cl, source_of<scalar_t>(gyc, cl), grad_x.data_ptr<scalar_t>(),
                                                    layout_of(grad_x, cl)});
    });
    return grad_x;
  }
};

// ---------------------------------------------------------------------------------------------------------
// depthwise_conv2d_layernorm (kernel_math.h's ConvLayerNorm*Pass): LayerNorm over the channels of the
// depthwise conv, B x H x W x C out. Backend additionally provides
//   Backend::conv_layernorm_forward(pass), Backend::conv_layernorm_backward(pass)   the tiled passes
// and the backward hands the conv output's gradient to Ops<Backend>::depthwise_conv2d_backward.

template <class Backend>
struct ConvLayerNormOps {
  static void check_parameters(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& norm_weight) {
    check_activation(x, "x", x, "x");
    TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kLayerNormMaxChannels, "x must have 1..", kLayerNormMaxChannels,
                " channels (the LayerNorm runs over them in one block), got shape ", x.sizes());
    check_weight(weight, x, "x");
    check_bias(bias, x, "x");
    check_channel_vector(norm_weight, "norm_weight", x.size(1), x, "x");
  }

  static LayerNormTiling tiling_of(const ConvShape& s) {
    const LayerNormTiling tiling = make_layer_norm_tiling(s);
    TORCH_CHECK(tiling.tiles <= INT_MAX, "deco_kernels: ", tiling.tiles, " tiles of ", tiling.pixels,
                " pixels exceed one grid (the batch is too large)");
    return tiling;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm_forward(
      const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
      const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
    check_parameters(x, weight, bias, norm_weight);
    check_channel_vector(norm_bias, "norm_bias", x.size(1), x, "x");
    TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
    typename Backend::Guard guard(x.device());
    // The conv pass reads channels-last x (kernel_math.h): a copy of NCHW x costs less than the conv's loads
    // from NCHW would.
    const at::Tensor xs = in_format(x, true);
    const at::Tensor w = fp32_contiguous(weight);
    const LaidOutWeights wl = lay_out_weights(w, true, false);
    const at::Tensor b = bias.has_value() && bias->defined() ? fp32_contiguous(*bias) : at::Tensor();
    const at::Tensor nw = fp32_contiguous(norm_weight), nb = fp32_contiguous(norm_bias);
    at::Tensor out = at::empty({x.size(0), x.size(2), x.size(3), x.size(1)}, xs.options());
    at::Tensor mean = at::empty({x.size(0), x.size(2), x.size(3)}, xs.options().dtype(at::kFloat));
    at::Tensor rstd = at::empty_like(mean);
    if (out.numel() == 0) return {out, mean, rstd};
    const ConvShape s = conv_shape(xs, w);
    DECO_DISPATCH_FLOATING(x.scalar_type(), "depthwise_conv2d_layernorm_forward", [&] {
      Backend::conv_layernorm_forward(ConvLayerNormForwardPass<scalar_t, TensorSource<scalar_t>>{
          s, tiling_of(s), source_of<scalar_t>(xs, true), wl.view, bias_data(b),
          nw.data_ptr<float>(), nb.data_ptr<float>(), static_cast<float>(eps), out.data_ptr<scalar_t>(),
          mean.data_ptr<float>(), rstd.data_ptr<float>()});
    });
    return {out, mean, rstd};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_layernorm_backward(
      const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
      const c10::optional<at::Tensor>& bias, const at::Tensor& norm_weight, const at::Tensor& mean,
      const at::Tensor& rstd, std::array<bool, 5> output_mask) {
    check_parameters(x, weight, bias, norm_weight);
    TORCH_CHECK(grad_out.defined() && grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
                "grad_out must be a tensor with x's dtype (", x.scalar_type(), ") and device (", x.device(), ")");
    const std::array<int64_t, 4> out_shape{x.size(0), x.size(2), x.size(3), x.size(1)};
    check_same_shape(grad_out, "grad_out", out_shape, "B x H x W x C");
    const auto check_statistic = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.device() == x.device(), name,
                  " must be a float32 tensor on x's device (the forward's statistics)");
      check_same_shape(t, name, at::IntArrayRef(out_shape).slice(0, 3), "B x H x W");
    };
    check_statistic(mean, "mean");
    check_statistic(rstd, "rstd");
    typename Backend::Guard guard(x.device());
    const bool cl = is_channels_last(x);
    // The conv pass reads channels-last x, as in the forward; grad_y and the conv's backward keep x's format.
    const at::Tensor xc = in_format(x, cl), xs = in_format(x, true), goc = grad_out.contiguous();
    const at::Tensor meanc = mean.contiguous(), rstdc = rstd.contiguous();
    const at::Tensor w = fp32_contiguous(weight), nw = fp32_contiguous(norm_weight);
    const at::Tensor b = bias.has_value() && bias->defined() ? fp32_contiguous(*bias) : at::Tensor();
    const bool need_grad_y = output_mask[0] || output_mask[1] || output_mask[2];
    const bool need_norm = output_mask[3] || output_mask[4];
    const ConvShape s = conv_shape(xc, w);
    const LayerNormTiling tiling = tiling_of(s);
    at::Tensor grad_y = need_grad_y ? at::empty_like(xc, memory_format(cl)) : at::Tensor();
    at::Tensor grad_norm_weight, grad_norm_bias, partials;
    if (need_norm) {
      grad_norm_weight = at::empty({x.size(1)}, xc.options().dtype(at::kFloat));
      grad_norm_bias = at::empty_like(grad_norm_weight);
      if (tiling.tiles == 0) {
        grad_norm_weight.zero_();
        grad_norm_bias.zero_();
      } else {
        partials = at::empty({tiling.tiles, 2 * x.size(1)}, grad_norm_weight.options());
      }
    }
    if (tiling.tiles > 0 && (need_grad_y || need_norm)) {
      const LaidOutWeights wl = lay_out_weights(w, true, false);
      DECO_DISPATCH_FLOATING(x.scalar_type(), "depthwise_conv2d_layernorm_backward", [&] {
        Backend::conv_layernorm_backward(ConvLayerNormBackwardPass<scalar_t, TensorSource<scalar_t>>{
            s, tiling, cl, source_of<scalar_t>(xs, true), wl.view, bias_data(b), nw.data_ptr<float>(),
            meanc.data_ptr<float>(), rstdc.data_ptr<float>(), goc.data_ptr<scalar_t>(),
            need_grad_y ? grad_y.data_ptr<scalar_t>() : nullptr, layout_of(xc, cl),
            need_norm ? partials.data_ptr<float>() : nullptr});
      });
      if (need_norm)
        Backend::for_each(LayerNormParamGradReduceOp{partials.data_ptr<float>(), static_cast<int>(tiling.tiles),
                                                     s.channels,
                                                     grad_norm_weight.data_ptr<float>(),
                                                     grad_norm_bias.data_ptr<float>()});
    }
    at::Tensor grad_x, grad_weight, grad_bias;
    if (need_grad_y)
      std::tie(grad_x, grad_weight, grad_bias) =
          Ops<Backend>::depthwise_conv2d_backward(grad_y, xc, w, {output_mask[0], output_mask[1], output_mask[2]});
    return {grad_x, grad_weight, grad_bias, output_mask[3] ? grad_norm_weight : at::Tensor(),
            output_mask[4] ? grad_norm_bias : at::Tensor()};
  }
};

}  // namespace deco
