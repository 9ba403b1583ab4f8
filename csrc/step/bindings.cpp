// memcore._C.step: the fused sampler step (called only from memcore/ops/step.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common/registry.h"
#include "step/step.h"

namespace py = pybind11;

namespace memcore {
namespace step {
namespace {

StepArgs make_args(int64_t batch, int64_t chw, std::uintptr_t sample, std::uintptr_t model,
                   std::uintptr_t grad, std::uintptr_t noise, std::uintptr_t ratio, std::uintptr_t out,
                   std::uintptr_t table, int64_t num_steps, int64_t flags, float g, float gr,
                   float one_minus_gr, float clip) {
  check(sample && model && out && table, "fused step: null tensor pointer");
  check(!(flags & kRescale) || ratio, "fused step: guidance rescale needs the ratio tensor");
  check(!(flags & kCls) || grad, "fused step: classifier guidance needs the gradient tensor");
  StepArgs a;
  a.batch = batch;
  a.chw = chw;
  a.sample = as_ptr<const void>(sample);
  a.model = as_ptr<const void>(model);
  a.grad = as_ptr<const void>(grad);
  a.noise = as_ptr<const void>(noise);
  a.ratio = as_ptr<const float>(ratio);
  a.out = as_ptr<void>(out);
  a.table = as_ptr<const float>(table);
  a.num_steps = num_steps;
  a.flags = flags;
  a.g = g;
  a.gr = gr;
  a.one_minus_gr = one_minus_gr;
  a.clip = clip;
  return a;
}

void check_noise(const StepArgs& a, int64_t step) {
  const float nmode = a.table[step * kNumCols + kColNMode];
  check(nmode != 1.0f || a.noise != nullptr, "fused step: this step needs noise");
}

void register_step(py::module_& m) {
  m.doc() = "Fused sampler step (CFG, classifier guidance, DDIM/DDPM update, noise) in one pass.";
  m.def(
      "step_cpu",
      [](int dtype, int64_t batch, int64_t chw, std::uintptr_t sample, std::uintptr_t model,
         std::uintptr_t grad, std::uintptr_t noise, std::uintptr_t ratio, std::uintptr_t out,
         std::uintptr_t table, int64_t num_steps, int64_t step, int64_t flags, float g, float gr,
         float one_minus_gr, float clip) {
        StepArgs a = make_args(batch, chw, sample, model, grad, noise, ratio, out, table, num_steps, flags, g,
                               gr, one_minus_gr, clip);
        check(step >= 0 && step < num_steps, "fused step: step index out of range");
        check_noise(a, step);
        py::gil_scoped_release release;
        step_cpu(static_cast<DType>(dtype), a, step);
      },
      "CPU fused step; tensors as raw pointers (memcore/ops/step.py).");
  m.def("_set_cpu_baseline", &set_cpu_baseline, "Tests: force the baseline (non-AVX2) CPU path.");
  m.def("cpu_uses_avx2", &cpu_uses_avx2, "Whether the CPU step runs its AVX2 + F16C code path.");
#ifdef MEMCORE_WITH_CUDA
  m.def(
      "step_cuda",
      [](int dtype, int64_t batch, int64_t chw, std::uintptr_t sample, std::uintptr_t model,
         std::uintptr_t grad, std::uintptr_t noise, std::uintptr_t ratio, std::uintptr_t out,
         std::uintptr_t table, int64_t num_steps, std::uintptr_t step_ptr, int64_t flags, float g, float gr,
         float one_minus_gr, float clip, std::uintptr_t stream) {
        StepArgs a = make_args(batch, chw, sample, model, grad, noise, ratio, out, table, num_steps, flags, g,
                               gr, one_minus_gr, clip);
        check(step_ptr != 0, "fused step: null step pointer");
        step_cuda(static_cast<DType>(dtype), a, as_ptr<const int64_t>(step_ptr), stream);
      },
      "CUDA fused step; the step index is read on the device (CUDA-graph friendly).");
#endif
}

}  // namespace
}  // namespace step
}  // namespace memcore

MEMCORE_REGISTER_FAMILY(step, memcore::step::register_step);
