// Index math and arithmetic of every deco_kernels kernel, shared by the CUDA kernels (kernels.cu) and their
// CPU builds (cpu_kernels.cpp).
//
// Why the CPU build tests the GPU kernels' math: everything a CUDA thread computes lives in these DECO_HD functions
// -- which input element a tile slot holds and its zero padding (halo_tile_value), the register-window tap loop of a
// conv strip (conv_strip), epilogues (bias, upsampled residual), nearest-upsampling source indices and their inverse
// footprints, the weight gradient's per-thread register-window sums and the order of their reduction, adaptive-pool
// windows, the first-maximum/NaN rule, the gather ranges of the avg pool backward and the routing of the max pool
// backward passes, the CIM back end's sum z + gamma * ffn and the split order of its gamma gradient. The CPU build
// walks the same grid as the GPU (tiles, threads, lanes; serially) and calls the same functions on the same fp32
// values, in the same order, with fmaf where the GPU uses an FMA, so a wrong index, halo, flip, footprint or
// reduction order fails on the CPU.
// What the CPU cannot check is the CUDA-only plumbing around them: shared-memory sizes, __syncthreads
// placement, launch bounds and the warp shuffles themselves (tests/test_cuda_kernels.py runs those on a GPU).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define DECO_HD __host__ __device__ __forceinline__
#define DECO_UNROLL _Pragma("unroll")
#else
#define DECO_HD inline
#define DECO_UNROLL _Pragma("GCC unroll 16")
#endif

namespace deco {

// ---------------------------------------------------------------------------------------------------------
// Tensors. Activations are B x C x H x W, contiguous either as NCHW or as channels-last (NHWC); one image
// (C*H*W elements) is checked to fit 32-bit indexing by the host, so only the batch offset is 64-bit.

struct Layout {
  int64_t batch;  // elements per image
  int channel, row, col;
  DECO_HD int64_t at(int b, int c, int h, int w) const {
    return b * batch + static_cast<int64_t>(c * channel + h * row + w * col);
  }
};

DECO_HD Layout make_layout(int C, int H, int W, bool channels_last) {
  Layout l;
  l.batch = static_cast<int64_t>(C) * H * W;
  l.channel = channels_last ? 1 : H * W;
  l.row = channels_last ? W * C : W;
  l.col = channels_last ? C : 1;
  return l;
}

// A stored activation read as fp32.
template <typename T>
struct TensorSource {
  using Element = T;
  const T* data;
  Layout layout;
  DECO_HD float operator()(int b, int c, int h, int w) const {
    return static_cast<float>(data[layout.at(b, c, h, w)]);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Nearest upsampling, exactly ATen's nearest_idx (legacy rule, no scale factor given): identity and exact 2x
// are special-cased, otherwise src = min(floor(dst * (float)in / out), in - 1) in float arithmetic.

DECO_HD int nearest_source_index(int dst, int in, int out) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const int src = static_cast<int>(floorf(static_cast<float>(dst) * scale));
  return src < in - 1 ? src : in - 1;
}

// [first, last) of the output positions whose source is `src` (empty when downsampling skips it). The source
// index is non-decreasing in dst, so the footprint is a run; the guess is corrected with the exact rule.
DECO_HD void nearest_footprint(int src, int in, int out, int& first, int& last) {
  int lo = static_cast<int>((static_cast<int64_t>(src) * out) / in);
  while (lo > 0 && nearest_source_index(lo - 1, in, out) >= src) --lo;
  while (lo < out && nearest_source_index(lo, in, out) < src) ++lo;
  int hi = lo;
  while (hi < out && nearest_source_index(hi, in, out) == src) ++hi;
  first = lo;
  last = hi;
}

// upsample_nearest(query) + memory, never materialised: each read recomputes the query's source cell.
template <typename T>
struct UpsampleSumSource {
  const T* query;
  Layout query_layout;
  int query_h, query_w;
  const T* memory;
  Layout memory_layout;
  int h, w;  // memory's (and the output's) spatial size
  DECO_HD float upsampled(int b, int c, int y, int x) const {
    const int qy = nearest_source_index(y, query_h, h);
    const int qx = nearest_source_index(x, query_w, w);
    return static_cast<float>(query[query_layout.at(b, c, qy, qx)]);
  }
  DECO_HD float operator()(int b, int c, int y, int x) const {
    return upsampled(b, c, y, x) + static_cast<float>(memory[memory_layout.at(b, c, y, x)]);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Depthwise 'same' convolution, stride 1. A pass computes out = epilogue(sum_taps w * in); the weight is per
// channel, row-major kh x kw, fp32. Grad input is the same-padded conv of grad y with the kernel flipped in
// both dimensions (kh - 1 = 2 * (kh / 2) for odd kh), read through ConvWeights' negative tap stride.

struct ConvShape {
  int batch, channels, height, width, kh, kw;
};

// Per-channel conv weights, fp32: tap t of channel c is channel(c)[t * tap_stride]. Channel-major (C x kh x kw:
// channel_stride kh * kw, tap_stride 1) where a warp shares one channel (a broadcast read), tap-major (kh x kw x C:
// 1, C) where consecutive threads take consecutive channels (a warp's read is then one line, not 32). A negative
// tap_stride from the last tap reads the kernel rotated by 180 degrees (the grad input's conv): for row-major
// kh x kw taps that is the flat tap order reversed, so no flipped copy is made.
struct ConvWeights {
  const float* data;
  int channel_stride, tap_stride;
  DECO_HD const float* channel(int c) const { return data + static_cast<int64_t>(c) * channel_stride; }
};

// NCHW: one block computes a kConvTileH x kConvTileW output tile of one plane from a shared-memory tile of
// the input with its halo; each thread computes kConvStrip consecutive outputs of one row in registers.
constexpr int kConvTileH = 16;
constexpr int kConvTileW = 64;
constexpr int kConvStrip = 8;
constexpr int kConvThreads = kConvTileH * (kConvTileW / kConvStrip);  // 128
// Channels-last: threads run along C (coalesced), each computing kConvStripCL outputs of one row, reading
// the input through the cache instead of a shared tile.
constexpr int kConvStripCL = 8;

DECO_HD int conv_tile_rows(int kh) { return kConvTileH + kh - 1; }
// Row pitch of the tile: odd, so that the 16 rows a warp's threads start on fall in distinct banks.
DECO_HD int conv_tile_cols(int kw) { return (kConvTileW + kw - 1) | 1; }
DECO_HD int conv_tile_size(const ConvShape& s) { return conv_tile_rows(s.kh) * conv_tile_cols(s.kw); }

// The input at (row, col) of a tile with halo whose outputs start at (h0, w0): the conv's and the weight
// gradient's shared tiles. Zero outside the image (the 'same' padding).
template <class Source>
DECO_HD float halo_tile_value(const Source& in, const ConvShape& s, int b, int c, int h0, int w0, int row, int col) {
  const int y = h0 - s.kh / 2 + row, x = w0 - s.kw / 2 + col;
  return (y >= 0 && y < s.height && x >= 0 && x < s.width) ? in(b, c, y, x) : 0.0f;
}

// acc[k] += sum_{i < kh, j < kw} weight[(i * kw + j) * tap_stride] * in(i, k + j) for k < N. `in(i, col)` reads
// the zero-padded input at tap row i and column col relative to the strip's first window; a strip reads columns
// 0 .. N + kw - 2 of each tap row, each once. The inputs stay in registers: a window of 2N columns serves N taps
// with constant register indices and then moves its upper half down (N moves per N taps, where a window shifted
// at every tap costs N - 1 moves per tap). tap_stride is 1 for one channel's kh x kw weights, C for tap-major
// (kh x kw x C) weights.
// acc[k] += tap * window[k + q] for k < N: one tap of a strip (q constant once unrolled).
template <int N>
DECO_HD void conv_strip_tap(float tap, const float (&window)[2 * N], int q, float (&acc)[N]) {
  DECO_UNROLL
  for (int k = 0; k < N; ++k) acc[k] = fmaf(tap, window[k + q], acc[k]);
}

template <int N, class Reader>
DECO_HD void conv_strip(const Reader& in, const float* weight, int tap_stride, int kh, int kw, float (&acc)[N]) {
  const int last_col = N + kw - 2;
  for (int i = 0; i < kh; ++i) {
    const float* row_weights = weight + i * kw * tap_stride;
    float window[2 * N];
    DECO_UNROLL
    for (int k = 0; k < N; ++k) window[k] = in(i, k);
    for (int j0 = 0; j0 < kw; j0 += N) {
      // Upper half: columns j0 + N .. j0 + 2N - 1; those past last_col are never multiplied by a tap (0).
      if (j0 + 2 * N - 1 <= last_col) {
        DECO_UNROLL
        for (int k = 0; k < N; ++k) window[N + k] = in(i, j0 + N + k);
      } else {
        DECO_UNROLL
        for (int k = 0; k < N; ++k) window[N + k] = j0 + N + k <= last_col ? in(i, j0 + N + k) : 0.0f;
      }
      // Whole blocks of N taps run without a per-tap bound check; only the last, partial one checks.
      if (j0 + N <= kw) {
        DECO_UNROLL
        for (int q = 0; q < N; ++q) conv_strip_tap<N>(row_weights[(j0 + q) * tap_stride], window, q, acc);
      } else {
        DECO_UNROLL
        for (int q = 0; q < N; ++q) {
          if (j0 + q == kw) break;
          conv_strip_tap<N>(row_weights[(j0 + q) * tap_stride], window, q, acc);
        }
      }
      DECO_UNROLL
      for (int k = 0; k < N; ++k) window[k] = window[N + k];
    }
  }
}

// Reads a strip's inputs from the shared (on the CPU: local) tile for thread `thread` of the NCHW block;
// consecutive threads take consecutive rows.
struct TileReader {
  const float* tile;
  int cols, row, col0;
  DECO_HD float operator()(int i, int col) const { return tile[(row + i) * cols + col0 + col]; }
};

DECO_HD TileReader tile_reader(const float* tile, const ConvShape& s, int thread) {
  TileReader r;
  r.tile = tile;
  r.cols = conv_tile_cols(s.kw);
  r.row = thread % kConvTileH;
  r.col0 = (thread / kConvTileH) * kConvStrip;
  return r;
}

// Reads a strip's inputs straight from the source (channels-last path), zero outside the image.
template <class Source>
struct DirectReader {
  Source in;
  ConvShape s;
  int b, c, y0, x0;  // input position of tap (0, 0) for the strip's first output
  DECO_HD float operator()(int i, int col) const {
    const int y = y0 + i, x = x0 + col;
    return (y >= 0 && y < s.height && x >= 0 && x < s.width) ? in(b, c, y, x) : 0.0f;
  }
};

// Reads a strip's inputs from a stored tensor where the strip's whole window lies inside the image: no padding,
// so no bound checks, and each read is a constant offset from the window's origin (the input at tap (0, 0) of
// the strip's first output).
template <typename T>
struct InteriorReader {
  const T* origin;
  int row, col;  // element strides of the tensor's rows and columns
  DECO_HD float operator()(int i, int c) const { return static_cast<float>(origin[i * row + c * col]); }
};

// An InteriorReader of a stored tensor whose window origin is (b, c, y, x).
template <typename T>
DECO_HD InteriorReader<T> interior_reader(const TensorSource<T>& in, int b, int c, int y, int x) {
  return InteriorReader<T>{in.data + in.layout.at(b, c, y, x), in.layout.row, in.layout.col};
}

template <class Source>
struct IsTensorSource : std::false_type {};
template <typename T>
struct IsTensorSource<TensorSource<T>> : std::true_type {};

// conv_strip of the N outputs of channel c from (y, x) along row y, read straight from the source: unchecked
// where the source is a stored tensor and the window lies inside the image (most strips of a large map), else
// through DirectReader's zero padding. Both give bitwise the same sums.
template <int N, class Source>
DECO_HD void direct_conv_strip(const Source& in, const ConvShape& s, const ConvWeights& weight, int b, int c, int y,
                               int x, float (&acc)[N]) {
  const int top = y - s.kh / 2, left = x - s.kw / 2;
  if constexpr (IsTensorSource<Source>::value) {
    if (top >= 0 && top + s.kh <= s.height && left >= 0 && left + N + s.kw - 1 <= s.width) {
      conv_strip(interior_reader(in, b, c, top, left), weight.channel(c), weight.tap_stride, s.kh, s.kw, acc);
      return;
    }
  }
  const DirectReader<Source> reader{in, s, b, c, top, left};
  conv_strip(reader, weight.channel(c), weight.tap_stride, s.kh, s.kw, acc);
}

struct ConvTiling {
  int tiles_h, tiles_w;
  int64_t blocks;  // B * C * tiles_h * tiles_w
};

DECO_HD ConvTiling make_conv_tiling(const ConvShape& s) {
  ConvTiling t;
  t.tiles_h = (s.height + kConvTileH - 1) / kConvTileH;
  t.tiles_w = (s.width + kConvTileW - 1) / kConvTileW;
  t.blocks = static_cast<int64_t>(s.batch) * s.channels * t.tiles_h * t.tiles_w;
  return t;
}

// Block `block` of the NCHW pass: plane (b, c) and the output tile's top-left corner (h0, w0).
DECO_HD void conv_tile_origin(const ConvShape& s, const ConvTiling& t, int64_t block, int& b, int& c, int& h0,
                              int& w0) {
  w0 = static_cast<int>(block % t.tiles_w) * kConvTileW;
  block /= t.tiles_w;
  h0 = static_cast<int>(block % t.tiles_h) * kConvTileH;
  block /= t.tiles_h;
  c = static_cast<int>(block % s.channels);
  b = static_cast<int>(block / s.channels);
}

// Epilogues: what is stored for an accumulated conv value at (b, c, y, x).
struct BiasEpilogue {
  const float* bias;  // C fp32 values or nullptr
  DECO_HD float operator()(int, int c, int, int, float acc) const { return bias ? acc + bias[c] : acc; }
};

template <typename T>
struct UpsampleResidualEpilogue {  // dwconv(u + m) + bias + u
  const float* bias;
  UpsampleSumSource<T> sum;
  DECO_HD float operator()(int b, int c, int y, int x, float acc) const {
    return (bias ? acc + bias[c] : acc) + sum.upsampled(b, c, y, x);
  }
};

// Writes a strip of N outputs starting at (y, x0), dropping those beyond the image.
template <int N, typename T, class Epilogue>
DECO_HD void conv_store_strip(const Epilogue& epilogue, const ConvShape& s, const Layout& out_layout, T* out,
                              int b, int c, int y, int x0, const float (&acc)[N]) {
  if (y >= s.height) return;
  DECO_UNROLL
  for (int k = 0; k < N; ++k) {
    const int x = x0 + k;
    if (x < s.width) out[out_layout.at(b, c, y, x)] = static_cast<T>(epilogue(b, c, y, x, acc[k]));
  }
}

// Thread `thread` of an NCHW block, once the block's input tile and channel weights are loaded.
template <typename T, class Epilogue>
DECO_HD void conv_tile_thread(const float* tile, const float* weight, const ConvShape& s, const Epilogue& epilogue,
                              T* out, const Layout& out_layout, int b, int c, int h0, int w0, int thread) {
  const TileReader reader = tile_reader(tile, s, thread);
  // Strips wholly outside the image (a map smaller than the tile, e.g. DECO's 25 x 42) store nothing.
  if (h0 + reader.row >= s.height || w0 + reader.col0 >= s.width) return;
  float acc[kConvStrip] = {};
  conv_strip(reader, weight, 1, s.kh, s.kw, acc);
  conv_store_strip(epilogue, s, out_layout, out, b, c, h0 + reader.row, w0 + reader.col0, acc);
}

// ---------------------------------------------------------------------------------------------------------
// Weight and bias gradients: grad_w[c, i, j] = sum_{b, y, x} gy[b, c, y, x] * in[b, c, y + i - kh/2, x + j - kw/2]
// and grad_b[c] = sum gy. One block per (channel, kGradTileH x kGradTileW tile of one image) stages that tile
// of grad y and the input tile with its halo in shared memory. The taps are split into units (tap row i, a
// chunk of at most kGradChunk consecutive tap columns); `groups` threads share a unit, each taking every
// groups-th strip of kGradStrip pixels of a row (strips wholly outside the image are skipped). A thread keeps
// its strip's grad y and the kGradStrip + taps - 1 inputs its taps meet in registers, so a strip costs
// kGradStrip + kGradStrip + taps - 1 shared reads for kGradStrip * taps FMAs (about a third of a read per FMA,
// where one thread per pixel and tap would read two). The threads' sums go to shared memory and each tap's
// partial over the tile is their fixed-order sum; a second pass adds the partials over tiles in a fixed order:
// deterministic, no atomics.

constexpr int kGradTileH = 32;
constexpr int kGradTileW = 32;
constexpr int kGradStrip = 8;
constexpr int kGradStripsPerRow = kGradTileW / kGradStrip;
constexpr int kGradStrips = kGradTileH * kGradStripsPerRow;
constexpr int kGradChunk = 9;  // kernels up to 9 wide in one chunk; wider ones in near-equal chunks (31: 8,8,8,7)
constexpr int kGradThreads = 256;
constexpr int kGradSlots = kGradChunk + 1;  // a thread's sums: its chunk's taps, then sum(gy) (unit 0 only)
constexpr int kWarp = 32;
// Row pitch of the grad y tile: odd, so that the strips a warp reads (consecutive strips: 8 rows x 4) start in
// distinct banks.
constexpr int kGradOutPitch = kGradTileW + 1;

struct GradTiling {
  int tile_h, tile_w;           // pixels of a tile (NCHW: kGradTileH x kGradTileW; channels-last: ...CL)
  int tiles_h, tiles_w, tiles;  // per-channel tile count over batch x rows x columns
};

DECO_HD GradTiling make_grad_tiling(const ConvShape& s, int tile_h, int tile_w) {
  GradTiling g;
  g.tile_h = tile_h;
  g.tile_w = tile_w;
  g.tiles_h = (s.height + tile_h - 1) / tile_h;
  g.tiles_w = (s.width + tile_w - 1) / tile_w;
  g.tiles = s.batch * g.tiles_h * g.tiles_w;
  return g;
}

DECO_HD void grad_tile_origin(const GradTiling& g, int tile, int& b, int& h0, int& w0) {
  b = tile / (g.tiles_h * g.tiles_w);
  const int rest = tile % (g.tiles_h * g.tiles_w);
  h0 = (rest / g.tiles_w) * g.tile_h;
  w0 = (rest % g.tiles_w) * g.tile_w;
}

// The per-tile partial sums of the weight gradient, fp32: partial (tile, channel c, tap t; t == kh * kw is the
// bias) at data[at(tile, c, t)]. Channel-major (one NCHW block writes one channel's taps of a tile together) or
// channel-fastest (the channels-last threads of a warp write consecutive channels).
struct GradPartials {
  float* data;
  int64_t tile_stride, channel_stride, tap_stride;
  DECO_HD int64_t at(int tile, int c, int t) const { return tile * tile_stride + c * channel_stride + t * tap_stride; }
  // Channel-major partials have a channel stride of tiles * (taps + 1) >= 2.
  DECO_HD bool channel_fastest() const { return channel_stride == 1; }
};

DECO_HD GradPartials make_grad_partials(float* data, const GradTiling& g, int channels, int taps_with_bias,
                                        bool channel_fastest) {
  GradPartials p;
  p.data = data;
  if (channel_fastest) {
    p.tile_stride = static_cast<int64_t>(taps_with_bias) * channels;
    p.channel_stride = 1;
    p.tap_stride = channels;
  } else {
    p.tile_stride = taps_with_bias;
    p.channel_stride = static_cast<int64_t>(g.tiles) * taps_with_bias;
    p.tap_stride = 1;
  }
  return p;
}

// How a block's threads share the taps: `units` = kh x `chunks` (units <= 31 x 4, so groups >= 2 for the
// kernels the host accepts, at most 31 x 31); thread t works on unit t / groups.
struct GradWork {
  int chunks, chunk_width, units, groups;
};

DECO_HD GradWork make_grad_work(const ConvShape& s) {
  GradWork w;
  w.chunks = (s.kw + kGradChunk - 1) / kGradChunk;
  w.chunk_width = (s.kw + w.chunks - 1) / w.chunks;
  w.units = s.kh * w.chunks;
  w.groups = kGradThreads / w.units;
  return w;
}

DECO_HD int grad_input_rows(int kh) { return kGradTileH + kh - 1; }
DECO_HD int grad_input_cols(int kw) { return kGradTileW + kw - 1; }
// Odd for the same reason as kGradOutPitch.
DECO_HD int grad_input_pitch(int kw) { return grad_input_cols(kw) | 1; }
// Floats of shared memory a block uses: the grad y tile, the input tile and the threads' sums.
DECO_HD int grad_shared_floats(const ConvShape& s) {
  return kGradTileH * kGradOutPitch + grad_input_rows(s.kh) * grad_input_pitch(s.kw) + kGradThreads * kGradSlots;
}

// grad y at (row, col) of the tile starting at (h0, w0); zero beyond the image, so those pixels add nothing.
template <class Source>
DECO_HD float grad_out_tile_value(const Source& gy, const ConvShape& s, int b, int c, int h0, int w0, int row,
                                  int col) {
  const int y = h0 + row, x = w0 + col;
  return (y < s.height && x < s.width) ? gy(b, c, y, x) : 0.0f;
}

// The inputs one strip reads for a chunk of taps, and one tap's products over the strip added to `sum`
// (q constant once unrolled: window and acc stay in registers).
constexpr int kGradWindow = kGradStrip + kGradChunk - 1;

DECO_HD void weight_grad_strip_tap(const float (&g)[kGradStrip], const float (&window)[kGradWindow], int q,
                                   float& sum) {
  DECO_UNROLL
  for (int k = 0; k < kGradStrip; ++k) sum = fmaf(g[k], window[k + q], sum);
}

// One strip's products for a chunk of `taps` taps: acc[q] += sum_k g[k] * input(k + q), where input(k) is the
// k-th input the strip meets from the chunk's first tap column, read once into the window.
template <class Input>
DECO_HD void weight_grad_strip(const float (&g)[kGradStrip], const Input& input, int taps, float (&acc)[kGradChunk]) {
  float window[kGradWindow];
  // A whole chunk (every 9-wide kernel) runs without per-tap bound checks; a shorter one checks.
  if (taps == kGradChunk) {
    DECO_UNROLL
    for (int k = 0; k < kGradWindow; ++k) window[k] = input(k);
    DECO_UNROLL
    for (int q = 0; q < kGradChunk; ++q) weight_grad_strip_tap(g, window, q, acc[q]);
  } else {
    DECO_UNROLL
    for (int k = 0; k < kGradWindow; ++k) window[k] = k < kGradStrip - 1 + taps ? input(k) : 0.0f;
    DECO_UNROLL
    for (int q = 0; q < kGradChunk; ++q) {
      if (q == taps) break;
      weight_grad_strip_tap(g, window, q, acc[q]);
    }
  }
}

// A strip's inputs in a row of the shared (on the CPU: local) input tile, from the chunk's first tap column.
struct TileRowInput {
  const float* row;
  DECO_HD float operator()(int k) const { return row[k]; }
};

// Thread `thread`'s sums over its strips, written to sums[thread * kGradSlots + q]: slot q < chunk_width holds
// tap (i, j0 + q) of its unit, slot kGradChunk sum(gy) (threads of unit 0, which between them see every strip).
// `rows` x `cols` is the part of the tile inside the image. Threads beyond units x groups write nothing.
DECO_HD void weight_grad_thread_sums(const float* gy_tile, const float* in_tile, const ConvShape& s,
                                     const GradWork& work, int rows, int cols, int thread, float* sums) {
  const int unit = thread / work.groups, group = thread % work.groups;
  if (unit >= work.units) return;
  const int i = unit / work.chunks, j0 = (unit % work.chunks) * work.chunk_width;
  const int taps = s.kw - j0 < work.chunk_width ? s.kw - j0 : work.chunk_width;
  const int pitch = grad_input_pitch(s.kw);
  float acc[kGradChunk] = {};
  float gy_sum = 0.0f;
  for (int strip = group; strip < kGradStrips; strip += work.groups) {
    const int row = strip / kGradStripsPerRow, col0 = (strip % kGradStripsPerRow) * kGradStrip;
    if (row >= rows || col0 >= cols) continue;
    const float* gy_row = gy_tile + row * kGradOutPitch + col0;
    float g[kGradStrip];
    DECO_UNROLL
    for (int k = 0; k < kGradStrip; ++k) g[k] = gy_row[k];
    weight_grad_strip(g, TileRowInput{in_tile + (row + i) * pitch + col0 + j0}, taps, acc);
    if (unit == 0) {
      DECO_UNROLL
      for (int k = 0; k < kGradStrip; ++k) gy_sum += g[k];
    }
  }
  float* out = sums + thread * kGradSlots;
  DECO_UNROLL
  for (int q = 0; q < kGradChunk; ++q) out[q] = acc[q];
  out[kGradChunk] = gy_sum;
}

// Tap t's partial over the tile (t == kh * kw: the bias): its unit's thread sums, added in group order.
DECO_HD float weight_grad_tap_sum(const float* sums, const ConvShape& s, const GradWork& work, int t) {
  int unit = 0, slot = kGradChunk;
  if (t < s.kh * s.kw) {
    const int i = t / s.kw, j = t % s.kw;
    unit = i * work.chunks + j / work.chunk_width;
    slot = j % work.chunk_width;
  }
  const float* p = sums + unit * work.groups * kGradSlots + slot;
  float total = 0.0f;
  for (int group = 0; group < work.groups; ++group) total += p[group * kGradSlots];
  return total;
}

// Fixed-order sum of the per-tile partials of (channel c, tap t).
DECO_HD float weight_grad_total(const GradPartials& partials, int tiles, int c, int t) {
  float sum = 0.0f;
  for (int tile = 0; tile < tiles; ++tile) sum += partials.data[partials.at(tile, c, t)];
  return sum;
}

// ---------------------------------------------------------------------------------------------------------
// Upsample-add-conv grad query: grad_u = grad_sum + gy (grad_sum = the transposed conv of gy, which is also
// grad memory), summed over each query cell's footprint in the memory grid.

template <typename T>
DECO_HD float query_grad_at(const TensorSource<T>& grad_sum, const TensorSource<T>& gy, int b, int c, int qy, int qx,
                            int query_h, int query_w, int h, int w) {
  int y0, y1, x0, x1;
  nearest_footprint(qy, query_h, h, y0, y1);
  nearest_footprint(qx, query_w, w, x0, x1);
  float sum = 0.0f;
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) sum += grad_sum(b, c, y, x) + gy(b, c, y, x);
  return sum;
}

// ---------------------------------------------------------------------------------------------------------
// Adaptive pooling, PyTorch's windows: rows [floor(i * H / oh), ceil((i + 1) * H / oh)).

DECO_HD int pool_start(int i, int in, int out) { return static_cast<int>((static_cast<int64_t>(i) * in) / out); }
DECO_HD int pool_end(int i, int in, int out) {
  return static_cast<int>(((static_cast<int64_t>(i) + 1) * in + out - 1) / out);
}

// [first, last) of the windows that contain input row (or column) y.
DECO_HD void pool_windows_containing(int y, int in, int out, int& first, int& last) {
  first = static_cast<int>((static_cast<int64_t>(y) * out) / in);
  const int64_t end = ((static_cast<int64_t>(y) + 1) * out + in - 1) / in;
  last = static_cast<int>(end < out ? end : out);
}

struct PoolShape {
  int batch, channels, height, width, out_h, out_w;
};

// Max over window (oy, ox) with PyTorch's rule: the first maximum in row-major order wins; a NaN wins over
// numbers and a later NaN over an earlier one. Returns the value; `index` gets y * W + x of the winner.
template <class Source>
DECO_HD float adaptive_max_at(const Source& in, const PoolShape& s, int b, int c, int oy, int ox, int64_t& index) {
  const int y0 = pool_start(oy, s.height, s.out_h), y1 = pool_end(oy, s.height, s.out_h);
  const int x0 = pool_start(ox, s.width, s.out_w), x1 = pool_end(ox, s.width, s.out_w);
  float best = -INFINITY;
  int64_t best_index = static_cast<int64_t>(y0) * s.width + x0;
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) {
      const float v = in(b, c, y, x);
      if (v > best || v != v) {
        best = v;
        best_index = static_cast<int64_t>(y) * s.width + x;
      }
    }
  index = best_index;
  return best;
}

template <class Source>
DECO_HD float adaptive_avg_at(const Source& in, const PoolShape& s, int b, int c, int oy, int ox) {
  const int y0 = pool_start(oy, s.height, s.out_h), y1 = pool_end(oy, s.height, s.out_h);
  const int x0 = pool_start(ox, s.width, s.out_w), x1 = pool_end(ox, s.width, s.out_w);
  float sum = 0.0f;
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) sum += in(b, c, y, x);
  return sum / static_cast<float>((y1 - y0) * (x1 - x0));
}

// The max pool backward routes grad y to the argmax: input (y, x) gets the sum of grad y over the windows whose
// argmax it is. It runs one thread per window, on a zero-filled grad x: the first window (row-major, the order
// of the sum) that picked an input adds up every window that picked it and writes it; the others write
// nothing. Deterministic and free of atomics like a gather over the inputs, but it visits only the pooled
// elements: the gather searched the windows of every input element (0.46 ms at stride 8, B 8 on an H100, where
// eager's zero fill and atomic scatter took 0.06 ms). Returns false when window (i, j) writes nothing,
// including for an index outside the window (possible only through the raw op), which a gather would route
// nowhere either.
template <typename T>
DECO_HD bool adaptive_max_routed_grad(const TensorSource<T>& gy, const int64_t* indices, const Layout& index_layout,
                                      const PoolShape& s, int b, int c, int i, int j, int& y, int& x, float& sum) {
  const int64_t picked = indices[index_layout.at(b, c, i, j)];
  if (picked < 0 || picked >= static_cast<int64_t>(s.height) * s.width) return false;
  y = static_cast<int>(picked / s.width);
  x = static_cast<int>(picked % s.width);
  int i0, i1, j0, j1;
  pool_windows_containing(y, s.height, s.out_h, i0, i1);
  pool_windows_containing(x, s.width, s.out_w, j0, j1);
  if (i < i0 || i >= i1 || j < j0 || j >= j1) return false;
  bool first = true;
  sum = 0.0f;
  for (int wi = i0; wi < i1; ++wi)
    for (int wj = j0; wj < j1; ++wj)
      if (indices[index_layout.at(b, c, wi, wj)] == picked) {
        if (first && (wi != i || wj != j)) return false;  // an earlier window writes this input
        first = false;
        sum += gy(b, c, wi, wj);
      }
  return true;
}

template <typename T>
DECO_HD float adaptive_avg_grad_at(const TensorSource<T>& gy, const PoolShape& s, int b, int c, int y, int x) {
  int i0, i1, j0, j1;
  pool_windows_containing(y, s.height, s.out_h, i0, i1);
  pool_windows_containing(x, s.width, s.out_w, j0, j1);
  float sum = 0.0f;
  for (int i = i0; i < i1; ++i) {
    const int rows = pool_end(i, s.height, s.out_h) - pool_start(i, s.height, s.out_h);
    for (int j = j0; j < j1; ++j) {
      const int cols = pool_end(j, s.width, s.out_w) - pool_start(j, s.width, s.out_w);
      sum += gy(b, c, i, j) / static_cast<float>(rows * cols);
    }
  }
  return sum;
}

// ---------------------------------------------------------------------------------------------------------
// The CIM back end adaptive_max_pool2d(z + gamma * ffn): z and ffn are B x H x W x C, which is the memory of a
// channels-last B x C x H x W map, so they are read through a channels-last Layout and pooled with
// adaptive_max_at like any other source.

// z + gamma * ffn, formed in fp32 (one FMA, so the CPU build rounds exactly as the GPU) and never stored.
template <typename T>
struct ScaleResidualSource {
  const T* z;
  const T* ffn;
  Layout layout;       // of both z and ffn (dense B x H x W x C)
  const float* gamma;  // C
  DECO_HD float ffn_at(int b, int c, int y, int x) const { return static_cast<float>(ffn[layout.at(b, c, y, x)]); }
  DECO_HD float operator()(int b, int c, int y, int x) const {
    const int64_t at = layout.at(b, c, y, x);
    return fmaf(gamma[c], static_cast<float>(ffn[at]), static_cast<float>(z[at]));
  }
};

// grad gamma[c] = sum over pooled positions (b, i, j) of grad_y * ffn[argmax]. Positions are cut into splits of
// kGammaSplitPositions consecutive (b, i, j); one thread sums a split of one channel, then a second pass adds
// the splits of each channel in order: deterministic, no float atomics.
constexpr int kGammaSplitPositions = 32;

DECO_HD int64_t gamma_grad_splits(int64_t positions) {
  return (positions + kGammaSplitPositions - 1) / kGammaSplitPositions;
}

// Decomposes a flat element index of a B x C x H x W grid, fastest dimension last in the given layout, so
// consecutive threads touch consecutive memory in either layout.
DECO_HD void unflatten(int64_t e, int C, int H, int W, bool channels_last, int& b, int& c, int& y, int& x) {
  if (channels_last) {
    c = static_cast<int>(e % C);
    e /= C;
    x = static_cast<int>(e % W);
    e /= W;
    y = static_cast<int>(e % H);
    b = static_cast<int>(e / H);
  } else {
    x = static_cast<int>(e % W);
    e /= W;
    y = static_cast<int>(e % H);
    e /= H;
    c = static_cast<int>(e % C);
    b = static_cast<int>(e / C);
  }
}


// ---------------------------------------------------------------------------------------------------------
// Element-wise passes: one call per output element e (a GPU thread; a CPU loop iteration), elements ordered
// so that consecutive e are consecutive in memory.

// Channels-last conv: element e is (b, y, strip, c) with c fastest.
template <typename T, class Source, class Epilogue>
struct ConvDirectOp {
  ConvShape s;
  Source in;
  ConvWeights weight;  // tap-major: the consecutive channels of a warp read consecutive weights
  Epilogue epilogue;
  T* out;
  Layout out_layout;
  DECO_HD int64_t size() const {
    return static_cast<int64_t>(s.batch) * s.height * strips() * s.channels;
  }
  DECO_HD int strips() const { return (s.width + kConvStripCL - 1) / kConvStripCL; }
  DECO_HD void operator()(int64_t e) const {
    const int c = static_cast<int>(e % s.channels);
    e /= s.channels;
    const int strip = static_cast<int>(e % strips());
    e /= strips();
    const int y = static_cast<int>(e % s.height);
    const int b = static_cast<int>(e / s.height);
    const int x0 = strip * kConvStripCL;
    float acc[kConvStripCL] = {};
    direct_conv_strip(in, s, weight, b, c, y, x0, acc);
    conv_store_strip(epilogue, s, out_layout, out, b, c, y, x0, acc);
  }
};

// Channels-last weight and bias gradients, one thread per (tile, unit, channel): element
// e = (tile * units + unit) * C + c, so consecutive threads take consecutive channels and each read of a warp is
// one line of the NHWC tensors; no shared-memory staging and no NCHW copy. A thread sums its unit's taps
// (GradWork) over every strip of kGradStrip pixels of its tile (up to kGradTileHCL x kGradTileWCL) of one image with
// the NCHW threads' register window (weight_grad_strip), reading through the cache. Each (tile, channel, tap)
// has one owner, so its partial is written, not reduced; unit 0 also sums grad y (the bias).
constexpr int kGradTileHCL = 16;
constexpr int kGradTileWCL = 32;
static_assert(kGradTileWCL % kGradStrip == 0, "strips must not cross channels-last tiles");

// With one thread per (tile, unit, channel), a small batch or map leaves a large GPU idle (DECO-R18's CIM at
// batch 2: 8 tiles of 16 x 32, 35k threads, 272 us per call on an H100). Tiles get fewer rows (halved down to
// kGradTileMinHCL) until the pass has kGradMinThreadsCL threads. The choice depends on the shape alone, so the
// order of the sums, and with it the result, is the same on every device.
constexpr int kGradTileMinHCL = 2;
constexpr int64_t kGradMinThreadsCL = int64_t{1} << 17;

DECO_HD GradTiling channels_last_grad_tiling(const ConvShape& s) {
  const int64_t threads_per_tile = static_cast<int64_t>(make_grad_work(s).units) * s.channels;
  GradTiling g = make_grad_tiling(s, kGradTileHCL, kGradTileWCL);
  while (g.tile_h > kGradTileMinHCL && g.tiles * threads_per_tile < kGradMinThreadsCL)
    g = make_grad_tiling(s, g.tile_h / 2, kGradTileWCL);
  return g;
}

// A strip's inputs read straight from a reader (DirectReader or InteriorReader): tap row `row`, from column
// col0. The reader is held by value: a reference would give it an address, and ptxas then kept it on the stack.
template <class Reader>
struct ReaderRowInput {
  Reader reader;
  int row, col0;
  DECO_HD float operator()(int k) const { return reader(row, col0 + k); }
};

// One thread's sums over the rows x cols pixels of its tile: acc[q] over its unit's taps, gy_sum (with_bias)
// over grad y. `gy` reads grad y from the tile's corner, `input` the input at the unit's first tap of it.
template <class GradReader, class InputReader>
DECO_HD void weight_grad_tile_sums(const GradReader& gy, const InputReader& input, int rows, int cols, int taps,
                                   bool with_bias, float (&acc)[kGradChunk], float& gy_sum) {
  for (int row = 0; row < rows; ++row) {
    for (int col0 = 0; col0 < cols; col0 += kGradStrip) {
      float g[kGradStrip];
      DECO_UNROLL
      for (int k = 0; k < kGradStrip; ++k) g[k] = gy(row, col0 + k);
      weight_grad_strip(g, ReaderRowInput<InputReader>{input, row, col0}, taps, acc);
      if (with_bias) {
        DECO_UNROLL
        for (int k = 0; k < kGradStrip; ++k) gy_sum += g[k];
      }
    }
  }
}

template <typename T, class Source>
struct WeightGradDirectOp {
  // Two resident blocks of 256 threads per SM as the CUDA launch's stated minimum (up to 128 registers; it takes
  // 64-85): with no minimum ptxas held the upsampled source's variant to 64 registers and spilled.
  static constexpr int kMinBlocksPerSM = 2;
  ConvShape s;
  GradTiling tiling;  // channels_last_grad_tiling's
  GradWork work;
  Source in;
  TensorSource<T> grad_out;
  GradPartials partials;  // channel-fastest
  DECO_HD int64_t size() const { return static_cast<int64_t>(tiling.tiles) * work.units * s.channels; }
  DECO_HD void operator()(int64_t e) const {
    const int c = static_cast<int>(e % s.channels);
    e /= s.channels;
    const int unit = static_cast<int>(e % work.units), tile = static_cast<int>(e / work.units);
    int b, h0, w0;
    grad_tile_origin(tiling, tile, b, h0, w0);
    const int i = unit / work.chunks, j0 = (unit % work.chunks) * work.chunk_width;
    const int taps = s.kw - j0 < work.chunk_width ? s.kw - j0 : work.chunk_width;
    const int rows = s.height - h0 < tiling.tile_h ? s.height - h0 : tiling.tile_h;
    const int cols = s.width - w0 < tiling.tile_w ? s.width - w0 : tiling.tile_w;
    // grad y of the tile's pixels, and the input at tap (i, j0) of each of them (window origin top, left).
    const int top = h0 + i - s.kh / 2, left = w0 + j0 - s.kw / 2;
    float acc[kGradChunk] = {};
    float gy_sum = 0.0f;
    bool interior = false;
    if constexpr (IsTensorSource<Source>::value) {
      // A whole tile whose window (the last strip's reads end taps - 1 columns past the tile) lies inside the
      // image: no padding, so unchecked reads at constant offsets; the same sums in the same order.
      interior = rows == tiling.tile_h && cols == tiling.tile_w && top >= 0 && top + rows <= s.height &&
                 left >= 0 && left + cols + taps - 1 <= s.width;
      if (interior)
        weight_grad_tile_sums(interior_reader(grad_out, b, c, h0, w0), interior_reader(in, b, c, top, left), rows,
                              cols, taps, unit == 0, acc, gy_sum);
    }
    if (!interior) {  // zero beyond the image: grad y past it adds nothing, the input there is the padding
      const DirectReader<TensorSource<T>> gy{grad_out, s, b, c, h0, w0};
      const DirectReader<Source> input{in, s, b, c, top, left};
      weight_grad_tile_sums(gy, input, rows, cols, taps, unit == 0, acc, gy_sum);
    }
    DECO_UNROLL
    for (int q = 0; q < kGradChunk; ++q) {
      if (q == taps) break;
      partials.data[partials.at(tile, c, i * s.kw + j0 + q)] = acc[q];
    }
    if (unit == 0) partials.data[partials.at(tile, c, s.kh * s.kw)] = gy_sum;
  }
};

// Element e: the total of (channel c, tap t) over all tiles (t == kh * kw: the bias), numbered as the partials
// are laid out -- e = t * C + c for channel-fastest partials, else e = c * (kh * kw + 1) + t -- so that
// consecutive threads read consecutive partials.
struct WeightGradReduceOp {
  GradPartials partials;
  int tiles, channels, taps;
  float* grad_weight;  // C x taps
  float* grad_bias;    // C
  DECO_HD int64_t size() const { return static_cast<int64_t>(channels) * (taps + 1); }
  DECO_HD void operator()(int64_t e) const {
    const bool channel_fastest = partials.channel_fastest();
    const int c = static_cast<int>(channel_fastest ? e % channels : e / (taps + 1));
    const int t = static_cast<int>(channel_fastest ? e / channels : e % (taps + 1));
    const float total = weight_grad_total(partials, tiles, c, t);
    if (t < taps)
      grad_weight[static_cast<int64_t>(c) * taps + t] = total;
    else
      grad_bias[c] = total;
  }
};

// Element e of a channels-last B x H x W x C map (c fastest): upsample_nearest(query) + memory stored as fp32,
// the input of upsample_add_conv's channels-last conv passes. Those read each input about 2 * kh times straight
// from the source; from UpsampleSumSource each read redoes the nearest-index arithmetic and loads two tensors
// (the channels-last CIM front took 2-3x the NCHW one's time on an H100), from this map it is one load. The
// stored value is the fp32 sum the source returns, so the conv sums are bitwise the same.
template <typename T>
struct UpsampleSumStoreOp {
  ConvShape s;  // the memory's shape
  UpsampleSumSource<T> sum;
  float* out;
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.height * s.width; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, y, x;
    unflatten(e, s.channels, s.height, s.width, true, b, c, y, x);
    out[e] = sum(b, c, y, x);
  }
};

template <typename T>
struct QueryGradOp {
  ConvShape s;  // the memory's shape
  int query_h, query_w;
  bool channels_last;
  TensorSource<T> grad_sum, grad_out;
  T* grad_query;
  Layout query_layout;
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * query_h * query_w; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, qy, qx;
    unflatten(e, s.channels, query_h, query_w, channels_last, b, c, qy, qx);
    grad_query[query_layout.at(b, c, qy, qx)] = static_cast<T>(
        query_grad_at(grad_sum, grad_out, b, c, qy, qx, query_h, query_w, s.height, s.width));
  }
};

template <typename T>
struct MaxPoolForwardOp {
  PoolShape s;
  bool channels_last;
  TensorSource<T> in;
  T* out;
  int64_t* indices;
  Layout out_layout;
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.out_h * s.out_w; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, oy, ox;
    unflatten(e, s.channels, s.out_h, s.out_w, channels_last, b, c, oy, ox);
    int64_t index;
    const float best = adaptive_max_at(in, s, b, c, oy, ox, index);
    out[out_layout.at(b, c, oy, ox)] = static_cast<T>(best);
    indices[out_layout.at(b, c, oy, ox)] = index;
  }
};

// Element e: a pooled window (b, c, i, j), in the order of `channels_last`; grad_in must be zero-filled before
// (adaptive_max_routed_grad writes only the inputs some window picked).
template <typename T>
struct MaxPoolBackwardOp {
  PoolShape s;
  bool channels_last;
  TensorSource<T> grad_out;  // laid out like indices
  const int64_t* indices;
  T* grad_in;
  Layout in_layout;
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.out_h * s.out_w; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, i, j, y, x;
    float sum;
    unflatten(e, s.channels, s.out_h, s.out_w, channels_last, b, c, i, j);
    if (adaptive_max_routed_grad(grad_out, indices, grad_out.layout, s, b, c, i, j, y, x, sum))
      grad_in[in_layout.at(b, c, y, x)] = static_cast<T>(sum);
  }
};

template <typename T>
struct AvgPoolForwardOp {
  PoolShape s;
  bool channels_last;
  TensorSource<T> in;
  T* out;
  Layout out_layout;
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.out_h * s.out_w; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, oy, ox;
    unflatten(e, s.channels, s.out_h, s.out_w, channels_last, b, c, oy, ox);
    out[out_layout.at(b, c, oy, ox)] = static_cast<T>(adaptive_avg_at(in, s, b, c, oy, ox));
  }
};

template <typename T>
struct AvgPoolBackwardOp {
  PoolShape s;
  bool channels_last;
  TensorSource<T> grad_out;
  T* grad_in;
  Layout in_layout;
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.height * s.width; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, y, x;
    unflatten(e, s.channels, s.height, s.width, channels_last, b, c, y, x);
    grad_in[in_layout.at(b, c, y, x)] = static_cast<T>(adaptive_avg_grad_at(grad_out, s, b, c, y, x));
  }
};

// Forward of the CIM back end: element e is a pooled (b, c, oy, ox), c fastest (all outputs are channels-last).
// Besides the max and its argmax it stores ffn at the argmax, all the gamma gradient needs of ffn.
template <typename T>
struct ScaleResidualMaxPoolForwardOp {
  PoolShape s;
  ScaleResidualSource<T> sum;
  T* out;
  int64_t* indices;
  T* picked_ffn;
  Layout out_layout;  // of out, indices and picked_ffn
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.out_h * s.out_w; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, oy, ox;
    unflatten(e, s.channels, s.out_h, s.out_w, true, b, c, oy, ox);
    int64_t index;
    const float best = adaptive_max_at(sum, s, b, c, oy, ox, index);
    const int64_t at = out_layout.at(b, c, oy, ox);
    out[at] = static_cast<T>(best);
    indices[at] = index;
    picked_ffn[at] = static_cast<T>(
        sum.ffn_at(b, c, static_cast<int>(index / s.width), static_cast<int>(index % s.width)));
  }
};

// Element e: a pooled window (b, c, i, j), c fastest; grad z and grad ffn must be zero-filled before. Where the
// window is the first to pick its input, writes the routed gradient of the sum there, and gamma times it.
template <typename T>
struct ScaleResidualMaxPoolBackwardOp {
  PoolShape s;
  TensorSource<T> grad_out;  // channels-last, laid out like indices
  const int64_t* indices;
  const float* gamma;
  T* grad_z;
  T* grad_ffn;
  Layout in_layout;  // of grad_z and grad_ffn (dense B x H x W x C)
  DECO_HD int64_t size() const { return static_cast<int64_t>(s.batch) * s.channels * s.out_h * s.out_w; }
  DECO_HD void operator()(int64_t e) const {
    int b, c, i, j, y, x;
    float grad_sum;
    unflatten(e, s.channels, s.out_h, s.out_w, true, b, c, i, j);
    if (!adaptive_max_routed_grad(grad_out, indices, grad_out.layout, s, b, c, i, j, y, x, grad_sum)) return;
    const int64_t at = in_layout.at(b, c, y, x);
    grad_z[at] = static_cast<T>(grad_sum);
    grad_ffn[at] = static_cast<T>(gamma[c] * grad_sum);
  }
};

// Element e = split * C + c (c fastest: consecutive threads read consecutive channels of the channels-last
// pooled maps): partials[e] = the sum of grad_y * picked_ffn over the split's positions, in order.
template <typename T>
struct GammaGradPartialsOp {
  PoolShape s;
  TensorSource<T> grad_out, picked_ffn;  // B x C x out_h x out_w
  float* partials;                       // splits x C
  int64_t splits;
  DECO_HD int64_t size() const { return splits * s.channels; }
  DECO_HD void operator()(int64_t e) const {
    const int c = static_cast<int>(e % s.channels);
    const int64_t split = e / s.channels;
    const int64_t positions = static_cast<int64_t>(s.batch) * s.out_h * s.out_w;
    const int64_t first = split * kGammaSplitPositions;
    const int64_t last = first + kGammaSplitPositions < positions ? first + kGammaSplitPositions : positions;
    float sum = 0.0f;
    for (int64_t p = first; p < last; ++p) {
      const int ox = static_cast<int>(p % s.out_w);
      const int oy = static_cast<int>((p / s.out_w) % s.out_h);
      const int b = static_cast<int>(p / (static_cast<int64_t>(s.out_w) * s.out_h));
      sum = fmaf(grad_out(b, c, oy, ox), picked_ffn(b, c, oy, ox), sum);
    }
    partials[e] = sum;
  }
};

// Element c: grad_gamma[c] = the sum of channel c's split partials, in split order.
struct GammaGradReduceOp {
  const float* partials;  // splits x channels
  int64_t splits;
  int channels;
  float* grad_gamma;
  DECO_HD int64_t size() const { return channels; }
  DECO_HD void operator()(int64_t c) const {
    float sum = 0.0f;
    for (int64_t split = 0; split < splits; ++split) sum += partials[split * channels + c];
    grad_gamma[c] = sum;
  }
};

// ---------------------------------------------------------------------------------------------------------
// depthwise_conv2d_layernorm: LayerNorm over the channels of the depthwise conv output, written B x H x W x C,
// without writing the conv output. One block per tile of `pixels` consecutive flat pixels (h * W + w) of one
// image times all C channels; the tile's fp32 values live in shared memory (on the CPU: a local buffer),
// row-major by pixel. Passes of a block, separated by barriers:
//   1. every thread computes conv outputs of the tile, kLayerNormStrip consecutive pixels of one channel at a
//      time with the register window of conv_strip (a strip that crosses image rows takes one window per row
//      it touches), from a channels-last x (the host copies NCHW x): strips are numbered channels fastest, so a
//      warp's load is one line. (From NCHW x a warp's lanes would span up to 16 channel planes, a line each,
//      and each load would cost the L1 about 16 times as much.) The backward also reads grad_out here, by
//      element, channels fastest;
//   2. each warp reduces whole pixels over channels: per-lane sums, the xor butterfly, lane 0's total;
//   3. every thread writes tile elements (forward: BHWC out, c fastest; backward: grad of the conv output in
//      x's format).
// The backward's norm_weight/norm_bias gradients: each block sums its pixels per channel in a fixed order
// into its own row of a partials buffer, and a second pass adds the rows in a fixed order (no atomics).

constexpr int kLayerNormMaxChannels = 2048;
constexpr int kLayerNormThreads = 256;
constexpr int kLayerNormTileElements = 4096;  // 16 KB of fp32 per tile buffer; >= kLayerNormMaxChannels
constexpr int kLayerNormMaxPixels = 32;
// A small batch of small maps gives few tiles (the SIM's 10 x 10 maps at batch 2: 25 tiles of 8 pixels, blocks
// for a fifth of an H100's SMs): tiles then get fewer pixels (halved, down to kLayerNormMinPixels) until there
// are kLayerNormMinTiles. The choice depends on the shape alone, so the norm-parameter sums' order, and with it
// the result, is the same on every device.
constexpr int kLayerNormMinTiles = 256;
constexpr int kLayerNormMinPixels = 2;
// Conv outputs per thread in pass 1: a row of kh x kw taps costs kLayerNormStrip + kw - 1 reads, not
// kLayerNormStrip * kw: (8 + 8 + 9) / 72 = 0.35 reads per FMA at 9 x 9, where strips of 4 read 0.58 (pass 1 is
// bound by L1 reads, one per clock against four warp FMAs). At C = 480 a tile is 8 pixels, one strip a channel.
constexpr int kLayerNormStrip = 8;

// Tiles are numbered with ints (the host checks that they fit): a 64-bit division is a subroutine call on
// the GPU, whose register saves put loop invariants on the stack.
struct LayerNormTiling {
  int pixels;           // pixels per tile: as many as fit kLayerNormTileElements, at most kLayerNormMaxPixels,
                        // fewer where that leaves fewer than kLayerNormMinTiles tiles
  int tiles_per_image;  // tiles of one image's H * W pixels
  int64_t tiles;        // B * tiles_per_image, one block each
  int image_pixels;     // H * W
  int strips;           // strips of kLayerNormStrip pixel slots per channel (the last one may be shorter)

  DECO_HD int image(int tile) const { return tile / tiles_per_image; }
  // The end of the strip that starts at pixel slot p0.
  DECO_HD int strip_end(int p0) const { return p0 + kLayerNormStrip < pixels ? p0 + kLayerNormStrip : pixels; }
  // Pixel slot p of a tile: its h * W + w in the image (>= image_pixels: past the image's end) ...
  DECO_HD int pixel(int tile, int p) const { return (tile % tiles_per_image) * pixels + p; }
  // ... and its flat (b, h, w) index into B x H x W (x C) tensors.
  DECO_HD int64_t flat_pixel(int tile, int p) const {
    return static_cast<int64_t>(image(tile)) * image_pixels + pixel(tile, p);
  }
};

DECO_HD int layer_norm_tiles_per_image(const ConvShape& s, int pixels) {
  return (s.height * s.width + pixels - 1) / pixels;
}

DECO_HD LayerNormTiling make_layer_norm_tiling(const ConvShape& s) {
  LayerNormTiling t;
  const int fit = kLayerNormTileElements / s.channels;
  t.pixels = fit < kLayerNormMaxPixels ? fit : kLayerNormMaxPixels;
  while (t.pixels > kLayerNormMinPixels &&
         static_cast<int64_t>(s.batch) * layer_norm_tiles_per_image(s, t.pixels) < kLayerNormMinTiles)
    t.pixels = t.pixels / 2 > kLayerNormMinPixels ? t.pixels / 2 : kLayerNormMinPixels;
  t.tiles_per_image = layer_norm_tiles_per_image(s, t.pixels);
  t.tiles = static_cast<int64_t>(s.batch) * t.tiles_per_image;
  t.image_pixels = s.height * s.width;
  t.strips = (t.pixels + kLayerNormStrip - 1) / kLayerNormStrip;
  return t;
}

// Item e of a tile's `pixels` x `channels` grid (pixel slots, or strips of them in pass 1): slot p and
// channel c, with c fastest when `channels_fastest`, else p.
DECO_HD void layer_norm_tile_slot(int e, int pixels, int channels, bool channels_fastest, int& p, int& c) {
  if (channels_fastest) {
    p = e / channels;
    c = e % channels;
  } else {
    c = e / pixels;
    p = e % pixels;
  }
}

// The depthwise 'same' conv output (+ bias) at one position: the strip pass of one output.
template <class Source>
DECO_HD float conv_output_at(const Source& in, const ConvWeights& weight, const float* bias, const ConvShape& s,
                             int b, int c, int y, int x) {
  float acc[1] = {};
  direct_conv_strip(in, s, weight, b, c, y, x, acc);
  return BiasEpilogue{bias}(b, c, y, x, acc[0]);
}

// Pass 1 of both directions: the conv outputs (+ bias) of channel c at pixel slots [p0, p0 + kLayerNormStrip)
// of the tile (those inside it), each handed to store(p, value); a slot past the image's end gets
// store(p, 0). The slots of each image row the strip touches share one conv_strip register window (a lone
// slot in a row takes conv_output_at); the sums are those of conv_output_at (same taps, same order), so
// either way gives bitwise the same value.
template <class Source, class Store>
DECO_HD void layer_norm_conv_strip(const Source& in, const ConvWeights& weight, const float* bias, const ConvShape& s,
                                   const LayerNormTiling& tiling, int tile, int c, int p0, const Store& store) {
  const int end = tiling.strip_end(p0);
  const int b = tiling.image(tile);
  for (int p = p0; p < end;) {
    const int pixel = tiling.pixel(tile, p);
    if (pixel >= tiling.image_pixels) {  // the rest of the strip is past the image's end too
      for (; p < end; ++p) store(p, 0.0f);
      return;
    }
    const int y = pixel / s.width, x = pixel % s.width;
    const int run = end - p < s.width - x ? end - p : s.width - x;  // the strip's slots in row y
    if (run == 1) {
      store(p, conv_output_at(in, weight, bias, s, b, c, y, x));
    } else {
      float acc[kLayerNormStrip] = {};
      direct_conv_strip(in, s, weight, b, c, y, x, acc);
      // Constant indices into acc once unrolled: a variable one would put it on the stack.
      DECO_UNROLL
      for (int k = 0; k < kLayerNormStrip; ++k)
        if (k < run) store(p + k, BiasEpilogue{bias}(b, c, y, x + k, acc[k]));
    }
    p += run;
  }
}

// Lane `lane`'s share of sum_c row[c], of sum_c (row[c] - mean)^2 and of sum_c a[c] * w[c] (* b[c]), over
// c = lane, lane + 32, ...
DECO_HD float layer_norm_lane_sum(const float* row, int channels, int lane) {
  float sum = 0.0f;
  for (int c = lane; c < channels; c += kWarp) sum += row[c];
  return sum;
}

DECO_HD float layer_norm_lane_centred_squares(const float* row, int channels, int lane, float mean) {
  float sum = 0.0f;
  for (int c = lane; c < channels; c += kWarp) {
    const float d = row[c] - mean;
    sum = fmaf(d, d, sum);
  }
  return sum;
}

// a * b rounded to fp32 on both builds, never fused into a neighbouring add. The LayerNorm backward's g' = g * w
// enters both mean_c(g') and each g' - mean_c(g'): nvcc contracting g * w - mean into one FMA would subtract the
// rounded mean from the exact product, leaving the product's rounding error (times rstd) where the exact result
// is 0 (C = 1, or a constant g').
DECO_HD float rounded_product(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DECO_HD float layer_norm_lane_scaled_sum(const float* row, const float* scale, int channels, int lane) {
  float sum = 0.0f;
  for (int c = lane; c < channels; c += kWarp) sum += rounded_product(row[c], scale[c]);
  return sum;
}

DECO_HD float layer_norm_lane_scaled_dot(const float* row, const float* scale, const float* other, int channels,
                                         int lane) {
  float sum = 0.0f;
  for (int c = lane; c < channels; c += kWarp) sum = fmaf(rounded_product(row[c], scale[c]), other[c], sum);
  return sum;
}

DECO_HD float layer_norm_channel_mean(float sum, int channels) { return sum / static_cast<float>(channels); }

DECO_HD float reciprocal_sqrt(float v) { return 1.0f / sqrtf(v); }  // IEEE sqrt and division on both builds

// Forward passes of one tile (block `tile`). `y_tile`: pixels x C; `mean_tile`, `rstd_tile`: pixels.
template <typename T, class Source>
struct ConvLayerNormForwardPass {
  ConvShape s;
  LayerNormTiling tiling;
  Source in;  // x, channels-last
  ConvWeights weight;
  const float* bias;    // C or nullptr
  const float* norm_weight;
  const float* norm_bias;
  float eps;
  T* out;       // B x H x W x C
  float* mean;  // B x H x W
  float* rstd;  // B x H x W

  DECO_HD int tile_elements() const { return tiling.pixels * s.channels; }
  DECO_HD int tile_strips() const { return tiling.strips * s.channels; }

  // Pass 1: strip w of the tile, its conv outputs (0 past the image).
  DECO_HD void y_strip(int tile, int w, float* y_tile) const {
    int strip, c;
    layer_norm_tile_slot(w, tiling.strips, s.channels, true, strip, c);
    const int channels = s.channels;
    layer_norm_conv_strip(in, weight, bias, s, tiling, tile, c, strip * kLayerNormStrip,
                          [=](int p, float y) { y_tile[p * channels + c] = y; });
  }

  // Pass 2, from the butterfly totals of pixel slot p (the channel mean, then the sum of squared deviations
  // from it): its mean and rstd, into the tile and the saved outputs.
  DECO_HD void store_statistics(int tile, int p, float mean_value, float centred_squares, float* mean_tile,
                                float* rstd_tile) const {
    const float rstd_value = reciprocal_sqrt(centred_squares / static_cast<float>(s.channels) + eps);
    mean_tile[p] = mean_value;
    rstd_tile[p] = rstd_value;
    if (tiling.pixel(tile, p) < tiling.image_pixels) {
      mean[tiling.flat_pixel(tile, p)] = mean_value;
      rstd[tiling.flat_pixel(tile, p)] = rstd_value;
    }
  }

  // Pass 3: element e (c fastest) of the normalised output.
  DECO_HD void output_element(int tile, int e, const float* y_tile, const float* mean_tile,
                              const float* rstd_tile) const {
    const int p = e / s.channels, c = e % s.channels;
    if (tiling.pixel(tile, p) >= tiling.image_pixels) return;
    const float normalised = (y_tile[e] - mean_tile[p]) * rstd_tile[p];
    out[tiling.flat_pixel(tile, p) * s.channels + c] = static_cast<T>(fmaf(normalised, norm_weight[c], norm_bias[c]));
  }
};

// Backward passes of one tile: xhat (recomputed), grad_out, then grad of the conv output and the per-tile
// partial sums of the norm parameters' gradients.
template <typename T, class Source>
struct ConvLayerNormBackwardPass {
  ConvShape s;
  LayerNormTiling tiling;
  bool channels_last;  // x's layout, and grad_y's
  Source in;           // x, channels-last
  ConvWeights weight;
  const float* bias;
  const float* norm_weight;
  const float* mean;  // B x H x W, saved by the forward
  const float* rstd;
  const T* grad_out;  // B x H x W x C, contiguous
  T* grad_y;          // B x C x H x W in x's format, or nullptr: not wanted
  Layout grad_y_layout;
  float* partials;  // tiles x 2C: sum_p grad_out * xhat, then sum_p grad_out; or nullptr: not wanted

  DECO_HD int tile_elements() const { return tiling.pixels * s.channels; }
  DECO_HD int tile_strips() const { return tiling.strips * s.channels; }

  // Pass 1a: strip w of the tile, its xhat = (y - mean) * rstd (0 past the image).
  DECO_HD void xhat_strip(int tile, int w, float* xhat_tile) const {
    int strip, c;
    layer_norm_tile_slot(w, tiling.strips, s.channels, true, strip, c);
    const int channels = s.channels;
    const LayerNormTiling t = tiling;
    const float* const saved_mean = mean;
    const float* const saved_rstd = rstd;
    layer_norm_conv_strip(in, weight, bias, s, tiling, tile, c, strip * kLayerNormStrip, [=](int p, float y) {
      float value = 0.0f;
      if (t.pixel(tile, p) < t.image_pixels) {
        const int64_t flat = t.flat_pixel(tile, p);
        value = (y - saved_mean[flat]) * saved_rstd[flat];
      }
      xhat_tile[p * channels + c] = value;
    });
  }

  // Pass 1b: element e (c fastest) of grad_out (0 past the image).
  DECO_HD void grad_out_element(int tile, int e, float* g_tile) const {
    const int p = e / s.channels;
    g_tile[e] = tiling.pixel(tile, p) < tiling.image_pixels
                    ? static_cast<float>(grad_out[tiling.flat_pixel(tile, 0) * s.channels + e])
                    : 0.0f;
  }

  // Pass 2 (per channel c, pixels in order): this tile's row of the norm-parameter partial sums.
  DECO_HD void norm_partials(int tile, int c, const float* xhat_tile, const float* g_tile) const {
    float weight_sum = 0.0f, bias_sum = 0.0f;
    for (int p = 0; p < tiling.pixels; ++p) {
      const float g = g_tile[p * s.channels + c];
      weight_sum = fmaf(g, xhat_tile[p * s.channels + c], weight_sum);
      bias_sum += g;
    }
    float* row = partials + static_cast<int64_t>(tile) * 2 * s.channels;
    row[c] = weight_sum;
    row[s.channels + c] = bias_sum;
  }

  // Pass 3: element e (x's order) of grad_y = rstd * (g' - mean_c g' - xhat * mean_c(g' * xhat)), g' = g * w,
  // from the pixel's two channel means (pass 2: layer_norm_lane_scaled_sum and _scaled_dot, butterfly, mean).
  DECO_HD void grad_y_element(int tile, int e, const float* xhat_tile, const float* g_tile,
                              const float* mean_g_tile, const float* mean_g_xhat_tile) const {
    int p, c;
    layer_norm_tile_slot(e, tiling.pixels, s.channels, channels_last, p, c);
    const int pixel = tiling.pixel(tile, p);
    if (pixel >= tiling.image_pixels) return;
    const int slot = p * s.channels + c;
    const float centred = rounded_product(g_tile[slot], norm_weight[c]) - mean_g_tile[p];
    const float value = fmaf(-xhat_tile[slot], mean_g_xhat_tile[p], centred) * rstd[tiling.flat_pixel(tile, p)];
    grad_y[grad_y_layout.at(tiling.image(tile), c, pixel / s.width, pixel % s.width)] = static_cast<T>(value);
  }
};

// Element e < 2C: the sum over tiles, in order, of column e of the partials; the first C are norm_weight's.
struct LayerNormParamGradReduceOp {
  const float* partials;  // tiles x 2C
  int tiles, channels;
  float* grad_norm_weight;
  float* grad_norm_bias;
  DECO_HD int64_t size() const { return 2 * static_cast<int64_t>(channels); }
  DECO_HD void operator()(int64_t e) const {
    float total = 0.0f;
    for (int tile = 0; tile < tiles; ++tile) total += partials[static_cast<int64_t>(tile) * 2 * channels + e];
    if (e < channels)
      grad_norm_weight[e] = total;
    else
      grad_norm_bias[e - channels] = total;
  }
};

}  // namespace deco
