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

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MEMCORE_STEP_X86 1
#endif

#include "step/step.h"

namespace memcore {
namespace step {
namespace {

constexpr int kBlock = 512;
#if defined(MEMCORE_STEP_X86)
constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif

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
  const uint32_t normal = (em << 13) + 0x38000000u;  // re-bias exponent 15 -> 127
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

inline float bf2f(uint16_t b) {
  return u2f(static_cast<uint32_t>(b) << 16);
}

// float -> the nearest bfloat16 value (ties to even), still as a float; NaN stays NaN.
inline float round_bf16(float v) {
  const uint32_t bits = f2u(v);
  const uint32_t r = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? v : u2f(r);
}

namespace baseline {
#include "step/step_cpu_block.inc"
}  // namespace baseline

#if defined(MEMCORE_STEP_X86)
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define MEMCORE_STEP_F16C 1
namespace avx2 {
#include "step/step_cpu_block.inc"
}  // namespace avx2
#undef MEMCORE_STEP_F16C
#pragma GCC pop_options
#endif

std::atomic<bool> g_force_baseline{false};

bool use_avx2() {
#if defined(MEMCORE_STEP_X86)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok && !g_force_baseline.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

#if defined(MEMCORE_STEP_X86)
#define IF_X86(x) x
#else
#define IF_X86(x) (void)0
#endif

}  // namespace

void set_cpu_baseline(bool on) {
  g_force_baseline.store(on);
}

bool cpu_uses_avx2() {
  return use_avx2();
}

void step_cpu(DType dtype, const StepArgs& a, int64_t step) {
  check(step >= 0 && step < a.num_steps,
        "step index " + std::to_string(step) + " out of range [0, " + std::to_string(a.num_steps) + ")");
  check(a.batch > 0 && a.chw > 0, "empty step");
  const float* coef = a.table + step * kNumCols;
  const bool parity = (a.flags & kFp32) == 0;
  const bool fast = use_avx2();
  switch (dtype) {
    case DType::kFloat32:  // float32 storage: every operation already rounds to float32
      if (fast) {
        IF_X86(avx2::run<avx2::F32>(a, coef, false));
      } else {
        baseline::run<baseline::F32>(a, coef, false);
      }
      break;
    case DType::kFloat16:
      if (fast) {
        IF_X86(avx2::run<avx2::F16>(a, coef, parity));
      } else {
        baseline::run<baseline::F16>(a, coef, parity);
      }
      break;
    case DType::kBFloat16:
      if (fast) {
        IF_X86(avx2::run<avx2::BF16>(a, coef, parity));
      } else {
        baseline::run<baseline::BF16>(a, coef, parity);
      }
      break;
    default:
      fail(std::string("fused step: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace step
}  // namespace memcore
