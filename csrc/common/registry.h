// Self-registering pybind11 families.
//
// Each op family (csrc/<family>/bindings.cpp) registers a function that fills its own submodule
// `memcore._C.<family>`. The module init in common/module.cpp walks this list, so a new family never edits a
// central file. Static initialisers run because every object file is linked straight into the module.
#pragma once

#include <pybind11/pybind11.h>

#include <utility>
#include <vector>

namespace memcore {

using RegisterFn = void (*)(pybind11::module_&);

std::vector<std::pair<const char*, RegisterFn>>& family_registry();

struct FamilyRegistrar {
  FamilyRegistrar(const char* name, RegisterFn fn) { family_registry().emplace_back(name, fn); }
};

}  // namespace memcore

// MEMCORE_REGISTER_FAMILY(distance, register_distance) -> memcore._C.distance filled by register_distance.
#define MEMCORE_REGISTER_FAMILY(name, fn) \
  static ::memcore::FamilyRegistrar memcore_family_registrar_##name(#name, fn)
