// Shared conventions of the native core: dtype codes, pointer/stream passing, error reporting.
//
// The core never links libtorch. Python (memcore/ops) passes raw data pointers and CUDA streams as
// integers, sizes and strides as int64, and a dtype code from the table below; it has already checked
// device, contiguity and dtype, so the core only re-checks cheap invariants and reports violations with
// std::invalid_argument (pybind11 turns it into ValueError).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace memcore {

// Must match memcore/ops/_native.py::DTYPE_CODES.
enum class DType : int {
  kUInt8 = 0,
  kFloat32 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
  kFloat64 = 4,
  kInt32 = 5,
  kInt64 = 6,
  kUInt64 = 7,
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kUInt8: return "uint8";
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt64: return "uint64";
  }
  return "unknown";
}

template <typename T>
inline T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument("memcore: " + msg); }

inline void check(bool cond, const std::string& msg) {
  if (!cond) fail(msg);
}

// Bit-exact conversions for the 16-bit float storage types on the CPU (no hardware type needed).
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1Fu;
  std::uint32_t mant = h & 0x3FFu;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3FFu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float bf16_to_float(std::uint16_t b) {
  std::uint32_t bits = static_cast<std::uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round-to-nearest-even float -> bf16 / fp16, matching PyTorch's CPU conversions (NaN stays NaN).
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  const std::uint32_t rounding_bias = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding_bias) >> 16);
}

inline std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  __builtin_memcpy(&x, &f, sizeof(x));
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  std::uint32_t abs = x & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u);  // NaN
  if (abs >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // overflow -> inf
  if (abs < 0x38800000u) {  // result is a half subnormal or zero
    // Adding 0.5f puts the half subnormal unit (2^-24) at float's ulp, so the FPU rounds to nearest even.
    float af;
    __builtin_memcpy(&af, &abs, sizeof(af));
    const float magic = af + 0.5f;
    std::uint32_t mb;
    __builtin_memcpy(&mb, &magic, sizeof(mb));
    return static_cast<std::uint16_t>(sign | (mb - 0x3F000000u));
  }
  const std::uint32_t mant_odd = (abs >> 13) & 1u;
  abs += 0xC8000FFFu + mant_odd;  // re-bias exponent (-112 << 23) and round to nearest even
  return static_cast<std::uint16_t>(sign | (abs >> 13));
}

}  // namespace memcore
