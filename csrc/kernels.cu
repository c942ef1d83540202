// CUDA kernels of deco_kernels and their launches on the current stream. The arithmetic is in kernel_math.h
// (shared with the CPU build); this file holds the CUDA-only parts: shared-memory staging, synchronisation,
// warp shuffles and launch geometry.
//
// Design for H100 at DECO's sizes (memory-bound small maps, 7x7 and 9x9 kernels):
// - NCHW conv: a 128-thread block stages a 16 x 64 output tile's input plus halo (fp32, zero-padded) and the
//   channel's weights in shared memory; each thread keeps 8 outputs of a row in registers and slides a
//   register window along the row, so one shared-memory load feeds 8 FMAs.
// - Channels-last conv: consecutive threads take consecutive channels (coalesced loads of the NHWC rows),
//   each computing 4 outputs of a row with the same register window, reading through L1.
// - Weight/bias gradient: per (channel, 16 x 32 tile) partial sums of every tap from shared-memory tiles,
//   reduced within a warp by xor shuffles, then a fixed-order sum over tiles: deterministic, no atomics.
// - Pools and the query gradient: one thread per output element; backward passes are gathers.
// - CIM back end (max pool of z + gamma * ffn, B x H x W x C): one thread per pooled element, c fastest so a
//   warp reads consecutive channels; its gamma gradient sums grad_y * ffn[argmax] per (32-position split,
//   channel), then adds each channel's splits in order: deterministic, no atomics.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "ops_host.h"

namespace deco {
namespace {

constexpr int kElementThreads = 256;

template <class Op>
__global__ void __launch_bounds__(kElementThreads) for_each_kernel(const Op op, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) op(e);
}

template <typename T, class Source, class Epilogue>
__global__ void __launch_bounds__(kConvThreads)
    conv_tiled_kernel(const ConvShape s, const ConvTiling tiling, const Source in, const float* __restrict__ weight,
                      const Epilogue epilogue, T* __restrict__ out, const Layout out_layout) {
  extern __shared__ float shared[];
  const int taps = s.kh * s.kw;
  float* channel_weight = shared;
  float* tile = shared + taps;
  int b, c, h0, w0;
  conv_tile_origin(s, tiling, blockIdx.x, b, c, h0, w0);
  for (int t = threadIdx.x; t < taps; t += kConvThreads) channel_weight[t] = weight[static_cast<int64_t>(c) * taps + t];
  const int tile_size = conv_tile_size(s);
  for (int e = threadIdx.x; e < tile_size; e += kConvThreads) tile[e] = conv_tile_element(in, s, b, c, h0, w0, e);
  __syncthreads();
  conv_tile_thread(tile, channel_weight, s, epilogue, out, out_layout, b, c, h0, w0, threadIdx.x);
}

template <typename T, class Source>
__global__ void __launch_bounds__(kGradThreads)
    weight_grad_partials_kernel(const ConvShape s, const GradTiling tiling, const Source in,
                                const TensorSource<T> grad_out, float* __restrict__ partials) {
  extern __shared__ float shared[];
  float* grad_tile = shared;
  float* input_tile = shared + kGradTileH * kGradTileW;
  const int c = blockIdx.x / tiling.tiles, tile = blockIdx.x % tiling.tiles;
  int b, h0, w0;
  grad_tile_origin(tiling, tile, b, h0, w0);
  for (int e = threadIdx.x; e < kGradTileH * kGradTileW; e += kGradThreads)
    grad_tile[e] = grad_out_tile_element(grad_out, s, b, c, h0, w0, e);
  const int input_size = grad_input_tile_size(s);
  for (int e = threadIdx.x; e < input_size; e += kGradThreads)
    input_tile[e] = grad_input_tile_element(in, s, b, c, h0, w0, e);
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int taps_with_bias = s.kh * s.kw + 1;
  for (int t = warp; t < taps_with_bias; t += kGradThreads / kWarp) {
    float sum = weight_grad_lane_sum(grad_tile, input_tile, s, t, lane);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) partials[(static_cast<int64_t>(c) * tiling.tiles + tile) * taps_with_bias + t] = sum;
  }
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
  static void conv_tiled(const ConvShape& s, const Source& in, const float* weight, const Epilogue& epilogue, T* out,
                         const Layout& out_layout) {
    const ConvTiling tiling = make_conv_tiling(s);
    TORCH_CHECK(tiling.blocks <= INT_MAX, "deco_kernels: ", tiling.blocks, " conv tiles exceed one CUDA grid");
    const size_t shared_bytes = sizeof(float) * (s.kh * s.kw + conv_tile_size(s));  // at most 20 KB for 31 x 31
    conv_tiled_kernel<T><<<tiling.blocks, kConvThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        s, tiling, in, weight, epilogue, out, out_layout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, class Source>
  static void weight_grad_partials(const ConvShape& s, const Source& in, const TensorSource<T>& grad_out,
                                   float* partials) {
    const GradTiling tiling = make_grad_tiling(s);
    const int64_t blocks = static_cast<int64_t>(s.channels) * tiling.tiles;
    const size_t shared_bytes = sizeof(float) * (kGradTileH * kGradTileW + grad_input_tile_size(s));  // <= 14 KB
    weight_grad_partials_kernel<T><<<blocks, kGradThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        s, tiling, in, grad_out, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

namespace cuda {
DECO_DEFINE_PRIMITIVES(CudaBackend)
}  // namespace cuda
}  // namespace deco
