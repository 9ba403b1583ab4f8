// pybind11 bindings of the clique family (memcore._C.clique). Every entry point releases the GIL, so Python
// threads that drive GPU sampling keep running while cliques are searched.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "clique/clique.h"
#include "common/common.h"
#include "common/registry.h"

namespace py = pybind11;

namespace memcore {
namespace clique {
namespace {

Options make_options(int64_t min_size, bool decision, bool canonical, int64_t node_budget,
                     double time_limit) {
  Options o;
  o.min_size = min_size;
  o.decision = decision;
  o.canonical = canonical;
  o.node_budget = node_budget;
  o.time_limit = time_limit;
  return o;
}

// Writes the members into out (int64, room for n) and returns (size, exact, upper_bound, nodes).
py::tuple finish(const Result& r, std::uintptr_t out) {
  int64_t* o = as_ptr<int64_t>(out);
  for (size_t k = 0; k < r.members.size(); ++k) o[k] = r.members[k];
  return py::make_tuple(static_cast<int64_t>(r.members.size()), r.exact, r.upper_bound, r.nodes);
}

void register_clique(py::module_& m) {
  m.doc() = "Exact maximum clique on uint64 bitset graphs (BBMC after k-core pruning), threshold graphs.";
  m.def(
      "validate",
      [](std::uintptr_t adj, int64_t n, int64_t words) {
        py::gil_scoped_release nogil;
        validate(as_ptr<const uint64_t>(adj), n, words);
      },
      py::arg("adj"), py::arg("n"), py::arg("words"),
      "Raise ValueError unless the [n, words] bitset is symmetric, loop-free and zero-padded.");
  m.def(
      "solve",
      [](std::uintptr_t adj, int64_t n, int64_t words, std::uintptr_t out, int64_t min_size, bool decision,
         bool canonical, int64_t node_budget, double time_limit, bool check_graph) {
        Result r;
        {
          py::gil_scoped_release nogil;
          if (check_graph) validate(as_ptr<const uint64_t>(adj), n, words);
          r = solve(as_ptr<const uint64_t>(adj), n, words,
                    make_options(min_size, decision, canonical, node_budget, time_limit));
        }
        return finish(r, out);
      },
      py::arg("adj"), py::arg("n"), py::arg("words"), py::arg("out"), py::arg("min_size"),
      py::arg("decision"), py::arg("canonical"), py::arg("node_budget"), py::arg("time_limit"),
      py::arg("check"),
      "Solve one graph; members go to out (int64 [n]); returns (size, exact, upper_bound, nodes).");
  m.def(
      "solve_batch",
      [](const std::vector<std::tuple<std::uintptr_t, int64_t, int64_t>>& graphs,
         const std::vector<std::uintptr_t>& outs, int64_t min_size, bool decision, bool canonical,
         int64_t node_budget, double time_limit, int threads, bool check_graphs) {
        check(graphs.size() == outs.size(), "clique: one output buffer per graph");
        std::vector<GraphRef> refs;
        refs.reserve(graphs.size());
        for (const auto& g : graphs) {
          refs.push_back(GraphRef{as_ptr<const uint64_t>(std::get<0>(g)), std::get<1>(g), std::get<2>(g)});
        }
        std::vector<Result> results;
        {
          py::gil_scoped_release nogil;
          results = solve_batch(refs, make_options(min_size, decision, canonical, node_budget, time_limit),
                                threads, check_graphs);
        }
        py::list stats;
        for (size_t g = 0; g < results.size(); ++g) stats.append(finish(results[g], outs[g]));
        return stats;
      },
      py::arg("graphs"), py::arg("outs"), py::arg("min_size"), py::arg("decision"), py::arg("canonical"),
      py::arg("node_budget"), py::arg("time_limit"), py::arg("threads"), py::arg("check"),
      "Solve (adj, n, words) graphs on a thread pool; returns one (size, exact, upper_bound, nodes) per "
      "graph.");
  m.def(
      "threshold",
      [](std::uintptr_t dist, int dtype, int64_t n, double alpha, std::uintptr_t out) {
        py::gil_scoped_release nogil;
        if (dtype == static_cast<int>(DType::kFloat32)) {
          threshold_f32(as_ptr<const float>(dist), n, alpha, as_ptr<uint64_t>(out));
        } else if (dtype == static_cast<int>(DType::kFloat64)) {
          threshold_f64(as_ptr<const double>(dist), n, alpha, as_ptr<uint64_t>(out));
        } else {
          fail(std::string("threshold_graph: distances must be float32 or float64, got ") +
               dtype_name(static_cast<DType>(dtype)));
        }
      },
      py::arg("dist"), py::arg("dtype"), py::arg("n"), py::arg("alpha"), py::arg("out"),
      "[n, n] distances -> [n, ceil(n/64)] bitset: edge iff i != j and both halves <= alpha.");
  m.def(
      "pack_dense",
      [](std::uintptr_t dense, int64_t n, std::uintptr_t out) {
        py::gil_scoped_release nogil;
        pack_dense(as_ptr<const uint8_t>(dense), n, as_ptr<uint64_t>(out));
      },
      py::arg("dense"), py::arg("n"), py::arg("out"), "[n, n] bool -> [n, ceil(n/64)] bitset.");
}

}  // namespace
}  // namespace clique
}  // namespace memcore

MEMCORE_REGISTER_FAMILY(clique, memcore::clique::register_clique);
