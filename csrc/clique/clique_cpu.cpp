// CPU implementation of the clique engine; see clique.h for the contract and the algorithm outline.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <thread>

#include "clique/clique.h"
#include "common/common.h"

namespace memcore {
namespace clique {
namespace {

inline int popcount(uint64_t x) {
  return __builtin_popcountll(x);
}
inline int ctz(uint64_t x) {
  return __builtin_ctzll(x);
}
inline bool test_bit(const uint64_t* row, int64_t j) {
  return (row[j >> 6] >> (j & 63)) & 1u;
}
inline void set_bit(uint64_t* row, int64_t j) {
  row[j >> 6] |= uint64_t{1} << (j & 63);
}
inline void clear_bit(uint64_t* row, int64_t j) {
  row[j >> 6] &= ~(uint64_t{1} << (j & 63));
}

// In-place transpose of a 64 x 64 bit matrix (row r = a[r], column c = bit c, LSB first): the recursive
// block swap of Hacker's Delight 7-3, written for the LSB-first convention.
void transpose64(uint64_t a[64]) {
  uint64_t m = 0x00000000FFFFFFFFull;
  for (int j = 32; j != 0; j >>= 1, m ^= m << j) {
    for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
      const uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
      a[k] ^= t << j;
      a[k | j] ^= t;
    }
  }
}

// Loads the 64 x 64 block (row block rb, word wb) of a [n, words] bitset; rows past n are zero.
inline void load_block(const uint64_t* adj, int64_t n, int64_t words, int64_t rb, int64_t wb,
                       uint64_t b[64]) {
  for (int r = 0; r < 64; ++r) {
    const int64_t i = rb * 64 + r;
    b[r] = i < n ? adj[i * words + wb] : 0;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Core decomposition (Batagelj & Zaversnik 2003) on a bitset graph: O(n + m). `order` is the removal order
// (non-decreasing core number), the degeneracy ordering that Tomita's MCS and BBMC sort by.
void core_decomposition(const uint64_t* adj, int64_t n, int64_t words, std::vector<int32_t>& core,
                        std::vector<int32_t>& order) {
  std::vector<int32_t> deg(n), pos(n), bin;
  order.assign(n, 0);
  core.assign(n, 0);
  int32_t md = 0;
  for (int64_t v = 0; v < n; ++v) {
    int d = 0;
    for (int64_t w = 0; w < words; ++w) d += popcount(adj[v * words + w]);
    deg[v] = d;
    md = std::max(md, d);
  }
  bin.assign(md + 1, 0);
  for (int64_t v = 0; v < n; ++v) ++bin[deg[v]];
  int32_t start = 0;
  for (int32_t d = 0; d <= md; ++d) {
    const int32_t c = bin[d];
    bin[d] = start;
    start += c;
  }
  for (int64_t v = 0; v < n; ++v) {
    pos[v] = bin[deg[v]]++;
    order[pos[v]] = static_cast<int32_t>(v);
  }
  for (int32_t d = md; d > 0; --d) bin[d] = bin[d - 1];
  if (md >= 0 && !bin.empty()) bin[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t v = order[i];
    core[v] = deg[v];
    const uint64_t* row = adj + static_cast<int64_t>(v) * words;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t bits = row[w];
      while (bits) {
        const int32_t u = static_cast<int32_t>(w * 64 + ctz(bits));
        bits &= bits - 1;
        if (deg[u] > deg[v]) {  // move u one bin down, swapping it with the first vertex of its bin
          const int32_t du = deg[u], pu = pos[u], pw = bin[du], wv = order[pw];
          if (u != wv) {
            pos[u] = pw;
            order[pu] = wv;
            pos[wv] = pu;
            order[pw] = u;
          }
          ++bin[du];
          --deg[u];
        }
      }
    }
  }
}

using Clock = std::chrono::steady_clock;

// Shared work counter of both passes: the node budget is deterministic, the time limit is not.
struct Budget {
  int64_t nodes = 0;
  int64_t node_budget = -1;
  bool has_deadline = false;
  Clock::time_point deadline;
  bool stopped = false;

  // Counts one node; false once the budget is spent (and from then on).
  inline bool tick() {
    if (stopped) return false;
    ++nodes;
    if (node_budget >= 0 && nodes > node_budget) stopped = true;
    if (has_deadline && (nodes & 255) == 0 && Clock::now() >= deadline) stopped = true;
    return !stopped;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Pass 1: BBMC (San Segundo et al. 2011) on the renumbered subgraph. Finds a clique larger than `thr`
// (the best size so far, or min_size - 1), raising `thr` as it goes; in decision mode it stops at `target`.
class MaxSearch {
 public:
  MaxSearch(int64_t m, Budget& budget) : m_(m), w_((m + 63) / 64), budget_(budget) {
    adj_.assign(static_cast<size_t>(m_ * w_), 0);
    u_.assign(w_, 0);
    q_.assign(w_, 0);
  }

  uint64_t* row(int64_t v) { return adj_.data() + v * w_; }
  int64_t words() const { return w_; }

  // Greedy clique from each start vertex in renumbered order (highest core first): repeatedly add the first
  // candidate. `core_of` gives each renumbered vertex's core number (to skip starts that cannot improve).
  void greedy(const std::vector<int32_t>& core_of, int64_t root_count) {
    std::vector<uint64_t> p(w_);
    std::vector<int32_t> c;
    for (int64_t s = 0; s < root_count; ++s) {
      if (core_of[s] + 1 <= thr_) break;  // cores are non-increasing along the order
      c.clear();
      c.push_back(static_cast<int32_t>(s));
      const uint64_t* rs = row(s);
      for (int64_t w = 0; w < w_; ++w) p[w] = rs[w] & root_mask(w, root_count);
      int64_t lo = 0;
      while (true) {
        while (lo < w_ && p[lo] == 0) ++lo;
        if (lo == w_) break;
        const int64_t v = lo * 64 + ctz(p[lo]);
        c.push_back(static_cast<int32_t>(v));
        p[lo] &= p[lo] - 1;  // drop v itself, so the loop ends even if its row were to hold a self loop
        const uint64_t* rv = row(v);
        for (int64_t w = lo; w < w_; ++w) p[w] &= rv[w];
      }
      if (static_cast<int64_t>(c.size()) > thr_) {
        thr_ = static_cast<int64_t>(c.size());
        best_ = c;
      }
      if (decision_ && thr_ >= target_) return;
    }
  }

  // Runs BBMC from the root candidate set {0, .., root_count - 1}; returns false if the budget stopped it.
  bool run(int64_t root_count) {
    std::vector<uint64_t> p(w_, 0);
    for (int64_t v = 0; v < root_count; ++v) set_bit(p.data(), v);
    pstack_.assign(static_cast<size_t>(w_ * (root_count + 2)), 0);
    std::copy(p.begin(), p.end(), pstack_.begin());
    cur_.assign(root_count + 1, 0);
    expand(0, 0);
    return !budget_.stopped;
  }

  int64_t thr_ = 0;     // cliques of thr_ members or fewer are of no interest
  int64_t target_ = 0;  // decision mode: stop once thr_ >= target_
  bool decision_ = false;
  std::vector<int32_t> best_;       // renumbered members of the best clique found
  int64_t root_bound_ = INT64_MAX;  // clique number of what the root has not finished yet

 private:
  uint64_t root_mask(int64_t w, int64_t count) const {
    const int64_t lo = w * 64;
    if (count >= lo + 64) return ~uint64_t{0};
    if (count <= lo) return 0;
    return (uint64_t{1} << (count - lo)) - 1;
  }

  bool done() const { return budget_.stopped || (decision_ && thr_ >= target_); }

  void expand(int64_t depth, int64_t csize) {
    if (!budget_.tick()) return;
    uint64_t* p = pstack_.data() + depth * w_;
    // Greedy sequential colouring in class order; only vertices whose colour can still lift the clique
    // above thr_ are kept for branching (BBMC-R): colour >= kmin.
    const int64_t kmin = thr_ - csize + 1;
    const size_t base = lv_.size();
    int64_t lo = 0, hi = w_ - 1;
    while (lo <= hi && p[lo] == 0) ++lo;
    while (hi >= lo && p[hi] == 0) --hi;
    if (lo > hi) return;
    for (int64_t w = lo; w <= hi; ++w) u_[w] = p[w];
    int32_t col = 0;
    int64_t ulo = lo;
    while (true) {
      while (ulo <= hi && u_[ulo] == 0) ++ulo;
      if (ulo > hi) break;
      ++col;
      for (int64_t w = ulo; w <= hi; ++w) q_[w] = u_[w];
      int64_t qlo = ulo;
      while (true) {
        while (qlo <= hi && q_[qlo] == 0) ++qlo;
        if (qlo > hi) break;
        const int64_t v = qlo * 64 + ctz(q_[qlo]);
        const uint64_t bit = uint64_t{1} << (v & 63);
        u_[qlo] &= ~bit;
        q_[qlo] &= ~bit;
        const uint64_t* rv = row(v);
        for (int64_t w = qlo; w <= hi; ++w) q_[w] &= ~rv[w];
        if (col >= kmin) {
          lv_.push_back(static_cast<int32_t>(v));
          lc_.push_back(col);
        }
      }
    }
    if (depth == 0) root_bound_ = std::min<int64_t>(root_bound_, col);
    uint64_t* pn = p + w_;
    for (size_t i = lv_.size(); i-- > base;) {
      const int32_t v = lv_[i];
      const int32_t c = lc_[i];
      if (csize + c <= thr_) break;
      if (depth == 0) root_bound_ = c;  // everything not yet finished lies in a set coloured with c colours
      cur_[csize] = v;
      const uint64_t* rv = row(v);
      bool empty = true;
      for (int64_t w = lo; w <= hi; ++w) {
        pn[w] = p[w] & rv[w];
        empty &= pn[w] == 0;
      }
      for (int64_t w = 0; w < lo; ++w) pn[w] = 0;
      for (int64_t w = hi + 1; w < w_; ++w) pn[w] = 0;
      if (empty) {
        if (csize + 1 > thr_) {
          thr_ = csize + 1;
          best_.assign(cur_.begin(), cur_.begin() + csize + 1);
        }
      } else {
        expand(depth + 1, csize + 1);
      }
      if (done()) break;
      clear_bit(p, v);
    }
    lv_.resize(base);
    lc_.resize(base);
  }

  int64_t m_, w_;
  Budget& budget_;
  std::vector<uint64_t> adj_, u_, q_, pstack_;
  std::vector<int32_t> lv_, lc_, cur_;
};

// ---------------------------------------------------------------------------------------------------------
// Pass 2: the lexicographically smallest clique of exactly `omega` members, in original vertex numbering.
// Depth-first over increasing member lists in lexicographic order, so the first clique found is the smallest;
// a colouring of each node's candidates bounds every suffix (the number of colour classes meeting it).
class LexSearch {
 public:
  LexSearch(const uint64_t* adj, int64_t n, int64_t words, int64_t omega, Budget& budget)
      : adj_(adj), n_(n), w_(words), omega_(omega), budget_(budget) {
    u_.assign(w_, 0);
    q_.assign(w_, 0);
    colour_of_.assign(n_, 0);
    seen_.assign(n_ + 2, 0);
  }

  // root: [words] candidate set (vertices of core >= omega - 1). Returns true once found (members in out).
  bool run(const std::vector<uint64_t>& root, std::vector<int32_t>& out) {
    pstack_.assign(static_cast<size_t>(w_ * (omega_ + 1)), 0);
    std::copy(root.begin(), root.end(), pstack_.begin());
    cur_.assign(omega_, 0);
    const bool found = expand(0, 0);
    if (found) out.assign(cur_.begin(), cur_.end());
    return found;
  }

 private:
  bool expand(int64_t depth, int64_t csize) {
    if (!budget_.tick()) return false;
    const uint64_t* p = pstack_.data() + depth * w_;
    const int64_t need = omega_ - csize;
    int64_t lo = 0, hi = w_ - 1;
    while (lo <= hi && p[lo] == 0) ++lo;
    while (hi >= lo && p[hi] == 0) --hi;
    int64_t cnt = 0;
    for (int64_t w = lo; w <= hi; ++w) cnt += popcount(p[w]);
    if (cnt < need) return false;
    // Greedy probe: the leftmost descent of this search takes the smallest candidate at every level. If it
    // completes, each vertex it took was the smallest feasible one, so it is the answer: O(need * words)
    // instead of a colouring per level (a memorized prompt's big clique is found this way at once).
    {
      uint64_t* g = q_.data();
      for (int64_t w = lo; w <= hi; ++w) g[w] = p[w];
      int64_t glo = lo, got = 0;
      while (got < need) {
        while (glo <= hi && g[glo] == 0) ++glo;
        if (glo > hi) break;
        const int64_t v = glo * 64 + ctz(g[glo]);
        cur_[csize + got++] = static_cast<int32_t>(v);
        g[glo] &= g[glo] - 1;  // drop v itself; later candidates are all > v
        const uint64_t* rv = adj_ + v * w_;
        for (int64_t w = glo; w <= hi; ++w) g[w] &= rv[w];
      }
      if (got == need) return true;
    }
    // Colour the candidates class by class sweeping from the highest index down. That is first-fit colouring
    // in descending order, so the colours met by each suffix {u >= v} are exactly first-fit on that suffix
    // alone: a tight bound for every branch. No clique of `need` members starts at a suffix with fewer.
    for (int64_t w = lo; w <= hi; ++w) u_[w] = p[w];
    int32_t col = 0;
    int64_t uhi = hi;
    while (true) {
      while (uhi >= lo && u_[uhi] == 0) --uhi;
      if (uhi < lo) break;
      ++col;
      for (int64_t w = lo; w <= uhi; ++w) q_[w] = u_[w];
      int64_t qhi = uhi;
      while (true) {
        while (qhi >= lo && q_[qhi] == 0) --qhi;
        if (qhi < lo) break;
        const int64_t v = qhi * 64 + 63 - __builtin_clzll(q_[qhi]);
        const uint64_t bit = uint64_t{1} << (v & 63);
        u_[qhi] &= ~bit;
        q_[qhi] &= ~bit;
        const uint64_t* rv = adj_ + v * w_;
        for (int64_t w = lo; w <= qhi; ++w) q_[w] &= ~rv[w];
        colour_of_[v] = col;
      }
    }
    if (col < need) return false;
    const size_t base = lv_.size();
    for (int64_t w = lo; w <= hi; ++w) {
      uint64_t bits = p[w];
      while (bits) {
        lv_.push_back(static_cast<int32_t>(w * 64 + ctz(bits)));
        bits &= bits - 1;
      }
    }
    ls_.resize(lv_.size());
    int32_t distinct = 0;
    if (++stamp_ == 0) {  // wrapped: forget every old stamp
      std::fill(seen_.begin(), seen_.end(), 0u);
      stamp_ = 1;
    }
    for (size_t i = lv_.size(); i-- > base;) {
      const int32_t c = colour_of_[lv_[i]];
      if (seen_[c] != stamp_) {
        seen_[c] = stamp_;
        ++distinct;
      }
      ls_[i] = distinct;
    }
    uint64_t* pn = pstack_.data() + (depth + 1) * w_;
    bool found = false;
    for (size_t i = base; i < lv_.size(); ++i) {
      if (ls_[i] < need) break;
      const int32_t v = lv_[i];
      cur_[csize] = v;
      if (need == 1) {
        found = true;
        break;
      }
      const uint64_t* rv = adj_ + static_cast<int64_t>(v) * w_;
      const int64_t vw = v >> 6;
      for (int64_t w = 0; w < w_; ++w) pn[w] = (w < vw || w > hi) ? 0 : (p[w] & rv[w]);
      pn[vw] &= ~((uint64_t{2} << (v & 63)) - 1);  // only members after v: lists are increasing
      if (expand(depth + 1, csize + 1)) {
        found = true;
        break;
      }
      if (budget_.stopped) break;
    }
    lv_.resize(base);
    ls_.resize(base);
    return found;
  }

  const uint64_t* adj_;
  int64_t n_, w_, omega_;
  Budget& budget_;
  std::vector<uint64_t> u_, q_, pstack_;
  std::vector<int32_t> colour_of_, lv_, ls_, cur_;
  std::vector<uint32_t> seen_;
  uint32_t stamp_ = 0;
};

// Greedy clique from the vertex of highest degree (lowest index on ties), adding the candidate of highest
// degree each step until `target` members or no candidate is left. O(target * n). True if it reached target.
bool degree_greedy(const uint64_t* adj, int64_t n, int64_t words, int64_t target, std::vector<int32_t>& out) {
  std::vector<int32_t> deg(n);
  int64_t start = 0;
  for (int64_t v = 0; v < n; ++v) {
    int d = 0;
    for (int64_t w = 0; w < words; ++w) d += popcount(adj[v * words + w]);
    deg[v] = d;
    if (d > deg[start]) start = v;
  }
  if (deg[start] + 1 < target) return false;
  std::vector<uint64_t> p(adj + start * words, adj + (start + 1) * words);
  out.assign(1, static_cast<int32_t>(start));
  while (static_cast<int64_t>(out.size()) < target) {
    int64_t best = -1;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t bits = p[w];
      while (bits) {
        const int64_t u = w * 64 + ctz(bits);
        bits &= bits - 1;
        if (best < 0 || deg[u] > deg[best]) best = u;
      }
    }
    if (best < 0) return false;
    out.push_back(static_cast<int32_t>(best));
    clear_bit(p.data(), best);
    const uint64_t* rb = adj + best * words;
    for (int64_t w = 0; w < words; ++w) p[w] &= rb[w];
  }
  return true;
}

// A valid graph has no self loop and no bit at a column >= n. Without validation (validate=False skips the
// O(n^2 / 64) check) either would break the search: a self loop keeps a vertex among its own candidates, so
// the greedy passes never shrink their candidate set (an endless loop outside the node budget), and a padding
// bit names a vertex >= n, which indexes past every per-vertex array. Both live in O(n) words (the word of
// the diagonal and the last word of each row), so they are checked always: the graph is returned as is when
// clean (the extraction engine's case, no copy) and otherwise copied into `scratch` with those bits cleared.
const uint64_t* without_loops_and_padding(const uint64_t* adj, int64_t n, int64_t words,
                                          std::vector<uint64_t>& scratch) {
  const int64_t tail = n & 63;
  const uint64_t pad = tail ? ~((uint64_t{1} << tail) - 1) : 0;
  bool dirty = false;
  for (int64_t i = 0; i < n && !dirty; ++i) {
    dirty = test_bit(adj + i * words, i) || (adj[i * words + words - 1] & pad) != 0;
  }
  if (!dirty) return adj;
  scratch.assign(adj, adj + n * words);
  for (int64_t i = 0; i < n; ++i) {
    clear_bit(scratch.data() + i * words, i);
    scratch[i * words + words - 1] &= ~pad;
  }
  return scratch.data();
}

// Longest wall-clock limit honoured (about 31 years): a longer one would overflow the clock's int64
// nanoseconds (undefined behaviour; in practice a deadline in the past that stopped the search at once).
constexpr double kMaxTimeLimitSeconds = 1e9;

}  // namespace

// -----------------------------------------------------------------------------------------------------------
void validate(const uint64_t* adj, int64_t n, int64_t words) {
  check(n >= 0, "clique: negative vertex count");
  check(words == (n + 63) / 64, "clique: bitset rows must have ceil(N / 64) = " +
                                    std::to_string((n + 63) / 64) + " words, got " + std::to_string(words));
  if (n == 0) return;
  const int64_t tail = n & 63;
  if (tail) {
    const uint64_t pad = ~((uint64_t{1} << tail) - 1);
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t bad = adj[i * words + words - 1] & pad;
      if (bad) {
        fail("clique: adjacency row " + std::to_string(i) + " has bit " +
             std::to_string((words - 1) * 64 + ctz(bad)) + " set, past the last vertex " +
             std::to_string(n - 1) + " (padding bits must be zero)");
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (test_bit(adj + i * words, i)) {
      fail("clique: adjacency has a self loop at vertex " + std::to_string(i) +
           " (the diagonal must be empty)");
    }
  }
  // Symmetry block by block: transpose each 64 x 64 block and compare it with its mirror (~n^2 / 64 word
  // ops).
  uint64_t a[64], b[64];
  for (int64_t rb = 0; rb < words; ++rb) {
    for (int64_t cb = rb; cb < words; ++cb) {
      load_block(adj, n, words, rb, cb, a);
      load_block(adj, n, words, cb, rb, b);
      transpose64(a);
      for (int r = 0; r < 64; ++r) {
        const uint64_t diff = a[r] ^ b[r];
        if (diff) {
          // a[r] is column (cb*64 + r) of the block rows rb*64.., b[r] is row (cb*64 + r).
          const int64_t j = cb * 64 + r, i = rb * 64 + ctz(diff);
          fail("clique: adjacency is not symmetric: edge (" + std::to_string(i) + ", " + std::to_string(j) +
               ") is " + (test_bit(adj + i * words, j) ? "set" : "unset") + " but (" + std::to_string(j) +
               ", " + std::to_string(i) + ") is " + (test_bit(adj + j * words, i) ? "set" : "unset"));
        }
      }
    }
  }
}

Result solve(const uint64_t* graph, int64_t n, int64_t words, const Options& opt) {
  check(opt.min_size >= 0, "clique: min_size must be >= 0");
  check(n >= 0 && n <= INT32_MAX, "clique: vertex count " + std::to_string(n) + " out of range");
  check(words == (n + 63) / 64, "clique: bitset rows must have ceil(N / 64) = " +
                                    std::to_string((n + 63) / 64) + " words, got " + std::to_string(words));
  Result res;
  if (n == 0) return res;
  std::vector<uint64_t> scratch;
  const uint64_t* adj = without_loops_and_padding(graph, n, words, scratch);
  Budget budget;
  budget.node_budget = opt.node_budget;
  if (opt.time_limit > 0) {  // false for NaN too: no limit
    budget.has_deadline = true;
    const std::chrono::duration<double> limit(std::min(opt.time_limit, kMaxTimeLimitSeconds));
    budget.deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(limit);
  }
  if (opt.decision && opt.min_size >= 2) {
    // Decision fast path: a memorized prompt's graph holds a big dense cluster, and a greedy clique from
    // the highest-degree vertex (taking the highest-degree candidate each step) usually reaches k at once,
    // before the O(edges) core decomposition.
    std::vector<int32_t> witness;
    if (degree_greedy(adj, n, words, opt.min_size, witness)) {
      std::sort(witness.begin(), witness.end());
      res.members = std::move(witness);
      res.exact = true;
      res.upper_bound = n;  // not bounded further: the question is answered
      return res;
    }
  }
  std::vector<int32_t> core, order;
  core_decomposition(adj, n, words, core, order);
  const int64_t core_ub = static_cast<int64_t>(core[order[n - 1]]) + 1;  // omega <= degeneracy + 1
  const int64_t thr0 = std::max<int64_t>(opt.min_size - 1, 0);
  // k-core pruning: only vertices of core >= thr0 can be in a clique of more than thr0 members. They are the
  // last ones removed; renumber them highest core first (MCS / BBMC initial order).
  int64_t m = 0;
  while (m < n && core[order[n - 1 - m]] >= thr0) ++m;
  if (m == 0 || core_ub <= thr0) {
    res.upper_bound = std::min(core_ub, thr0);
    return res;
  }
  MaxSearch search(m, budget);
  std::vector<int32_t> new_id(n, -1), old_id(m), core_of(m);
  for (int64_t k = 0; k < m; ++k) {
    const int32_t v = order[n - 1 - k];
    new_id[v] = static_cast<int32_t>(k);
    old_id[k] = v;
    core_of[k] = core[v];
  }
  for (int64_t k = 0; k < m; ++k) {
    const uint64_t* r = adj + static_cast<int64_t>(old_id[k]) * words;
    uint64_t* out = search.row(k);
    for (int64_t w = 0; w < words; ++w) {
      uint64_t bits = r[w];
      while (bits) {
        const int32_t u = new_id[w * 64 + ctz(bits)];
        bits &= bits - 1;
        if (u >= 0) set_bit(out, u);
      }
    }
  }
  search.thr_ = thr0;
  search.decision_ = opt.decision;
  search.target_ = std::max<int64_t>(opt.min_size, 1);
  search.greedy(core_of, m);
  bool complete = true;
  const bool decided = opt.decision && search.thr_ >= search.target_;
  if (!decided && search.thr_ < core_ub) {
    // Vertices whose core cannot lift the clique above the greedy bound are dropped from the root.
    int64_t root = 0;
    while (root < m && core_of[root] >= search.thr_) ++root;
    if (root > 0) complete = search.run(root);
  }
  res.nodes = budget.nodes;
  const int64_t best = static_cast<int64_t>(search.best_.size());
  if (best < std::max<int64_t>(opt.min_size, 1)) {  // nothing of interest (found)
    res.exact = complete;
    res.upper_bound = complete ? thr0 : std::max(thr0, std::min(search.root_bound_, core_ub));
    res.upper_bound = std::min(res.upper_bound, core_ub);
    return res;
  }
  std::vector<int32_t> members(best);
  for (int64_t k = 0; k < best; ++k) members[k] = old_id[search.best_[k]];
  std::sort(members.begin(), members.end());
  if (opt.decision) {
    // A witness: the question "is there a clique of >= min_size members?" is answered yes.
    res.members = std::move(members);
    res.exact = true;
    res.upper_bound = core_ub;
    return res;
  }
  if (!complete) {
    res.members = std::move(members);
    res.exact = false;
    res.upper_bound = std::min(core_ub, std::max(best, search.root_bound_));
    return res;
  }
  res.upper_bound = best;
  res.exact = true;
  if (opt.canonical && best >= 1) {
    std::vector<uint64_t> root(words, 0);
    for (int64_t v = 0; v < n; ++v) {
      if (core[v] >= best - 1) set_bit(root.data(), v);
    }
    LexSearch lex(adj, n, words, best, budget);
    std::vector<int32_t> canon;
    if (lex.run(root, canon)) {
      members = std::move(canon);
    } else if (!budget.stopped) {
      // Impossible on a valid graph. An unvalidated asymmetric one (validate=False) gets here when the two
      // passes read its edges in different directions: name the asymmetry rather than report a logic error.
      validate(adj, n, words);
      throw std::logic_error("memcore: clique: lexicographic pass found no clique of the known maximum size");
    } else {
      res.exact = false;  // maximum size proven, tie rule not applied
    }
    res.nodes = budget.nodes;
  }
  res.members = std::move(members);
  return res;
}

std::vector<Result> solve_batch(const std::vector<GraphRef>& graphs, const Options& opt, int threads,
                                bool check_graphs) {
  const int64_t count = static_cast<int64_t>(graphs.size());
  std::vector<Result> results(count);
  std::vector<std::string> errors(count);
  std::vector<char> failed(count, 0);
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(count, 1)));
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    while (true) {
      const int64_t g = next.fetch_add(1);
      if (g >= count) return;
      try {
        if (check_graphs) validate(graphs[g].adj, graphs[g].n, graphs[g].words);
        results[g] = solve(graphs[g].adj, graphs[g].n, graphs[g].words, opt);
      } catch (const std::exception& e) {
        errors[g] = e.what();
        failed[g] = 1;
      }
    }
  };
  if (threads <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
  for (int64_t g = 0; g < count; ++g) {
    if (failed[g]) throw std::invalid_argument("graph " + std::to_string(g) + ": " + errors[g]);
  }
  return results;
}

namespace {
template <typename T>
void threshold_impl(const T* dist, int64_t n, double alpha, uint64_t* out) {
  const int64_t words = (n + 63) / 64;
  // Compare in the distances' own dtype, as torch does for `dist <= alpha` with a Python float.
  const T a = static_cast<T>(alpha);
  // Row pass (contiguous reads): R[i, j] = dist[i, j] <= alpha, i != j. Then out = R & R^T, by 64 x 64
  // blocks.
  for (int64_t i = 0; i < n; ++i) {
    uint64_t* r = out + i * words;
    const T* d = dist + i * n;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t bits = 0;
      const int64_t j0 = w * 64, j1 = std::min<int64_t>(n, j0 + 64);
      for (int64_t j = j0; j < j1; ++j) {
        const T x = d[j];
        if (std::isnan(x)) {
          fail("threshold_graph: distance (" + std::to_string(i) + ", " + std::to_string(j) + ") is NaN");
        }
        bits |= static_cast<uint64_t>(x <= a) << (j - j0);
      }
      r[w] = bits;
    }
    clear_bit(r, i);
  }
  uint64_t blk[64], b[64];
  for (int64_t rb = 0; rb < words; ++rb) {
    for (int64_t cb = rb; cb < words; ++cb) {
      load_block(out, n, words, rb, cb, blk);
      load_block(out, n, words, cb, rb, b);
      uint64_t* at = blk;
      transpose64(at);  // at[r] = column cb*64 + r of rows rb*64..: compare with row cb*64 + r, word rb
      for (int r = 0; r < 64; ++r) {
        const int64_t j = cb * 64 + r;
        if (j < n) out[j * words + rb] = b[r] & at[r];
      }
      // Mirror back so both halves agree: the (rb, cb) block is the transpose of the new (cb, rb) block.
      load_block(out, n, words, cb, rb, b);
      transpose64(b);
      for (int r = 0; r < 64; ++r) {
        const int64_t i = rb * 64 + r;
        if (i < n) out[i * words + cb] = b[r];
      }
    }
  }
}
}  // namespace

void threshold_f32(const float* dist, int64_t n, double alpha, uint64_t* out) {
  threshold_impl<float>(dist, n, alpha, out);
}
void threshold_f64(const double* dist, int64_t n, double alpha, uint64_t* out) {
  threshold_impl<double>(dist, n, alpha, out);
}

void pack_dense(const uint8_t* dense, int64_t n, uint64_t* out) {
  const int64_t words = (n + 63) / 64;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* d = dense + i * n;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t bits = 0;
      const int64_t j0 = w * 64, j1 = std::min<int64_t>(n, j0 + 64);
      for (int64_t j = j0; j < j1; ++j) bits |= static_cast<uint64_t>(d[j] != 0) << (j - j0);
      out[i * words + w] = bits;
    }
  }
}

}  // namespace clique
}  // namespace memcore
