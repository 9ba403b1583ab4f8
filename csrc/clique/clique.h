// Exact maximum clique on bitset graphs (the threshold graphs of Carlini et al. 2023, SPEC §2 step 3).
//
// Graph layout (the distance kernel's output, SPEC §7): row i of an n-vertex graph is `words` = ceil(n / 64)
// uint64 words; bit j of row i lives in word j / 64 at position j % 64 and is set iff i and j are adjacent.
// A valid graph is symmetric, has an empty diagonal and no bit set at a column >= n.
//
// Algorithm (clique_cpu.cpp): core decomposition (k-core pruning: a vertex of core number < k - 1 is in no
// clique of k members) -> greedy clique for a lower bound -> bit-parallel branch and bound with a greedy
// colouring bound (San Segundo's BBMC, Tomita's MCS ordering) to find the clique number omega -> a second,
// lexicographic search for the canonical answer: the lexicographically smallest sorted member list among
// all cliques of omega members. Everything is single-threaded and deterministic per graph; the batch runs
// graphs on a pool of threads, so results never depend on the thread count (a time limit aside).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace memcore {
namespace clique {

struct Options {
  // Only cliques of at least min_size members are of interest: k-core pruning with k = min_size, and a
  // graph whose clique number is below it returns no members (with exact = true once that is proven).
  int64_t min_size = 1;
  // Decision mode: stop at the first clique of >= min_size members (a witness, not necessarily maximum).
  bool decision = false;
  // Second pass that returns the lexicographically smallest maximum clique (the documented tie rule).
  bool canonical = true;
  // Branch-and-bound node budget over both passes (< 0: none); deterministic, unlike time_limit.
  int64_t node_budget = -1;
  // Wall-clock limit in seconds (<= 0 or NaN: none; longer than 1e9 s is capped there, past the clock's
  // int64 range); checked every 256 nodes.
  double time_limit = -1.0;
};

struct Result {
  std::vector<int32_t> members;  // sorted ascending, original vertex indices; empty or >= min_size members
  bool exact = true;             // the search finished: every claim below is proven (see Python docs)
  int64_t upper_bound = 0;       // proven: clique number <= upper_bound
  int64_t nodes = 0;             // branch-and-bound nodes explored (both passes)
};

// Throws std::invalid_argument naming the first violation (asymmetry, self loop, bit past column n).
void validate(const uint64_t* adj, int64_t n, int64_t words);

// adj: [n, words] bitset rows. Deterministic for a given (graph, options) unless time_limit stops it.
// Needs no validate() first: self loops and bits past column n are ignored (an O(n) scan; the graph is copied
// only if it has some), so no input can make the search loop outside the budget or index out of bounds. An
// asymmetric graph gives an unspecified answer (or std::invalid_argument naming the asymmetry), still
// within the budget and memory-safe.
Result solve(const uint64_t* adj, int64_t n, int64_t words, const Options& opt);

struct GraphRef {
  const uint64_t* adj;
  int64_t n;
  int64_t words;
};

// Solves every graph on `threads` worker threads (<= 0: hardware concurrency), dynamic scheduling. Per-graph
// errors (validation) are collected; the first one, by graph index, is rethrown after all workers joined.
std::vector<Result> solve_batch(const std::vector<GraphRef>& graphs, const Options& opt, int threads,
                                bool check);

// dist: [n, n] row-major (float32 or float64); out: [n, words] bitset. Edge (i, j) iff i != j and both
// dist[i, j] <= alpha and dist[j, i] <= alpha (a float kernel may round the two halves differently; taking
// both keeps the graph symmetric). A NaN anywhere throws.
void threshold_f32(const float* dist, int64_t n, double alpha, uint64_t* out);
void threshold_f64(const double* dist, int64_t n, double alpha, uint64_t* out);

// dense: [n, n] bool (one byte per entry, 0 or 1); out: [n, words] bitset (no validation here).
void pack_dense(const uint8_t* dense, int64_t n, uint64_t* out);

}  // namespace clique
}  // namespace memcore
