// The fused sampler step: CFG combine, classifier guidance, DDIM / DDPM update and step noise in one pass.
//
// Formula and numeric modes: memcore/ops/step.py (module doc). Every tensor is contiguous, in the storage
// dtype (float32 / float16 / bfloat16) unless noted; n = batch * chw elements are written.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/common.h"

namespace memcore {
namespace step {

// Columns of the per-step coefficient table (must match memcore/ops/step.py).
enum Col : int {
  kColSA = 0,     // sqrt(abar_t) as a left multiplier
  kColSB = 1,     // sqrt(1 - abar_t) as a left multiplier
  kColDiv = 2,    // divisor of the x0 (epsilon) / eps (sample) formula
  kColRecip = 3,  // 1 / divisor in float32
  kColA = 4,      // coefficient of x0
  kColB = 5,      // coefficient of eps (DDIM) or x_t (DDPM)
  kColN = 6,      // coefficient of the step noise
  kColNMode = 7,  // 0: none, 1: + N * noise, 2: + 0 (DDPM final step)
  kColKC = 8,     // classifier guidance coefficient
  kNumCols = 9,
};

// Flag bits (must match memcore/ops/step.py).
enum Flag : int64_t {
  kCfg = 1,
  kRescale = 2,
  kCls = 4,
  kPredSample = 8,
  kPredV = 16,
  kClip = 32,
  kDdpm = 64,
  kFp32 = 128,
  kRecip = 256,
};

struct StepArgs {
  int64_t batch;       // B
  int64_t chw;         // C * H * W
  const void* sample;  // [B, C, H, W]
  const void* model;   // [B, C, H, W], or [2B, C, H, W] = cat([uncond, cond]) with kCfg
  const void* grad;    // [B, C, H, W] or null (kCls)
  const void* noise;   // [B, C, H, W] or null
  const float* ratio;  // [B] float32 std(cond) / std(cfg), or null (kRescale)
  void* out;           // [B, C, H, W]
  const float* table;  // [num_steps, kNumCols] float32
  int64_t num_steps;   // S
  int64_t flags;       // Flag bits
  float g;             // CFG scale
  float gr;            // guidance rescale factor
  float one_minus_gr;  // 1 - gr, rounded from double as PyTorch does for a Python float
  float clip;          // clip_sample_range
};

#if defined(__CUDACC__)
#define MEMCORE_HD __host__ __device__ __forceinline__
#else
#define MEMCORE_HD inline
#endif

// Arithmetic that is never contracted into FMA (nvcc contracts a * b + c by default; PyTorch rounds each
// operation on its own), so float32 storage stays bit-identical too.
MEMCORE_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MEMCORE_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MEMCORE_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
MEMCORE_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Element i of the step for one storage type. R(x) is "round to the storage dtype" between operations in
// parity mode and the identity in fp32 mode, so one body serves both; `coef` is the table row of the step.
template <typename Load, typename Round>
MEMCORE_HD float step_element(const StepArgs& a, const float* coef, int64_t i, Load load, Round R) {
  const int64_t f = a.flags;
  const int64_t b = i / a.chw;
  const float x = load(a.sample, i);
  float e;
  if (f & kCfg) {
    const float u = load(a.model, i);
    const float c = load(a.model, i + a.batch * a.chw);
    e = R(fadd(u, R(fmul(a.g, R(fsub(c, u))))));
    if (f & kRescale) {
      const float rs = R(fmul(e, a.ratio[b]));
      e = R(fadd(R(fmul(a.gr, rs)), R(fmul(a.one_minus_gr, e))));
    }
  } else {
    e = load(a.model, i);
  }
  if (f & kCls) e = R(fsub(e, R(fmul(coef[kColKC], load(a.grad, i)))));

  const float sa = coef[kColSA], sb = coef[kColSB];
  float x0, eps;
  if (f & kPredV) {
    x0 = R(fsub(R(fmul(sa, x)), R(fmul(sb, e))));
    eps = R(fadd(R(fmul(sa, e)), R(fmul(sb, x))));
  } else if (f & kPredSample) {
    x0 = e;
    const float num = R(fsub(x, R(fmul(sa, x0))));
    eps = R((f & kRecip) ? fmul(num, coef[kColRecip]) : fdiv(num, coef[kColDiv]));
  } else {
    const float num = R(fsub(x, R(fmul(sb, e))));
    x0 = R((f & kRecip) ? fmul(num, coef[kColRecip]) : fdiv(num, coef[kColDiv]));
    eps = e;
  }
  if (f & kClip) {
    // NaN stays NaN, as in torch.clamp; the bound is rounded to the storage dtype when it is taken
    if (x0 < -a.clip) {
      x0 = R(-a.clip);
    } else if (x0 > a.clip) {
      x0 = R(a.clip);
    }
  }
  const float second = (f & kDdpm) ? x : eps;
  float prev = R(fadd(R(fmul(coef[kColA], x0)), R(fmul(coef[kColB], second))));
  const float nmode = coef[kColNMode];
  if (nmode == 1.0f) {
    prev = R(fadd(prev, R(fmul(coef[kColN], load(a.noise, i)))));
  } else if (nmode == 2.0f) {
    prev = R(fadd(prev, 0.0f));  // diffusers adds the integer 0: -0 becomes +0
  }
  return prev;
}

// CPU (OpenMP). `step` indexes the table on the host.
void step_cpu(DType dtype, const StepArgs& args, int64_t step);
// Tests: force the baseline (SSE2) code path instead of the AVX2+F16C one, and ask which one runs.
void set_cpu_baseline(bool on);
bool cpu_uses_avx2();

#ifdef MEMCORE_WITH_CUDA
// CUDA. The step index is read on the device from `step_ptr` (int64, graph-capturable).
void step_cuda(DType dtype, const StepArgs& args, const int64_t* step_ptr, std::uintptr_t stream);
#endif

}  // namespace step
}  // namespace memcore
