// CUDA implementation of the fused sampler step. See step.h.
//
// One thread per element (grid-stride). The per-step scalars are read from the coefficient table at the
// step index held in device memory, so a captured CUDA graph serves every step. Arithmetic goes through
// __f*_rn intrinsics (step.h) so nvcc never contracts into FMA: PyTorch's CUDA ops round each operation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/cuda_utils.h"
#include "step/step.h"

namespace memcore {
namespace step {
namespace {

struct LoadF32 {
  __device__ float operator()(const void* p, int64_t i) const { return static_cast<const float*>(p)[i]; }
};
struct LoadF16 {
  __device__ float operator()(const void* p, int64_t i) const {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
};
struct LoadBF16 {
  __device__ float operator()(const void* p, int64_t i) const {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
};
struct Identity {
  __device__ float operator()(float x) const { return x; }
};
struct RoundF16 {
  __device__ float operator()(float x) const { return __half2float(__float2half_rn(x)); }
};
struct RoundBF16 {
  __device__ float operator()(float x) const { return __bfloat162float(__float2bfloat16_rn(x)); }
};
struct StoreF32 {
  __device__ void operator()(void* p, int64_t i, float v) const { static_cast<float*>(p)[i] = v; }
};
struct StoreF16 {
  __device__ void operator()(void* p, int64_t i, float v) const {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
};
struct StoreBF16 {
  __device__ void operator()(void* p, int64_t i, float v) const {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
};

template <typename Load, typename Round, typename Store>
__global__ void step_kernel(StepArgs a, const int64_t* step_ptr) {
  const int64_t step = *step_ptr;
  const int64_t n = a.batch * a.chw;
  const bool bad = step < 0 || step >= a.num_steps;
  // A step index out of range cannot raise inside a graph: write NaN so the error is visible.
  const float* coef = a.table + (bad ? 0 : step) * kNumCols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = bad ? __int_as_float(0x7fc00000) : step_element(a, coef, i, Load{}, Round{});
    Store{}(a.out, i, v);
  }
}

template <typename Load, typename Round, typename Store>
void launch(const StepArgs& a, const int64_t* step_ptr, cudaStream_t stream) {
  const int64_t n = a.batch * a.chw;
  const int threads = 256;
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65535LL * 8) blocks = 65535LL * 8;  // grid-stride covers the rest
  step_kernel<Load, Round, Store><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a, step_ptr);
  MEMCORE_CUDA_CHECK_LAUNCH("step_kernel");
}

}  // namespace

void step_cuda(DType dtype, const StepArgs& a, const int64_t* step_ptr, std::uintptr_t stream_handle) {
  check(a.batch > 0 && a.chw > 0, "empty step");
  cudaStream_t stream = as_stream(stream_handle);
  const bool fp32 = (a.flags & kFp32) != 0;
  switch (dtype) {
    case DType::kFloat32:
      launch<LoadF32, Identity, StoreF32>(a, step_ptr, stream);
      break;
    case DType::kFloat16:
      if (fp32) {
        launch<LoadF16, Identity, StoreF16>(a, step_ptr, stream);
      } else {
        launch<LoadF16, RoundF16, StoreF16>(a, step_ptr, stream);
      }
      break;
    case DType::kBFloat16:
      if (fp32) {
        launch<LoadBF16, Identity, StoreBF16>(a, step_ptr, stream);
      } else {
        launch<LoadBF16, RoundBF16, StoreBF16>(a, step_ptr, stream);
      }
      break;
    default:
      fail(std::string("fused step: unsupported dtype ") + dtype_name(dtype));
  }
}

}  // namespace step
}  // namespace memcore
