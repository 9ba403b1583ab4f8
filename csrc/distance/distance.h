// Normalized and tiled L2 between image sets ([C23] §4.2): matrices, k-NN and thresholded bitset graphs.
//
// Every launcher takes two image sets as raw pointers to contiguous [N, C, H, W] / [M, C, H, W] arrays of one
// dtype (uint8, float32, float16, bfloat16), a grid (gh, gw) that divides H and W, and writes its output.
// With the grid's tiles of n = C·(H/gh)·(W/gw) values:
//   S_t(i, j) = Σ_{tile t} (a_i − b_j)²,   d(i, j) = sqrt(max_t S_t(i, j) / n)   (1×1 grid: plain L2)
// uint8: S is an exact integer and d = float(sqrt(double(S) / (255² · n))) — bit-identical to the reference.
// floats: 16-bit inputs upcast to float32; d = float(sqrt(S / n) · scale) (scale 0.5 for [-1, 1] inputs).
#pragma once

#include <cstdint>

namespace memcore {
namespace distance {

// out: [N, M] float32. symmetric: b is a (pairwise) -> exactly symmetric, zero diagonal.
void matrix_cpu(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
                bool symmetric, std::uintptr_t out);

// out: [N, ceil(M/64)] uint64; bit j of row i set iff d(i, j) <= float(alpha) (and i != j when symmetric).
void graph_cpu(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
               std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
               bool symmetric, double alpha, std::uintptr_t out);

// out_d: [N, k] float32 ascending, out_i: [N, k] int64; ties by smaller index. References are streamed in
// blocks of `chunk`, so memory is O(N·(k + chunk) + chunk·C·H·W), independent of M.
void knn_cpu(std::uintptr_t q, std::int64_t n, std::uintptr_t r, std::int64_t m, std::int64_t c,
             std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
             std::int64_t k, std::int64_t chunk, std::uintptr_t out_d, std::uintptr_t out_i);

#ifdef MEMCORE_WITH_CUDA
// CUDA versions of matrix_cpu / graph_cpu on device pointers, launched on `stream`.
void matrix_cuda(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                 std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
                 bool symmetric, std::uintptr_t out, std::uintptr_t stream);
void graph_cuda(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
                bool symmetric, double alpha, std::uintptr_t out, std::uintptr_t stream);
#endif

}  // namespace distance
}  // namespace memcore
