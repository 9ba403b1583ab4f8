// CPU implementation of the fused sampler step. See step.h for the formula (step_element, which the CUDA
// kernel runs per element).
//
// The CPU walks the tensors in blocks of kBlock elements that stay in L1, and runs the same sequence of
// operations as step_element one operation at a time over the block: each loop is branch-free, so the
// compiler vectorises it (SSE2 at least), and the float16/bfloat16 roundings are branch-free bit
// arithmetic. One pass over memory, as the fused kernel promises; the result is identical to step_element
// (round-to-nearest-even after each operation in parity mode, or only at the store in fp32 mode).

// PyTorch rounds every operation on its own; never let the compiler fuse a * b + c (e.g. under -march
// with FMA and GCC's default -ffp-contract=fast), or float32 parity breaks. no-trapping-math only lets GCC
// evaluate both sides of the branch-free selects below (it changes no value), so those loops vectorise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <cstdint>
#include <cstring>
#include <string>

#include "step/step.h"

namespace memcore {
namespace step {
namespace {

constexpr int kBlock = 512;

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ---- branch-free conversions (vectorisable) ----------------------------------------------------------

// float16 bits -> float (exact; subnormals via an exact integer-to-float product).
inline float h2f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  const uint32_t exp = em >> 10;
  const uint32_t normal = (em << 13) + 0x38000000u;          // re-bias exponent 15 -> 127
  const uint32_t infnan = (em << 13) + 0x70000000u;  // exponent 31 -> 255
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // em * 2^-24
  uint32_t mag = exp == 0x1Fu ? infnan : normal;
  mag = exp == 0 ? f2u(sub) : mag;
  return u2f(mag | sign);
}

// float -> the nearest float16 value (ties to even), still as a float; NaN stays NaN, overflow -> inf.
inline float round_f16(float v) {
  const uint32_t bits = f2u(v);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t abs = bits & 0x7FFFFFFFu;
  uint32_t normal = (abs + 0xFFFu + ((abs >> 13) & 1u)) & 0xFFFFE000u;
  normal = normal >= 0x47800000u ? 0x7F800000u : normal;
  // Below 2^-14 the float16 grid is 2^-24: adding 0.5 puts that grid on float's ulp, so the FPU rounds.
  const float sub = (u2f(abs) + 0.5f) - 0.5f;
  uint32_t mag = abs < 0x38800000u ? f2u(sub) : normal;
  mag = abs > 0x7F800000u ? abs : mag;
  return u2f(mag | sign);
}

// A float that holds a float16 value (or inf / NaN) -> its float16 bits, branch-free.
inline uint16_t f16_bits(float r) {
  const uint32_t bits = f2u(r);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7FFFFFFFu;
  const uint32_t normal = (abs - 0x38000000u) >> 13;
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(u2f(abs) * 16777216.0f));  // k * 2^-24
  uint32_t h = abs < 0x38800000u ? sub : normal;
  h = abs >= 0x7F800000u ? (abs == 0x7F800000u ? 0x7C00u : 0x7E00u) : h;
  return static_cast<uint16_t>(h | sign);
}

inline uint16_t bf16_bits(float v) {
  const uint32_t bits = f2u(v);
  const uint32_t r = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((bits & 0x7FFFFFFFu) > 0x7F800000u ? ((bits >> 16) | 0x40u) : r);
}

inline float bf2f(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }

// float -> the nearest bfloat16 value (ties to even), still as a float; NaN stays NaN.
inline float round_bf16(float v) {
  const uint32_t bits = f2u(v);
  const uint32_t r = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? v : u2f(r);
}

struct F32 {
  using T = float;
  static void load(const void* p, int64_t i0, int n, float* out) {
    const float* s = static_cast<const float*>(p) + i0;
    for (int k = 0; k < n; ++k) out[k] = s[k];
  }
  static void store(void* p, int64_t i0, int n, const float* v) {
    float* d = static_cast<float*>(p) + i0;
    for (int k = 0; k < n; ++k) d[k] = v[k];
  }
  static void round(float*, int) {}
};

struct F16 {
  static void load(const void* p, int64_t i0, int n, float* out) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + i0;
    for (int k = 0; k < n; ++k) out[k] = h2f(s[k]);
  }
  static void store(void* p, int64_t i0, int n, const float* v) {
    uint16_t* d = static_cast<uint16_t*>(p) + i0;
    for (int k = 0; k < n; ++k) d[k] = f16_bits(round_f16(v[k]));
  }
  static void round(float* v, int n) {
    for (int k = 0; k < n; ++k) v[k] = round_f16(v[k]);
  }
};

struct BF16 {
  static void load(const void* p, int64_t i0, int n, float* out) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + i0;
    for (int k = 0; k < n; ++k) out[k] = bf2f(s[k]);
  }
  static void store(void* p, int64_t i0, int n, const float* v) {
    uint16_t* d = static_cast<uint16_t*>(p) + i0;
    for (int k = 0; k < n; ++k) d[k] = bf16_bits(v[k]);
  }
  static void round(float* v, int n) {
    for (int k = 0; k < n; ++k) v[k] = round_bf16(v[k]);
  }
};

// ---- one block: the operations of step_element, each as a loop over the block -----------------------

template <typename IO>
void run_block(const StepArgs& a, const float* coef, int64_t i0, int n, bool parity) {
  alignas(64) float x[kBlock], e[kBlock], t[kBlock], x0[kBlock], eps[kBlock];
  auto R = [&](float* v) {
    if (parity) IO::round(v, n);
  };
  const int64_t f = a.flags;
  IO::load(a.sample, i0, n, x);
  if (f & kCfg) {
    IO::load(a.model, i0, n, e);                    // u
    IO::load(a.model, i0 + a.batch * a.chw, n, t);  // c
    for (int k = 0; k < n; ++k) t[k] = t[k] - e[k];
    R(t);
    for (int k = 0; k < n; ++k) t[k] = a.g * t[k];
    R(t);
    for (int k = 0; k < n; ++k) e[k] = e[k] + t[k];
    R(e);
    if (f & kRescale) {
      for (int k = 0; k < n; ++k) t[k] = e[k] * a.ratio[(i0 + k) / a.chw];
      R(t);
      for (int k = 0; k < n; ++k) t[k] = a.gr * t[k];
      R(t);
      for (int k = 0; k < n; ++k) x0[k] = a.one_minus_gr * e[k];
      R(x0);
      for (int k = 0; k < n; ++k) e[k] = t[k] + x0[k];
      R(e);
    }
  } else {
    IO::load(a.model, i0, n, e);
  }
  if (f & kCls) {
    const float kc = coef[kColKC];
    IO::load(a.grad, i0, n, t);
    for (int k = 0; k < n; ++k) t[k] = kc * t[k];
    R(t);
    for (int k = 0; k < n; ++k) e[k] = e[k] - t[k];
    R(e);
  }

  const float sa = coef[kColSA], sb = coef[kColSB], div = coef[kColDiv], recip = coef[kColRecip];
  const bool use_recip = (f & kRecip) != 0;
  if (f & kPredV) {
    for (int k = 0; k < n; ++k) x0[k] = sa * x[k];
    R(x0);
    for (int k = 0; k < n; ++k) t[k] = sb * e[k];
    R(t);
    for (int k = 0; k < n; ++k) x0[k] = x0[k] - t[k];
    R(x0);
    for (int k = 0; k < n; ++k) eps[k] = sa * e[k];
    R(eps);
    for (int k = 0; k < n; ++k) t[k] = sb * x[k];
    R(t);
    for (int k = 0; k < n; ++k) eps[k] = eps[k] + t[k];
    R(eps);
  } else if (f & kPredSample) {
    for (int k = 0; k < n; ++k) x0[k] = e[k];
    for (int k = 0; k < n; ++k) t[k] = sa * x0[k];
    R(t);
    for (int k = 0; k < n; ++k) t[k] = x[k] - t[k];
    R(t);
    if (use_recip) {
      for (int k = 0; k < n; ++k) eps[k] = t[k] * recip;
    } else {
      for (int k = 0; k < n; ++k) eps[k] = t[k] / div;
    }
    R(eps);
  } else {
    for (int k = 0; k < n; ++k) t[k] = sb * e[k];
    R(t);
    for (int k = 0; k < n; ++k) t[k] = x[k] - t[k];
    R(t);
    if (use_recip) {
      for (int k = 0; k < n; ++k) x0[k] = t[k] * recip;
    } else {
      for (int k = 0; k < n; ++k) x0[k] = t[k] / div;
    }
    R(x0);
    for (int k = 0; k < n; ++k) eps[k] = e[k];
  }
  if (f & kClip) {
    // NaN stays NaN, as in torch.clamp; the bound is rounded to the storage dtype when it is taken
    float lo = -a.clip, hi = a.clip;
    if (parity) {
      IO::round(&lo, 1);
      IO::round(&hi, 1);
    }
    const float c = a.clip;
    for (int k = 0; k < n; ++k) {
      const float v = x0[k];
      x0[k] = v < -c ? lo : (v > c ? hi : v);
    }
  }
  const float* second = (f & kDdpm) ? x : eps;
  const float ca = coef[kColA], cb = coef[kColB];
  for (int k = 0; k < n; ++k) x0[k] = ca * x0[k];
  R(x0);
  for (int k = 0; k < n; ++k) t[k] = cb * second[k];
  R(t);
  for (int k = 0; k < n; ++k) x0[k] = x0[k] + t[k];
  R(x0);
  const float nmode = coef[kColNMode];
  if (nmode == 1.0f) {
    const float cn = coef[kColN];
    IO::load(a.noise, i0, n, t);
    for (int k = 0; k < n; ++k) t[k] = cn * t[k];
    R(t);
    for (int k = 0; k < n; ++k) x0[k] = x0[k] + t[k];
    R(x0);
  } else if (nmode == 2.0f) {
    for (int k = 0; k < n; ++k) x0[k] = x0[k] + 0.0f;  // diffusers adds the integer 0: -0 becomes +0
    R(x0);
  }
  IO::store(a.out, i0, n, x0);
}

template <typename IO>
void run(const StepArgs& a, const float* coef, bool parity) {
  const int64_t n = a.batch * a.chw;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (blocks > 64)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * kBlock;
    const int len = static_cast<int>(n - i0 < kBlock ? n - i0 : kBlock);
    run_block<IO>(a, coef, i0, len, parity);
  }
}

}  // namespace

void step_cpu(DType dtype, const StepArgs& a, int64_t step) {
  check(step >= 0 && step < a.num_steps,
        "step index " + std::to_string(step) + " out of range [0, " + std::to_string(a.num_steps) + ")");
  check(a.batch > 0 && a.chw > 0, "empty step");
  const float* coef = a.table + step * kNumCols;
  const bool parity = (a.flags & kFp32) == 0;
  switch (dtype) {
    case DType::kFloat32:
      run<F32>(a, coef, false);  // float32 storage: every operation already rounds to float32
      break;
    case DType::kFloat16:
      run<F16>(a, coef, parity);
      break;
    case DType::kBFloat16:
      run<BF16>(a, coef, parity);
      break;
    default:
      fail(std::string("fused step: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace step
}  // namespace memcore
