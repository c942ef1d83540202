// CUDA kernels of deco_kernels and their launches on the current stream. The arithmetic is in kernel_math.h
// (shared with the CPU build); this file holds the CUDA-only parts: shared-memory staging, synchronisation,
// warp shuffles and launch geometry.
//
// Design for H100 at DECO's sizes (memory-bound small maps, 7x7 and 9x9 kernels):
// - NCHW conv: a 128-thread block stages a 16 x 64 output tile's input plus halo (fp32, zero-padded) and the
//   channel's weights in shared memory; each thread keeps 8 outputs of a row in registers and slides a
//   register window along the row, so one shared-memory load feeds 8 FMAs.
// - Channels-last conv: consecutive threads take consecutive channels (coalesced loads of the NHWC rows and
//   of tap-major weights), each computing 8 outputs of a row with the same register window, reading through
//   L1.
// - Weight/bias gradient: per (channel, 32 x 32 tile) partial sums of every tap from shared-memory tiles;
//   a thread owns a tap row (or a chunk of it) and strips of 8 pixels, sliding a register window of inputs
//   along the row; the threads' sums are added in a fixed order per tile, then over tiles: deterministic,
//   no atomics. Channels-last: the same per-thread work with consecutive threads on consecutive channels,
//   read through the cache (tiles of 16 x 32, fewer rows where the pass would have too few threads; one
//   thread per tile, tap chunk and channel, so nothing to reduce within a tile). The CIM's channels-last passes
//   read a stored fp32 sum of the upsampled query and the memory, made by one element-wise pass.
// - Pools and the query gradient: one thread per output element; the avg pool backward is a gather, the max
//   pool backward passes one thread per window on a zero-filled gradient (adaptive_max_routed_grad).
// - CIM back end (max pool of z + gamma * ffn, B x H x W x C): one thread per pooled element, c fastest so a
//   warp reads consecutive channels; its gamma gradient sums grad_y * ffn[argmax] per (32-position split,
//   channel), then adds each channel's splits in order: deterministic, no atomics.
// - Conv + LayerNorm: a 256-thread block per tile of pixels x all channels (fp32 in shared memory); conv
//   outputs 8 pixels of a row per thread with the conv's register window, read from channels-last x (the
//   host copies NCHW x) with consecutive threads on consecutive channels; one warp per pixel for the channel
//   statistics, BHWC stores.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "ops.h"
#include "ops_host.h"

namespace deco {
namespace {

constexpr int kElementThreads = 256;

// The resident blocks per SM an element-wise op states as its __launch_bounds__ minimum (Op::kMinBlocksPerSM),
// which sets ptxas's register budget; 0, where an op states none, is the same as no minimum.
template <class Op, class = void>
struct MinBlocksPerSM {
  static constexpr int value = 0;
};
template <class Op>
struct MinBlocksPerSM<Op, std::void_t<decltype(Op::kMinBlocksPerSM)>> {
  static constexpr int value = Op::kMinBlocksPerSM;
};

template <class Op>
__global__ void __launch_bounds__(kElementThreads, MinBlocksPerSM<Op>::value) for_each_kernel(const Op op, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) op(e);
}

// Eight resident blocks per SM as the stated minimum (at most 64 registers): with no minimum ptxas held the
// kernel to 40 registers on sm_80 and put part of the upsampled source's register window on the stack.
constexpr int kConvMinBlocks = 8;

template <typename T, class Source, class Epilogue>
__global__ void __launch_bounds__(kConvThreads, kConvMinBlocks)
    conv_tiled_kernel(const ConvShape s, const ConvTiling tiling, const Source in, const ConvWeights weight,
                      const Epilogue epilogue, T* __restrict__ out, const Layout out_layout) {
  extern __shared__ float shared[];
  const int taps = s.kh * s.kw;
  float* channel_weight = shared;
  float* tile = shared + taps;
  int b, c, h0, w0;
  conv_tile_origin(s, tiling, blockIdx.x, b, c, h0, w0);
  const float* weights_of_c = weight.channel(c);
  for (int t = threadIdx.x; t < taps; t += kConvThreads) channel_weight[t] = weights_of_c[t * weight.tap_stride];
  // A warp stages whole rows, lanes on consecutive columns: coalesced NCHW reads, and no division per slot (the
  // row's part of the address and its bounds check are computed once per row).
  const int rows = conv_tile_rows(s.kh), cols = conv_tile_cols(s.kw);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int row = warp; row < rows; row += kConvThreads / kWarp)
    for (int col = lane; col < cols; col += kWarp)
      tile[row * cols + col] = halo_tile_value(in, s, b, c, h0, w0, row, col);
  __syncthreads();
  conv_tile_thread(tile, channel_weight, s, epilogue, out, out_layout, b, c, h0, w0, threadIdx.x);
}

static_assert(kGradTileW == kWarp, "the weight-gradient staging gives each lane of a warp one column");

// Four resident blocks per SM as the stated minimum (at most 64 registers): with no minimum ptxas held the
// kernel to 40 registers and spilled the upsampled source's window state to the stack on sm_80.
constexpr int kGradMinBlocks = 4;

template <typename T, class Source>
__global__ void __launch_bounds__(kGradThreads, kGradMinBlocks)
    weight_grad_partials_kernel(const ConvShape s, const GradTiling tiling, const GradWork work, const Source in,
                                const TensorSource<T> grad_out, const GradPartials partials) {
  extern __shared__ float shared[];
  const int in_rows = grad_input_rows(s.kh), in_cols = grad_input_cols(s.kw), pitch = grad_input_pitch(s.kw);
  float* gy_tile = shared;
  float* in_tile = gy_tile + kGradTileH * kGradOutPitch;
  float* sums = in_tile + in_rows * pitch;
  const int c = blockIdx.x / tiling.tiles, tile = blockIdx.x % tiling.tiles;
  int b, h0, w0;
  grad_tile_origin(tiling, tile, b, h0, w0);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int row = warp; row < kGradTileH; row += kGradThreads / kWarp)
    gy_tile[row * kGradOutPitch + lane] = grad_out_tile_value(grad_out, s, b, c, h0, w0, row, lane);
  for (int row = warp; row < in_rows; row += kGradThreads / kWarp)
    for (int col = lane; col < in_cols; col += kWarp)
      in_tile[row * pitch + col] = halo_tile_value(in, s, b, c, h0, w0, row, col);
  __syncthreads();
  weight_grad_thread_sums(gy_tile, in_tile, s, work, min(kGradTileH, s.height - h0), min(kGradTileW, s.width - w0),
                          threadIdx.x, sums);
  __syncthreads();
  for (int t = threadIdx.x; t <= s.kh * s.kw; t += kGradThreads)
    partials.data[partials.at(tile, c, t)] = weight_grad_tap_sum(sums, s, work, t);
}

// depthwise_conv2d_layernorm (kernel_math.h): one block per tile of pixels x all channels, the tile's fp32
// values in shared memory; each warp reduces whole pixels over channels.

// The xor butterfly of kernel_math.h's lane sums; every lane gets lane 0's total (the CPU build's value), so
// the lanes go on with bitwise the same statistic.
__device__ __forceinline__ float warp_butterfly_total(float sum) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return __shfl_sync(0xffffffffu, sum, 0);
}

// Two resident blocks per SM as the stated minimum: with no minimum, ptxas capped these kernels at 32-48
// registers and kept pass 1's loop state on the stack; this lets them take the 50-64 they need.
constexpr int kLayerNormMinBlocks = 2;

template <class Pass>
__global__ void __launch_bounds__(kLayerNormThreads, kLayerNormMinBlocks) conv_layernorm_forward_kernel(const Pass pass) {
  extern __shared__ float shared[];
  const int channels = pass.s.channels, elements = pass.tile_elements();
  float* y_tile = shared;
  float* mean_tile = shared + elements;
  float* rstd_tile = mean_tile + pass.tiling.pixels;
  const int tile = blockIdx.x;
  for (int w = threadIdx.x; w < pass.tile_strips(); w += kLayerNormThreads) pass.y_strip(tile, w, y_tile);
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int p = warp; p < pass.tiling.pixels; p += kLayerNormThreads / kWarp) {
    const float* row = y_tile + p * channels;
    const float mean = layer_norm_channel_mean(warp_butterfly_total(layer_norm_lane_sum(row, channels, lane)), channels);
    const float squares = warp_butterfly_total(layer_norm_lane_centred_squares(row, channels, lane, mean));
    if (lane == 0) pass.store_statistics(tile, p, mean, squares, mean_tile, rstd_tile);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < elements; e += kLayerNormThreads)
    pass.output_element(tile, e, y_tile, mean_tile, rstd_tile);
}

template <class Pass>
__global__ void __launch_bounds__(kLayerNormThreads, kLayerNormMinBlocks) conv_layernorm_backward_kernel(const Pass pass) {
  extern __shared__ float shared[];
  const int channels = pass.s.channels, elements = pass.tile_elements();
  float* xhat_tile = shared;
  float* g_tile = shared + elements;
  float* mean_g_tile = g_tile + elements;
  float* mean_g_xhat_tile = mean_g_tile + pass.tiling.pixels;
  const int tile = blockIdx.x;
  for (int w = threadIdx.x; w < pass.tile_strips(); w += kLayerNormThreads) pass.xhat_strip(tile, w, xhat_tile);
  for (int e = threadIdx.x; e < elements; e += kLayerNormThreads) pass.grad_out_element(tile, e, g_tile);
  __syncthreads();
  if (pass.partials != nullptr)
    for (int c = threadIdx.x; c < channels; c += kLayerNormThreads) pass.norm_partials(tile, c, xhat_tile, g_tile);
  if (pass.grad_y == nullptr) return;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int p = warp; p < pass.tiling.pixels; p += kLayerNormThreads / kWarp) {
    const float* g_row = g_tile + p * channels;
    const float mean_g = layer_norm_channel_mean(
        warp_butterfly_total(layer_norm_lane_scaled_sum(g_row, pass.norm_weight, channels, lane)), channels);
    const float mean_g_xhat = layer_norm_channel_mean(
        warp_butterfly_total(
            layer_norm_lane_scaled_dot(g_row, pass.norm_weight, xhat_tile + p * channels, channels, lane)),
        channels);
    if (lane == 0) {
      mean_g_tile[p] = mean_g;
      mean_g_xhat_tile[p] = mean_g_xhat;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < elements; e += kLayerNormThreads)
    pass.grad_y_element(tile, e, xhat_tile, g_tile, mean_g_tile, mean_g_xhat_tile);
}

int64_t blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= INT_MAX, "deco_kernels: ", n, " elements exceed one CUDA grid");
  return blocks;
}

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  template <class Op>
  static void for_each(const Op& op) {
    const int64_t n = op.size();
    if (n == 0) return;
    for_each_kernel<<<blocks_for(n, kElementThreads), kElementThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(op, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, class Source, class Epilogue>
  static void conv_tiled(const ConvShape& s, const Source& in, const ConvWeights& weight, const Epilogue& epilogue,
                         T* out, const Layout& out_layout) {
    const ConvTiling tiling = make_conv_tiling(s);
    TORCH_CHECK(tiling.blocks <= INT_MAX, "deco_kernels: ", tiling.blocks, " conv tiles exceed one CUDA grid");
    const size_t shared_bytes = sizeof(float) * (s.kh * s.kw + conv_tile_size(s));  // at most 20 KB for 31 x 31
    conv_tiled_kernel<T><<<tiling.blocks, kConvThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        s, tiling, in, weight, epilogue, out, out_layout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, class Source>
  static void weight_grad_partials(const ConvShape& s, const GradTiling& tiling, const Source& in,
                                   const TensorSource<T>& grad_out, const GradPartials& partials) {
    const int64_t blocks = static_cast<int64_t>(s.channels) * tiling.tiles;
    const size_t shared_bytes = sizeof(float) * grad_shared_floats(s);  // <= 29 KB (31 x 31)
    weight_grad_partials_kernel<T><<<blocks, kGradThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        s, tiling, make_grad_work(s), in, grad_out, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // depthwise_conv2d_layernorm: one block per tile (0 < pass.tiling.tiles <= INT_MAX, checked by the host).
  template <class Pass>
  static void conv_layernorm_forward(const Pass& pass) {
    const size_t shared_bytes = sizeof(float) * (pass.tile_elements() + 2 * pass.tiling.pixels);  // <= 16.25 KB
    conv_layernorm_forward_kernel<<<pass.tiling.tiles, kLayerNormThreads, shared_bytes,
                                    c10::cuda::getCurrentCUDAStream()>>>(pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <class Pass>
  static void conv_layernorm_backward(const Pass& pass) {
    const size_t shared_bytes = sizeof(float) * 2 * (pass.tile_elements() + pass.tiling.pixels);  // <= 32.25 KB
    conv_layernorm_backward_kernel<<<pass.tiling.tiles, kLayerNormThreads, shared_bytes,
                                     c10::cuda::getCurrentCUDAStream()>>>(pass);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

namespace cuda {
DECO_DEFINE_PRIMITIVES(CudaBackend)
DECO_DEFINE_CONV_LAYERNORM_PRIMITIVES(CudaBackend)
}  // namespace cuda
}  // namespace deco
