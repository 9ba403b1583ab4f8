// CUDA implementation of the distance family: exact int8 tensor-core Gram products for uint8 images, a
// direct-difference fp32 kernel for float images, atomic max over tiles, and a fused epilogue that writes the
// float32 matrix or the thresholded uint64 bitset (one writer per word).
//
// Data flow (all on `stream`, no host synchronisation; scratch from the stream-ordered allocator):
//   pack:    [N, C, H, W] -> [T, Np, Dp] tile-major, zero padded (uint8 -> int8 x − 128; floats -> float32)
//           (the int8 pack also writes ‖a_t‖² per (tile, row), int64)
//   tile:    per (64-row block, 64-column block, tile): S_t = ‖a‖² + ‖b‖² − 2 a·b (int8 WMMA, int32 segments
//            of ≤ 65536 products added into int64) or Σ (a − b)² (fp32), atomicMax into smax [N, M]
//   finish:  d = float(sqrt(double(S) / (255² n))) (uint8, bit-identical to the reference) or
//            float(sqrt(S / n) · scale); matrix or bitset. Pairwise calls compute only blocks on or above the
//            diagonal and read S from the upper triangle, so they are exactly symmetric.
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "common/common.h"
#include "common/cuda_utils.h"
#include "distance/distance.h"

namespace memcore {
namespace distance {
namespace {

constexpr int kBlock = 64;       // rows / columns per thread block
constexpr int kKStep = 128;      // K values staged in shared memory per step (int8 path)
constexpr int kSegment = 65536;  // int8 products per int32 partial: 65536 · 2^14 = 2^30 < 2^31
constexpr int kKStepF = 32;      // float path K step
constexpr int kF32Chunk = 4096;  // float partial sums run in float32 over this many terms

struct Geo {
  std::int64_t n, c, h, w, gh, gw, th, tw, tiles, d, dp, np;
};

Geo make_geo(std::int64_t n, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t gh, std::int64_t gw,
             std::int64_t kpad) {
  Geo g{n, c, h, w, gh, gw, h / gh, w / gw, gh * gw, 0, 0, 0};
  g.d = c * g.th * g.tw;
  g.dp = (g.d + kpad - 1) / kpad * kpad;
  g.np = (n + kBlock - 1) / kBlock * kBlock;
  return g;
}

__device__ __forceinline__ float load_as_float(const void* x, std::int64_t idx, int dtype) {
  switch (dtype) {
    case 1:
      return static_cast<const float*>(x)[idx];
    case 2: {
      const unsigned short v = static_cast<const unsigned short*>(x)[idx];
      return __half2float(__ushort_as_half(v));
    }
    default: {  // bfloat16: the top 16 bits of a float32
      const unsigned int v = static_cast<const unsigned short*>(x)[idx];
      return __uint_as_float(v << 16);
    }
  }
}

// out[t][row][k] for row < np, k < dp; zero outside the image set / tile. One block per (row, tile), so the
// index arithmetic is per row and 32-bit per value; the int8 path also writes norms[t * np + row] = Σ_k out².
template <typename Out>
__global__ void pack_kernel(const void* __restrict__ x, int dtype, Geo g, Out* __restrict__ out,
                            long long* __restrict__ norms) {
  const std::int64_t row = blockIdx.x, t = blockIdx.y;
  Out* dst = out + (t * g.np + row) * g.dp;
  const int r = static_cast<int>(t / g.gw), q = static_cast<int>(t % g.gw);
  const int th = static_cast<int>(g.th), tw = static_cast<int>(g.tw), d = static_cast<int>(g.d);
  long long sq = 0;
  for (int k = threadIdx.x; k < static_cast<int>(g.dp); k += blockDim.x) {
    Out v = Out(0);
    if (row < g.n && k < d) {
      const int xx = k % tw;
      const int y = (k / tw) % th;
      const int ch = k / (tw * th);
      const std::int64_t src = ((row * g.c + ch) * g.h + r * g.th + y) * g.w + q * g.tw + xx;
      if constexpr (sizeof(Out) == 1) {
        v = static_cast<Out>(static_cast<int>(static_cast<const std::uint8_t*>(x)[src]) - 128);
        sq += static_cast<int>(v) * static_cast<int>(v);
      } else {
        v = load_as_float(x, src, dtype);
      }
    }
    dst[k] = v;
  }
  if constexpr (sizeof(Out) == 1) {
    __shared__ long long warp_sums[32];
    for (int o = 16; o > 0; o /= 2) sq += __shfl_down_sync(0xffffffffu, sq, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sq;
    __syncthreads();
    if (threadIdx.x == 0) {
      long long total = 0;
      for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
      norms[t * g.np + row] = total;
    }
  }
}

// Exact int8 Gram per (row block, column block, tile) with WMMA 16×16×16; 4 warps, each 32×32 outputs.
__global__ void __launch_bounds__(128)
    tile_i8_kernel(const std::int8_t* __restrict__ pa, const std::int8_t* __restrict__ pb,
                   const long long* __restrict__ na, const long long* __restrict__ nb, Geo ga, Geo gb,
                   bool symmetric, unsigned long long* __restrict__ smax) {
  using namespace nvcuda;
  const int bm = blockIdx.x, bn = blockIdx.y, t = blockIdx.z;
  if (symmetric && bn < bm) return;
  __shared__ __align__(32) std::int8_t As[kBlock][kKStep + 16];
  __shared__ __align__(32) std::int8_t Bs[kBlock][kKStep + 16];
  __shared__ __align__(32) int Cs[kBlock][kBlock + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
  const std::int64_t dp = ga.dp;
  const std::int8_t* a0 = pa + (t * ga.np + static_cast<std::int64_t>(bm) * kBlock) * dp;
  const std::int8_t* b0 = pb + (t * gb.np + static_cast<std::int64_t>(bn) * kBlock) * dp;
  long long acc[32];
#pragma unroll
  for (int e = 0; e < 32; ++e) acc[e] = 0;
  for (std::int64_t s0 = 0; s0 < dp; s0 += kSegment) {
    const std::int64_t s1 = s0 + kSegment < dp ? s0 + kSegment : dp;
    wmma::fragment<wmma::accumulator, 16, 16, 16, int> c[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(c[i][j], 0);
    // 64 rows × 128 bytes per operand = 512 int4 loads: four per thread per operand. The next step's loads
    // are issued before this step's MMAs (register double buffering) so global latency overlaps compute.
    int4 ra[4], rb[4];
    auto fetch = [&](std::int64_t k0) {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int v = tid + l * 128;
        const int row = v / 8, col = (v % 8) * 16;
        ra[l] = *reinterpret_cast<const int4*>(a0 + row * dp + k0 + col);
        rb[l] = *reinterpret_cast<const int4*>(b0 + row * dp + k0 + col);
      }
    };
    fetch(s0);
    for (std::int64_t k0 = s0; k0 < s1; k0 += kKStep) {
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int v = tid + l * 128;
        const int row = v / 8, col = (v % 8) * 16;
        *reinterpret_cast<int4*>(&As[row][col]) = ra[l];
        *reinterpret_cast<int4*>(&Bs[row][col]) = rb[l];
      }
      __syncthreads();
      if (k0 + kKStep < s1) fetch(k0 + kKStep);
#pragma unroll
      for (int kk = 0; kk < kKStep; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wr + i * 16][kk], kKStep + 16);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[wc + j * 16][kk], kKStep + 16);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(c[i][j], fa[i], fb[j], c[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[wr + i * 16][wc + j * 16], c[i][j], kBlock + 4, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      const int v = tid + e * 128;
      acc[e] += Cs[v / kBlock][v % kBlock];
    }
    __syncthreads();
  }
#pragma unroll
  for (int e = 0; e < 32; ++e) {
    const int v = tid + e * 128;
    const std::int64_t i = static_cast<std::int64_t>(bm) * kBlock + v / kBlock;
    const std::int64_t j = static_cast<std::int64_t>(bn) * kBlock + v % kBlock;
    if (i < ga.n && j < gb.n) {
      const long long s = na[t * ga.np + i] + nb[t * gb.np + j] - 2 * acc[e];
      atomicMax(smax + i * gb.n + j, static_cast<unsigned long long>(s));
    }
  }
}

// Direct differences in fp32 for float images: 16×16 threads, each 4×4 pairs of a 64×64 block.
__global__ void __launch_bounds__(256)
    tile_f32_kernel(const float* __restrict__ pa, const float* __restrict__ pb, Geo ga, Geo gb,
                    bool symmetric, float* __restrict__ smax) {
  const int bm = blockIdx.x, bn = blockIdx.y, t = blockIdx.z;
  if (symmetric && bn < bm) return;
  __shared__ float As[kKStepF][kBlock + 1];
  __shared__ float Bs[kKStepF][kBlock + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, tid = threadIdx.x;
  const std::int64_t dp = ga.dp;
  const float* a0 = pa + (t * ga.np + static_cast<std::int64_t>(bm) * kBlock) * dp;
  const float* b0 = pb + (t * gb.np + static_cast<std::int64_t>(bn) * kBlock) * dp;
  double total[4][4] = {};
  float part[4][4] = {};
  for (std::int64_t k0 = 0; k0 < dp; k0 += kKStepF) {
    // 64 rows × 32 values per operand: 8 per thread, stored transposed so the inner loop reads rows.
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      const int v = tid + l * 256;
      const int row = v / kKStepF, k = v % kKStepF;
      As[k][row] = a0[row * dp + k0 + k];
      Bs[k][row] = b0[row * dp + k0 + k];
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kKStepF; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = As[k][ty * 4 + r];
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = Bs[k][tx * 4 + q];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float d = av[r] - bv[q];
          part[r][q] = fmaf(d, d, part[r][q]);
        }
    }
    __syncthreads();
    if ((k0 + kKStepF) % kF32Chunk == 0 || k0 + kKStepF >= dp) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          total[r][q] += part[r][q];
          part[r][q] = 0.0f;
        }
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const std::int64_t i = static_cast<std::int64_t>(bm) * kBlock + ty * 4 + r;
      const std::int64_t j = static_cast<std::int64_t>(bn) * kBlock + tx * 4 + q;
      if (i < ga.n && j < gb.n) {
        // S >= 0: the float's bit pattern orders like an int, so an integer atomicMax is a float max. A NaN
        // is written as the positive quiet NaN, the largest such int: it wins the maximum over tiles
        // whatever its sign bit (a negative one would lose to 0 and read as a match).
        const float v = static_cast<float>(total[r][q]);
        atomicMax(reinterpret_cast<int*>(smax + i * gb.n + j), isnan(v) ? 0x7fffffff : __float_as_int(v));
      }
    }
}

__device__ __forceinline__ float finish_u8(unsigned long long s, double denom) {
  return static_cast<float>(sqrt(static_cast<double>(s) / denom));  // IEEE div.rn.f64 / sqrt.rn.f64
}

__device__ __forceinline__ float finish_f32(float s, double n, double scale) {
  return static_cast<float>(sqrt(static_cast<double>(s) / n) * scale);
}

template <bool kInt>
__device__ __forceinline__ float dist_at(const void* smax, std::int64_t i, std::int64_t j, std::int64_t m,
                                         bool symmetric, double n, double scale) {
  if (symmetric) {
    if (i == j) return 0.0f;
    if (j < i) {
      const std::int64_t tmp = i;
      i = j;
      j = tmp;
    }
  }
  if (kInt) return finish_u8(static_cast<const unsigned long long*>(smax)[i * m + j], 65025.0 * n);
  return finish_f32(static_cast<const float*>(smax)[i * m + j], n, scale);
}

template <bool kInt>
__global__ void finish_matrix_kernel(const void* __restrict__ smax, std::int64_t nrows, std::int64_t m,
                                     bool symmetric, double n, double scale, float* __restrict__ out) {
  const std::int64_t total = nrows * m;
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    out[idx] = dist_at<kInt>(smax, idx / m, idx % m, m, symmetric, n, scale);
  }
}

template <bool kInt>
__global__ void finish_graph_kernel(const void* __restrict__ smax, std::int64_t nrows, std::int64_t m,
                                    bool symmetric, double n, double scale, float alpha,
                                    unsigned long long* __restrict__ out) {
  const std::int64_t words = (m + 63) / 64;
  const std::int64_t total = nrows * words;
  for (std::int64_t idx = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = idx / words, w0 = (idx % words) * 64;
    unsigned long long word = 0;
    for (int b = 0; b < 64 && w0 + b < m; ++b) {
      const std::int64_t j = w0 + b;
      if (symmetric && i == j) continue;
      // The same float32 distance as the matrix, compared with float32(alpha).
      if (dist_at<kInt>(smax, i, j, m, symmetric, n, scale) <= alpha) word |= 1ull << b;
    }
    out[idx] = word;
  }
}

int grid_for(std::int64_t total, int threads) {
  const std::int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(std::min<std::int64_t>(std::max<std::int64_t>(blocks, 1), 65535LL * 16));
}

// Computes smax [n, m] (caller frees with cudaFreeAsync). Returns the tile size n_tile.
void* compute_smax(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                   std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw,
                   bool symmetric, cudaStream_t stream, std::int64_t* n_tile) {
  const bool is_int = static_cast<DType>(dtype) == DType::kUInt8;
  const Geo ga = make_geo(n, c, h, w, gh, gw, is_int ? kKStep : kKStepF);
  const Geo gb = make_geo(m, c, h, w, gh, gw, is_int ? kKStep : kKStepF);
  *n_tile = ga.d;
  const std::size_t es = is_int ? 1 : 4;
  void* smax = nullptr;
  MEMCORE_CUDA_CHECK(cudaMallocAsync(&smax, static_cast<std::size_t>(n * m) * 8, stream));
  MEMCORE_CUDA_CHECK(cudaMemsetAsync(smax, 0, static_cast<std::size_t>(n * m) * 8, stream));
  void* pa = nullptr;
  void* pb = nullptr;
  const std::size_t bytes_a = static_cast<std::size_t>(ga.tiles * ga.np * ga.dp) * es;
  const std::size_t bytes_b = static_cast<std::size_t>(gb.tiles * gb.np * gb.dp) * es;
  MEMCORE_CUDA_CHECK(cudaMallocAsync(&pa, bytes_a, stream));
  if (symmetric) {
    pb = pa;
  } else {
    MEMCORE_CUDA_CHECK(cudaMallocAsync(&pb, bytes_b, stream));
  }
  const void* xa = reinterpret_cast<const void*>(a);
  const void* xb = reinterpret_cast<const void*>(b);
  const dim3 tiles_grid(static_cast<unsigned>(ga.np / kBlock), static_cast<unsigned>(gb.np / kBlock),
                        static_cast<unsigned>(ga.tiles));
  if (is_int) {
    long long* na = nullptr;
    long long* nb = nullptr;
    MEMCORE_CUDA_CHECK(cudaMallocAsync(&na, static_cast<std::size_t>(ga.tiles * ga.np) * 8, stream));
    pack_kernel<std::int8_t>
        <<<dim3(static_cast<unsigned>(ga.np), static_cast<unsigned>(ga.tiles)), 256, 0, stream>>>(
            xa, dtype, ga, static_cast<std::int8_t*>(pa), na);
    MEMCORE_CUDA_CHECK_LAUNCH("distance pack a");
    if (symmetric) {
      nb = na;
    } else {
      MEMCORE_CUDA_CHECK(cudaMallocAsync(&nb, static_cast<std::size_t>(gb.tiles * gb.np) * 8, stream));
      pack_kernel<std::int8_t>
          <<<dim3(static_cast<unsigned>(gb.np), static_cast<unsigned>(gb.tiles)), 256, 0, stream>>>(
              xb, dtype, gb, static_cast<std::int8_t*>(pb), nb);
      MEMCORE_CUDA_CHECK_LAUNCH("distance pack b");
    }
    tile_i8_kernel<<<tiles_grid, 128, 0, stream>>>(static_cast<std::int8_t*>(pa),
                                                   static_cast<std::int8_t*>(pb), na, nb, ga, gb, symmetric,
                                                   static_cast<unsigned long long*>(smax));
    MEMCORE_CUDA_CHECK_LAUNCH("distance tile_i8");
    MEMCORE_CUDA_CHECK(cudaFreeAsync(na, stream));
    if (!symmetric) MEMCORE_CUDA_CHECK(cudaFreeAsync(nb, stream));
  } else {
    pack_kernel<float>
        <<<dim3(static_cast<unsigned>(ga.np), static_cast<unsigned>(ga.tiles)), 256, 0, stream>>>(
            xa, dtype, ga, static_cast<float*>(pa), nullptr);
    MEMCORE_CUDA_CHECK_LAUNCH("distance pack a");
    if (!symmetric) {
      pack_kernel<float>
          <<<dim3(static_cast<unsigned>(gb.np), static_cast<unsigned>(gb.tiles)), 256, 0, stream>>>(
              xb, dtype, gb, static_cast<float*>(pb), nullptr);
      MEMCORE_CUDA_CHECK_LAUNCH("distance pack b");
    }
    tile_f32_kernel<<<tiles_grid, 256, 0, stream>>>(static_cast<float*>(pa), static_cast<float*>(pb), ga, gb,
                                                    symmetric, static_cast<float*>(smax));
    MEMCORE_CUDA_CHECK_LAUNCH("distance tile_f32");
  }
  MEMCORE_CUDA_CHECK(cudaFreeAsync(pa, stream));
  if (!symmetric) MEMCORE_CUDA_CHECK(cudaFreeAsync(pb, stream));
  return smax;
}

void check_args(std::int64_t n, std::int64_t m, std::int64_t c, std::int64_t h, std::int64_t w, int dtype,
                std::int64_t gh, std::int64_t gw, bool symmetric) {
  check(n >= 0 && m >= 0, "distance: negative set size");
  check(c > 0 && h > 0 && w > 0, "distance: empty C/H/W");
  check(gh > 0 && gw > 0 && h % gh == 0 && w % gw == 0, "distance: grid must divide H and W");
  check(!symmetric || n == m, "distance: symmetric needs b == a");
  check(gh * gw <= 65535, "distance: CUDA supports at most 65535 tiles (grid rows × cols)");
  const DType d = static_cast<DType>(dtype);
  check(d == DType::kUInt8 || d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16,
        "distance: CUDA takes uint8, float32, float16 or bfloat16 images");
}

}  // namespace

void matrix_cuda(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                 std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
                 bool symmetric, std::uintptr_t out, std::uintptr_t stream_handle) {
  check_args(n, m, c, h, w, dtype, gh, gw, symmetric);
  if (n == 0 || m == 0) return;
  cudaStream_t stream = as_stream(stream_handle);
  std::int64_t n_tile = 0;
  void* smax = compute_smax(a, n, b, m, c, h, w, dtype, gh, gw, symmetric, stream, &n_tile);
  const bool is_int = static_cast<DType>(dtype) == DType::kUInt8;
  const int blocks = grid_for(n * m, 256);
  if (is_int) {
    finish_matrix_kernel<true><<<blocks, 256, 0, stream>>>(smax, n, m, symmetric, static_cast<double>(n_tile),
                                                           scale, as_ptr<float>(out));
  } else {
    finish_matrix_kernel<false><<<blocks, 256, 0, stream>>>(
        smax, n, m, symmetric, static_cast<double>(n_tile), scale, as_ptr<float>(out));
  }
  MEMCORE_CUDA_CHECK_LAUNCH("distance finish_matrix");
  MEMCORE_CUDA_CHECK(cudaFreeAsync(smax, stream));
}

void graph_cuda(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
                bool symmetric, double alpha, std::uintptr_t out, std::uintptr_t stream_handle) {
  check_args(n, m, c, h, w, dtype, gh, gw, symmetric);
  cudaStream_t stream = as_stream(stream_handle);
  const std::int64_t words = (m + 63) / 64;
  if (n == 0 || m == 0) return;  // an [N, 0] or [0, W] bitset has nothing to write
  std::int64_t n_tile = 0;
  void* smax = compute_smax(a, n, b, m, c, h, w, dtype, gh, gw, symmetric, stream, &n_tile);
  const bool is_int = static_cast<DType>(dtype) == DType::kUInt8;
  const int blocks = grid_for(n * words, 128);
  const float thr = static_cast<float>(alpha);
  if (is_int) {
    finish_graph_kernel<true><<<blocks, 128, 0, stream>>>(smax, n, m, symmetric, static_cast<double>(n_tile),
                                                          scale, thr, as_ptr<unsigned long long>(out));
  } else {
    finish_graph_kernel<false><<<blocks, 128, 0, stream>>>(smax, n, m, symmetric, static_cast<double>(n_tile),
                                                           scale, thr, as_ptr<unsigned long long>(out));
  }
  MEMCORE_CUDA_CHECK_LAUNCH("distance finish_graph");
  MEMCORE_CUDA_CHECK(cudaFreeAsync(smax, stream));
}

}  // namespace distance
}  // namespace memcore
