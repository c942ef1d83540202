// CPU builds of the CUDA kernels (registered for the CPU dispatch key): the same grid -- blocks, threads,
// warp lanes -- walked serially, calling the same kernel_math.h functions as kernels.cu (see the comment
// there for what this does and does not test). They exist to test the kernels without a GPU, not for speed.
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
  static void conv_tiled(const ConvShape& s, const Source& in, const float* weight, const Epilogue& epilogue, T* out,
                         const Layout& out_layout) {
    const ConvTiling tiling = make_conv_tiling(s);
    std::vector<float> tile(conv_tile_size(s));
    for (int64_t block = 0; block < tiling.blocks; ++block) {
      int b, c, h0, w0;
      conv_tile_origin(s, tiling, block, b, c, h0, w0);
      for (int e = 0; e < conv_tile_size(s); ++e) tile[e] = conv_tile_element(in, s, b, c, h0, w0, e);
      const float* channel_weight = weight + static_cast<int64_t>(c) * s.kh * s.kw;
      for (int thread = 0; thread < kConvThreads; ++thread)
        conv_tile_thread(tile.data(), channel_weight, s, epilogue, out, out_layout, b, c, h0, w0, thread);
    }
  }

  template <typename T, class Source>
  static void weight_grad_partials(const ConvShape& s, const Source& in, const TensorSource<T>& grad_out,
                                   float* partials) {
    const GradTiling tiling = make_grad_tiling(s);
    const int taps_with_bias = s.kh * s.kw + 1;
    std::vector<float> grad_tile(kGradTileH * kGradTileW), input_tile(grad_input_tile_size(s));
    for (int c = 0; c < s.channels; ++c) {
      for (int tile = 0; tile < tiling.tiles; ++tile) {
        int b, h0, w0;
        grad_tile_origin(tiling, tile, b, h0, w0);
        for (int e = 0; e < kGradTileH * kGradTileW; ++e)
          grad_tile[e] = grad_out_tile_element(grad_out, s, b, c, h0, w0, e);
        for (int e = 0; e < grad_input_tile_size(s); ++e)
          input_tile[e] = grad_input_tile_element(in, s, b, c, h0, w0, e);
        for (int t = 0; t < taps_with_bias; ++t) {
          float lanes[kWarp];
          for (int lane = 0; lane < kWarp; ++lane)
            lanes[lane] = weight_grad_lane_sum(grad_tile.data(), input_tile.data(), s, t, lane);
          partials[(static_cast<int64_t>(c) * tiling.tiles + tile) * taps_with_bias + t] = butterfly_sum(lanes);
        }
      }
    }
  }
};

}  // namespace

namespace cpu {
DECO_DEFINE_PRIMITIVES(CpuBackend)
}  // namespace cpu
}  // namespace deco
