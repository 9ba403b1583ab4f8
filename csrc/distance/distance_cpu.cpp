// CPU implementation of the distance family (OpenMP over query rows; direct differences, no Gram trick).
//
// Both sets are first repacked tile-major, [N][T][D] (T = gh·gw tiles of D = C·th·tw values), so that every
// tile is one contiguous vector and one-pixel-wide tiles cost no strided gathers. The pair kernel then forms
// (a − b)² directly: for uint8 this is exact integer arithmetic (int16 differences, int32 partial sums that
// auto-vectorise to pmaddwd, int64 totals); for floats it avoids the cancellation of the Gram trick.
// One b tile is compared with a block of 4 a tiles at once, so every b load is reused four times and the four
// a tiles stay in L1/L2 while b streams.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common/common.h"
#include "distance/distance.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// Portable build (no -march=native): the hot loops get an AVX2 clone chosen at load time.
#define MEMCORE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEMCORE_CLONES
#endif

namespace memcore {
namespace distance {
namespace {

constexpr std::int64_t kBlockA = 4;
// int32 partial sums of squared uint8 differences stay exact for up to 2^31 / 255² = 33025 terms.
constexpr std::int64_t kU8Chunk = 32768;
// Float partial sums run in float32 over this many terms, then add into a double total.
constexpr std::int64_t kF32Chunk = 4096;

// ------------------------------------------------------------------------------------------ pair kernels

// S[r] = Σ_k (a_r[k] − b[k])² for r < 4, exact.
MEMCORE_CLONES void sq4_u8(const std::uint8_t* a0, const std::uint8_t* a1, const std::uint8_t* a2,
                           const std::uint8_t* a3, const std::uint8_t* b, std::int64_t d, std::int64_t* out) {
  std::int64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (std::int64_t k0 = 0; k0 < d; k0 += kU8Chunk) {
    const std::int64_t k1 = std::min(d, k0 + kU8Chunk);
    std::int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (std::int64_t k = k0; k < k1; ++k) {
      const std::int16_t bv = b[k];
      const std::int16_t d0 = static_cast<std::int16_t>(a0[k] - bv);
      const std::int16_t d1 = static_cast<std::int16_t>(a1[k] - bv);
      const std::int16_t d2 = static_cast<std::int16_t>(a2[k] - bv);
      const std::int16_t d3 = static_cast<std::int16_t>(a3[k] - bv);
      s0 += d0 * d0;
      s1 += d1 * d1;
      s2 += d2 * d2;
      s3 += d3 * d3;
    }
    t0 += s0;
    t1 += s1;
    t2 += s2;
    t3 += s3;
  }
  out[0] = t0;
  out[1] = t1;
  out[2] = t2;
  out[3] = t3;
}

MEMCORE_CLONES void sq4_f32(const float* a0, const float* a1, const float* a2, const float* a3,
                            const float* b, std::int64_t d, double* out) {
  double t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (std::int64_t k0 = 0; k0 < d; k0 += kF32Chunk) {
    const std::int64_t k1 = std::min(d, k0 + kF32Chunk);
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (std::int64_t k = k0; k < k1; ++k) {
      const float bv = b[k];
      const float d0 = a0[k] - bv, d1 = a1[k] - bv, d2 = a2[k] - bv, d3 = a3[k] - bv;
      s0 += d0 * d0;
      s1 += d1 * d1;
      s2 += d2 * d2;
      s3 += d3 * d3;
    }
    t0 += s0;
    t1 += s1;
    t2 += s2;
    t3 += s3;
  }
  out[0] = t0;
  out[1] = t1;
  out[2] = t2;
  out[3] = t3;
}

// Element type of the packed buffers and the exact / accurate sum type per input kind.
struct U8Kind {
  using Elem = std::uint8_t;
  using Sum = std::int64_t;
  static void sq4(const Elem* const* a, const Elem* b, std::int64_t d, Sum* out) {
    sq4_u8(a[0], a[1], a[2], a[3], b, d, out);
  }
  // float(sqrt(double(S) / (255² n))): IEEE division and sqrt, one rounding to float, as the reference.
  static float finish(Sum s, double n, double /*scale*/) {
    return static_cast<float>(std::sqrt(static_cast<double>(s) / (65025.0 * n)));
  }
};

struct F32Kind {
  using Elem = float;
  using Sum = double;
  static void sq4(const Elem* const* a, const Elem* b, std::int64_t d, Sum* out) {
    sq4_f32(a[0], a[1], a[2], a[3], b, d, out);
  }
  static float finish(Sum s, double n, double scale) {
    return static_cast<float>(std::sqrt(std::max(s, 0.0) / n) * scale);
  }
};

inline bool is_nan(std::int64_t) {
  return false;
}
inline bool is_nan(double v) {
  return std::isnan(v);
}

// ------------------------------------------------------------------------------------------ packing

struct Geometry {
  std::int64_t c, h, w, gh, gw, th, tw, tiles, d;
  Geometry(std::int64_t c_, std::int64_t h_, std::int64_t w_, std::int64_t gh_, std::int64_t gw_)
      : c(c_),
        h(h_),
        w(w_),
        gh(gh_),
        gw(gw_),
        th(h_ / gh_),
        tw(w_ / gw_),
        tiles(gh_ * gw_),
        d(c_ * th * tw) {}
  std::int64_t image() const { return c * h * w; }
};

template <typename Src, typename Elem, typename Conv>
void pack_impl(const Src* x, std::int64_t count, const Geometry& g, Elem* out, Conv conv) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < count; ++i) {
    const Src* img = x + i * g.image();
    Elem* dst = out + i * g.tiles * g.d;
    for (std::int64_t r = 0; r < g.gh; ++r) {
      for (std::int64_t q = 0; q < g.gw; ++q) {
        for (std::int64_t ch = 0; ch < g.c; ++ch) {
          for (std::int64_t y = 0; y < g.th; ++y) {
            const Src* src = img + (ch * g.h + r * g.th + y) * g.w + q * g.tw;
            for (std::int64_t xx = 0; xx < g.tw; ++xx) dst[xx] = conv(src[xx]);
            dst += g.tw;
          }
        }
      }
    }
  }
}

// x: [count, C, H, W] of `dtype` -> out: [count][T][D] of Kind::Elem.
void pack(std::uintptr_t x, std::int64_t count, int dtype, const Geometry& g, std::uint8_t* out) {
  switch (static_cast<DType>(dtype)) {
    case DType::kUInt8:
      pack_impl(as_ptr<const std::uint8_t>(x), count, g, out, [](std::uint8_t v) { return v; });
      return;
    case DType::kFloat32:
      pack_impl(as_ptr<const float>(x), count, g, reinterpret_cast<float*>(out), [](float v) { return v; });
      return;
    case DType::kFloat16:
      pack_impl(as_ptr<const std::uint16_t>(x), count, g, reinterpret_cast<float*>(out),
                [](std::uint16_t v) { return half_to_float(v); });
      return;
    case DType::kBFloat16:
      pack_impl(as_ptr<const std::uint16_t>(x), count, g, reinterpret_cast<float*>(out),
                [](std::uint16_t v) { return bf16_to_float(v); });
      return;
    default:
      fail(std::string("distance: unsupported dtype ") + dtype_name(static_cast<DType>(dtype)));
  }
}

std::int64_t elem_size(int dtype) {
  return static_cast<DType>(dtype) == DType::kUInt8 ? 1 : 4;
}

// ------------------------------------------------------------------------------------------ S matrix

// smax[i * m + j] = max_t S_t(a_i, b_j). symmetric: only j > i is computed (the caller mirrors).
template <typename Kind>
void squared_tile_max(const typename Kind::Elem* pa, std::int64_t n, const typename Kind::Elem* pb,
                      std::int64_t m, const Geometry& g, bool symmetric, typename Kind::Sum* smax) {
  using Elem = typename Kind::Elem;
  using Sum = typename Kind::Sum;
  const std::int64_t stride = g.tiles * g.d;
  const std::int64_t blocks = (n + kBlockA - 1) / kBlockA;
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t i0 = blk * kBlockA;
    const std::int64_t rows = std::min(kBlockA, n - i0);
    const std::int64_t j0 = symmetric ? i0 + 1 : 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      std::fill(smax + (i0 + r) * m + j0, smax + (i0 + r) * m + m, Sum(0));
    }
    for (std::int64_t t = 0; t < g.tiles; ++t) {
      // Short blocks repeat their last row; the duplicate results are discarded.
      const Elem* a[kBlockA];
      for (std::int64_t r = 0; r < kBlockA; ++r) a[r] = pa + (i0 + std::min(r, rows - 1)) * stride + t * g.d;
      for (std::int64_t j = j0; j < m; ++j) {
        Sum s[kBlockA];
        Kind::sq4(a, pb + j * stride + t * g.d, g.d, s);
        for (std::int64_t r = 0; r < rows; ++r) {
          Sum& dst = smax[(i0 + r) * m + j];
          // A NaN sum wins and stays (as on the reference backend): `s > dst` alone would drop it
          // and report a NaN/Inf input as distance 0.
          if (s[r] > dst || is_nan(s[r])) dst = s[r];
        }
      }
    }
  }
}

struct Packed {
  std::vector<std::uint8_t> a, b;
};

template <typename Kind>
void dispatch_smax(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, int dtype,
                   const Geometry& g, bool symmetric, std::vector<typename Kind::Sum>& smax) {
  using Elem = typename Kind::Elem;
  const std::int64_t es = elem_size(dtype);
  std::vector<std::uint8_t> pa(static_cast<std::size_t>(n * g.tiles * g.d * es));
  pack(a, n, dtype, g, pa.data());
  std::vector<std::uint8_t> pb_store;
  const std::uint8_t* pb = pa.data();
  if (!symmetric) {
    pb_store.resize(static_cast<std::size_t>(m * g.tiles * g.d * es));
    pack(b, m, dtype, g, pb_store.data());
    pb = pb_store.data();
  }
  smax.assign(static_cast<std::size_t>(n * m), typename Kind::Sum(0));
  squared_tile_max<Kind>(reinterpret_cast<const Elem*>(pa.data()), n, reinterpret_cast<const Elem*>(pb), m, g,
                         symmetric, smax.data());
}

void check_args(std::int64_t n, std::int64_t m, std::int64_t c, std::int64_t h, std::int64_t w,
                std::int64_t gh, std::int64_t gw, bool symmetric) {
  check(n >= 0 && m >= 0, "distance: negative set size");
  check(c > 0 && h > 0 && w > 0, "distance: empty C/H/W");
  check(gh > 0 && gw > 0 && h % gh == 0 && w % gw == 0, "distance: grid must divide H and W");
  check(!symmetric || n == m, "distance: symmetric needs b == a");
}

// Distances d[i * m + j] (float32), mirrored and zero-diagonal when symmetric.
template <typename Kind>
void distances(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, int dtype,
               const Geometry& g, double scale, bool symmetric, float* out) {
  std::vector<typename Kind::Sum> smax;
  dispatch_smax<Kind>(a, n, b, m, dtype, g, symmetric, smax);
  const double nt = static_cast<double>(g.d);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t j = symmetric ? i + 1 : 0; j < m; ++j)
      out[i * m + j] = Kind::finish(smax[i * m + j], nt, scale);
  }
  if (symmetric) {
    for (std::int64_t i = 0; i < n; ++i) {
      out[i * m + i] = 0.0f;
      for (std::int64_t j = i + 1; j < m; ++j) out[j * m + i] = out[i * m + j];
    }
  }
}

bool is_u8(int dtype) {
  return static_cast<DType>(dtype) == DType::kUInt8;
}

}  // namespace

void matrix_cpu(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
                std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
                bool symmetric, std::uintptr_t out) {
  check_args(n, m, c, h, w, gh, gw, symmetric);
  if (n == 0 || m == 0) return;
  const Geometry g(c, h, w, gh, gw);
  if (is_u8(dtype)) {
    distances<U8Kind>(a, n, b, m, dtype, g, scale, symmetric, as_ptr<float>(out));
  } else {
    distances<F32Kind>(a, n, b, m, dtype, g, scale, symmetric, as_ptr<float>(out));
  }
}

void graph_cpu(std::uintptr_t a, std::int64_t n, std::uintptr_t b, std::int64_t m, std::int64_t c,
               std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
               bool symmetric, double alpha, std::uintptr_t out) {
  check_args(n, m, c, h, w, gh, gw, symmetric);
  const std::int64_t words = (m + 63) / 64;
  std::uint64_t* bits = as_ptr<std::uint64_t>(out);
  if (n == 0) return;
  std::fill(bits, bits + n * words, std::uint64_t(0));
  if (m == 0) return;
  std::vector<float> d(static_cast<std::size_t>(n * m));
  matrix_cpu(a, n, b, m, c, h, w, dtype, gh, gw, scale, symmetric,
             reinterpret_cast<std::uintptr_t>(d.data()));
  // The same float32 distance compared with float32(alpha): bit-for-bit the thresholded matrix.
  const float thr = static_cast<float>(alpha);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint64_t* row = bits + i * words;
    for (std::int64_t j = 0; j < m; ++j) {
      if (d[i * m + j] <= thr && !(symmetric && i == j)) row[j >> 6] |= std::uint64_t(1) << (j & 63);
    }
  }
}

namespace {

// (distance, index) lexicographic: ties go to the smaller reference index. NaN distances order after every
// number (as a stable ascending sort puts them), so the heap's comparison stays a strict weak order.
struct Cand {
  float first;
  std::int64_t second;
  bool operator<(const Cand& o) const {
    const bool nan = std::isnan(first), onan = std::isnan(o.first);
    if (nan != onan) return onan;
    if (!nan && first != o.first) return first < o.first;
    return second < o.second;
  }
};

template <typename Kind>
void knn_impl(std::uintptr_t q, std::int64_t n, std::uintptr_t r, std::int64_t m, int dtype,
              const Geometry& g, double scale, std::int64_t k, std::int64_t chunk, float* out_d,
              std::int64_t* out_i) {
  using Elem = typename Kind::Elem;
  using Sum = typename Kind::Sum;
  const std::int64_t es = elem_size(dtype);
  const std::int64_t img_bytes =
      g.image() * (is_u8(dtype) ? 1 : static_cast<std::int64_t>(dtype == 1 ? 4 : 2));
  std::vector<std::uint8_t> pq(static_cast<std::size_t>(n * g.tiles * g.d * es));
  pack(q, n, dtype, g, pq.data());
  const std::int64_t cm = std::min(chunk, m);
  std::vector<std::uint8_t> pr(static_cast<std::size_t>(cm * g.tiles * g.d * es));
  std::vector<Sum> smax(static_cast<std::size_t>(n * cm));
  std::vector<Cand> heaps(static_cast<std::size_t>(n * k));
  std::vector<std::int64_t> sizes(static_cast<std::size_t>(n), 0);
  const double nt = static_cast<double>(g.d);
  for (std::int64_t j0 = 0; j0 < m; j0 += cm) {
    const std::int64_t len = std::min(cm, m - j0);
    pack(r + static_cast<std::uintptr_t>(j0 * img_bytes), len, dtype, g, pr.data());
    squared_tile_max<Kind>(reinterpret_cast<const Elem*>(pq.data()), n,
                           reinterpret_cast<const Elem*>(pr.data()), len, g, false, smax.data());
    // smax rows have stride `len` here (squared_tile_max writes [n][len]).
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      Cand* heap = heaps.data() + i * k;
      std::int64_t& size = sizes[i];
      for (std::int64_t j = 0; j < len; ++j) {
        const Cand c{Kind::finish(smax[i * len + j], nt, scale), j0 + j};
        if (size < k) {
          heap[size++] = c;
          std::push_heap(heap, heap + size);
        } else if (c < heap[0]) {
          std::pop_heap(heap, heap + k);
          heap[k - 1] = c;
          std::push_heap(heap, heap + k);
        }
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    Cand* heap = heaps.data() + i * k;
    std::sort_heap(heap, heap + sizes[i]);
    for (std::int64_t j = 0; j < k; ++j) {
      out_d[i * k + j] = heap[j].first;
      out_i[i * k + j] = heap[j].second;
    }
  }
}

}  // namespace

void knn_cpu(std::uintptr_t q, std::int64_t n, std::uintptr_t r, std::int64_t m, std::int64_t c,
             std::int64_t h, std::int64_t w, int dtype, std::int64_t gh, std::int64_t gw, double scale,
             std::int64_t k, std::int64_t chunk, std::uintptr_t out_d, std::uintptr_t out_i) {
  check_args(n, m, c, h, w, gh, gw, false);
  check(k >= 0 && k <= m, "distance: k must be in [0, M]");
  check(chunk > 0, "distance: chunk must be positive");
  if (n == 0 || k == 0) return;
  const Geometry g(c, h, w, gh, gw);
  if (is_u8(dtype)) {
    knn_impl<U8Kind>(q, n, r, m, dtype, g, scale, k, chunk, as_ptr<float>(out_d),
                     as_ptr<std::int64_t>(out_i));
  } else {
    knn_impl<F32Kind>(q, n, r, m, dtype, g, scale, k, chunk, as_ptr<float>(out_d),
                      as_ptr<std::int64_t>(out_i));
  }
}

}  // namespace distance
}  // namespace memcore
