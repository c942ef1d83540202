// CPU builds of the CUDA kernels (registered for the CPU dispatch key): the same grid -- blocks, threads,
// warp lanes -- walked serially, calling the same kernel_math.h functions as kernels.cu (see the comment
// there for what this does and does not test). They exist to test the kernels without a GPU, not for speed.
#include <algorithm>
#include <vector>

#include "ops.h"
#include "ops_host.h"

namespace deco {
namespace {

// What the xor-shuffle butterfly of kernels.cu leaves in lane 0: at each step every lane adds the value of
// lane ^ offset, in that order.
float butterfly_sum(float (&lanes)[kWarp]) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    float next[kWarp];
    for (int lane = 0; lane < kWarp; ++lane) next[lane] = lanes[lane] + lanes[lane ^ offset];
    for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = next[lane];
  }
  return lanes[0];
}

struct CpuBackend {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  template <class Op>
  static void for_each(const Op& op) {
    const int64_t n = op.size();
    for (int64_t e = 0; e < n; ++e) op(e);
  }

  template <typename T, class Source, class Epilogue>
  static void conv_tiled(const ConvShape& s, const Source& in, const ConvWeights& weight, const Epilogue& epilogue,
                         T* out, const Layout& out_layout) {
    const ConvTiling tiling = make_conv_tiling(s);
    std::vector<float> tile(conv_tile_size(s)), channel_weight(s.kh * s.kw);
    for (int64_t block = 0; block < tiling.blocks; ++block) {
      int b, c, h0, w0;
      conv_tile_origin(s, tiling, block, b, c, h0, w0);
      const int rows = conv_tile_rows(s.kh), cols = conv_tile_cols(s.kw);
      for (int row = 0; row < rows; ++row)
        for (int col = 0; col < cols; ++col)
          tile[row * cols + col] = halo_tile_value(in, s, b, c, h0, w0, row, col);
      const float* weights_of_c = weight.channel(c);
      for (int t = 0; t < s.kh * s.kw; ++t) channel_weight[t] = weights_of_c[t * weight.tap_stride];
      for (int thread = 0; thread < kConvThreads; ++thread)
        conv_tile_thread(tile.data(), channel_weight.data(), s, epilogue, out, out_layout, b, c, h0, w0, thread);
    }
  }

  template <typename T, class Source>
  static void weight_grad_partials(const ConvShape& s, const GradTiling& tiling, const Source& in,
                                   const TensorSource<T>& grad_out, const GradPartials& partials) {
    const GradWork work = make_grad_work(s);
    const int in_rows = grad_input_rows(s.kh), in_cols = grad_input_cols(s.kw), pitch = grad_input_pitch(s.kw);
    const int taps_with_bias = s.kh * s.kw + 1;
    std::vector<float> gy_tile(kGradTileH * kGradOutPitch), in_tile(in_rows * pitch), sums(kGradThreads * kGradSlots);
    for (int c = 0; c < s.channels; ++c) {
      for (int tile = 0; tile < tiling.tiles; ++tile) {
        int b, h0, w0;
        grad_tile_origin(tiling, tile, b, h0, w0);
        for (int row = 0; row < kGradTileH; ++row)
          for (int col = 0; col < kGradTileW; ++col)
            gy_tile[row * kGradOutPitch + col] = grad_out_tile_value(grad_out, s, b, c, h0, w0, row, col);
        for (int row = 0; row < in_rows; ++row)
          for (int col = 0; col < in_cols; ++col)
            in_tile[row * pitch + col] = halo_tile_value(in, s, b, c, h0, w0, row, col);
        const int rows = std::min(kGradTileH, s.height - h0), cols = std::min(kGradTileW, s.width - w0);
        for (int thread = 0; thread < kGradThreads; ++thread)
          weight_grad_thread_sums(gy_tile.data(), in_tile.data(), s, work, rows, cols, thread, sums.data());
        for (int t = 0; t < taps_with_bias; ++t)
          partials.data[partials.at(tile, c, t)] = weight_grad_tap_sum(sums.data(), s, work, t);
      }
    }
  }

  // depthwise_conv2d_layernorm: the blocks of kernels.cu's conv_layernorm_*_kernel, one after another; a
  // warp's reduction of pixel slot p is its 32 lane sums and the butterfly.
  template <class LaneSum>
  static float warp_total(const LaneSum& lane_sum) {
    float lanes[kWarp];
    for (int lane = 0; lane < kWarp; ++lane) lanes[lane] = lane_sum(lane);
    return butterfly_sum(lanes);
  }

  template <class Pass>
  static void conv_layernorm_forward(const Pass& pass) {
    const int channels = pass.s.channels, pixels = pass.tiling.pixels;
    std::vector<float> y_tile(pass.tile_elements()), mean_tile(pixels), rstd_tile(pixels);
    for (int tile = 0; tile < pass.tiling.tiles; ++tile) {
      for (int w = 0; w < pass.tile_strips(); ++w) pass.y_strip(tile, w, y_tile.data());
      for (int p = 0; p < pixels; ++p) {
        const float* row = y_tile.data() + p * channels;
        const float mean = layer_norm_channel_mean(
            warp_total([&](int lane) { return layer_norm_lane_sum(row, channels, lane); }), channels);
        const float squares =
            warp_total([&](int lane) { return layer_norm_lane_centred_squares(row, channels, lane, mean); });
        pass.store_statistics(tile, p, mean, squares, mean_tile.data(), rstd_tile.data());
      }
      for (int e = 0; e < pass.tile_elements(); ++e)
        pass.output_element(tile, e, y_tile.data(), mean_tile.data(), rstd_tile.data());
    }
  }

  template <class Pass>
  static void conv_layernorm_backward(const Pass& pass) {
    const int channels = pass.s.channels, pixels = pass.tiling.pixels;
    std::vector<float> xhat_tile(pass.tile_elements()), g_tile(pass.tile_elements()), mean_g_tile(pixels),
        mean_g_xhat_tile(pixels);
    for (int tile = 0; tile < pass.tiling.tiles; ++tile) {
      for (int w = 0; w < pass.tile_strips(); ++w) pass.xhat_strip(tile, w, xhat_tile.data());
      for (int e = 0; e < pass.tile_elements(); ++e) pass.grad_out_element(tile, e, g_tile.data());
      if (pass.partials != nullptr)
        for (int c = 0; c < channels; ++c) pass.norm_partials(tile, c, xhat_tile.data(), g_tile.data());
      if (pass.grad_y == nullptr) continue;
      for (int p = 0; p < pixels; ++p) {
        const float* g_row = g_tile.data() + p * channels;
        const float* xhat_row = xhat_tile.data() + p * channels;
        mean_g_tile[p] = layer_norm_channel_mean(
            warp_total([&](int lane) { return layer_norm_lane_scaled_sum(g_row, pass.norm_weight, channels, lane); }),
            channels);
        mean_g_xhat_tile[p] = layer_norm_channel_mean(warp_total([&](int lane) {
                                                        return layer_norm_lane_scaled_dot(g_row, pass.norm_weight,
                                                                                          xhat_row, channels, lane);
                                                      }),
                                                      channels);
      }
      for (int e = 0; e < pass.tile_elements(); ++e)
        pass.grad_y_element(tile, e, xhat_tile.data(), g_tile.data(), mean_g_tile.data(), mean_g_xhat_tile.data());
    }
  }
};

}  // namespace

namespace cpu {
DECO_DEFINE_PRIMITIVES(CpuBackend)
DECO_DEFINE_CONV_LAYERNORM_PRIMITIVES(CpuBackend)
}  // namespace cpu
}  // namespace deco
