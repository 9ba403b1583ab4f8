// CPU implementation of the fused sampler step (OpenMP over elements). See step.h.

// PyTorch rounds every operation on its own; never let the compiler fuse a * b + c (e.g. under -march
// with FMA and GCC's default -ffp-contract=fast), or float32 parity breaks.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <cstdint>
#include <string>

#include "step/step.h"

namespace memcore {
namespace step {
namespace {

struct LoadF32 {
  float operator()(const void* p, int64_t i) const { return static_cast<const float*>(p)[i]; }
};
struct LoadF16 {
  float operator()(const void* p, int64_t i) const { return half_to_float(static_cast<const uint16_t*>(p)[i]); }
};
struct LoadBF16 {
  float operator()(const void* p, int64_t i) const { return bf16_to_float(static_cast<const uint16_t*>(p)[i]); }
};
struct Identity {
  float operator()(float x) const { return x; }
};
struct RoundF16 {
  float operator()(float x) const { return half_to_float(float_to_half(x)); }
};
struct RoundBF16 {
  float operator()(float x) const { return bf16_to_float(float_to_bf16(x)); }
};

template <typename Load, typename Round, typename Store>
void run(const StepArgs& a, const float* coef, Load load, Round round, Store store) {
  const int64_t n = a.batch * a.chw;
#pragma omp parallel for schedule(static) if (n > 32768)
  for (int64_t i = 0; i < n; ++i) store(a.out, i, step_element(a, coef, i, load, round));
}

}  // namespace

void step_cpu(DType dtype, const StepArgs& a, int64_t step) {
  check(step >= 0 && step < a.num_steps,
        "step index " + std::to_string(step) + " out of range [0, " + std::to_string(a.num_steps) + ")");
  check(a.batch > 0 && a.chw > 0, "empty step");
  const float* coef = a.table + step * kNumCols;
  const bool fp32 = (a.flags & kFp32) != 0;
  switch (dtype) {
    case DType::kFloat32:
      run(a, coef, LoadF32{}, Identity{},
          [](void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; });
      break;
    case DType::kFloat16: {
      auto store = [](void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = float_to_half(v); };
      if (fp32) {
        run(a, coef, LoadF16{}, Identity{}, store);
      } else {
        run(a, coef, LoadF16{}, RoundF16{}, store);
      }
      break;
    }
    case DType::kBFloat16: {
      auto store = [](void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = float_to_bf16(v); };
      if (fp32) {
        run(a, coef, LoadBF16{}, Identity{}, store);
      } else {
        run(a, coef, LoadBF16{}, RoundBF16{}, store);
      }
      break;
    }
    default:
      fail(std::string("fused step: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace step
}  // namespace memcore
