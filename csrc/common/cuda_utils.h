// CUDA helpers for the .cu files: error checks and the stream passed from Python as an integer.
#pragma once

#ifdef MEMCORE_WITH_CUDA
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace memcore {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("memcore CUDA error in ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Python passes torch.cuda.current_stream().cuda_stream (an integer handle; 0 = legacy default stream).
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace memcore

#define MEMCORE_CUDA_CHECK(expr) ::memcore::cuda_check((expr), #expr)
// After a launch: catches bad configurations at once; asynchronous faults surface at the next sync.
#define MEMCORE_CUDA_CHECK_LAUNCH(name) ::memcore::cuda_check(cudaGetLastError(), name)

#endif  // MEMCORE_WITH_CUDA
