// memcore._C.distance: the distance family's launchers (called only from memcore/ops/distance.py).
#include <pybind11/pybind11.h>

#include "common/registry.h"
#include "distance/distance.h"

namespace py = pybind11;

namespace {

void register_distance(py::module_& m) {
  m.doc() = "Normalized / tiled L2 matrices, k-NN and bitset graphs (see csrc/distance/distance.h).";
  m.def("matrix", &memcore::distance::matrix_cpu, py::call_guard<py::gil_scoped_release>());
  m.def("graph", &memcore::distance::graph_cpu, py::call_guard<py::gil_scoped_release>());
  m.def("knn", &memcore::distance::knn_cpu, py::call_guard<py::gil_scoped_release>());
#ifdef MEMCORE_WITH_CUDA
  m.def("matrix_cuda", &memcore::distance::matrix_cuda);
  m.def("graph_cuda", &memcore::distance::graph_cuda);
#endif
}

}  // namespace

MEMCORE_REGISTER_FAMILY(distance, register_distance);
