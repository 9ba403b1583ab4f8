// The extension module memcore._C: build information, CUDA availability, and every registered family.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common/registry.h"

#ifdef MEMCORE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace memcore {

std::vector<std::pair<const char*, RegisterFn>>& family_registry() {
  static std::vector<std::pair<const char*, RegisterFn>> registry;
  return registry;
}

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = MEMCORE_VERSION;
  info["cpu"] = true;
#ifdef MEMCORE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(MEMCORE_CUDA_ARCHS);
  info["cuda_compiler_version"] = std::string(MEMCORE_CUDA_VERSION);
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string("");
  info["cuda_compiler_version"] = std::string("");
  info["cuda_runtime_version"] = 0;
#endif
  info["openmp"] = static_cast<bool>(MEMCORE_OPENMP_ENABLED);
  info["cxx_compiler"] = MEMCORE_CXX_COMPILER;
  py::list families;
  for (const auto& entry : family_registry()) families.append(entry.first);
  info["families"] = families;
  return info;
}

// (device count, status text). With the CUDA part built but no driver, cudaGetDeviceCount returns error 35
// (cudaErrorInsufficientDriver) or 100 (no device): that is "CUDA built, no device", not an error.
py::tuple cuda_device_status() {
#ifdef MEMCORE_WITH_CUDA
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return py::make_tuple(0, std::string("CUDA built, no device (") + cudaGetErrorName(err) + ")");
  }
  return py::make_tuple(count, std::string("CUDA built, ") + std::to_string(count) + " device(s)");
#else
  return py::make_tuple(0, std::string("CUDA not built"));
#endif
}

}  // namespace
}  // namespace memcore

PYBIND11_MODULE(_C, m) {
  m.doc() = "memcore native core (C++ always, CUDA when built). Called only from memcore.ops.";
  m.def("build_info", &memcore::build_info, "What this extension was built with.");
  m.def("cuda_device_status", &memcore::cuda_device_status,
        "(device_count, text): usable CUDA devices as the CUDA runtime sees them.");
  for (const auto& entry : memcore::family_registry()) {
    py::module_ sub = m.def_submodule(entry.first);
    entry.second(sub);
  }
}
