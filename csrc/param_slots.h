// The op's parameter slots (`Tensor?[] params`, in config.OP_PARAM_NAMES order), generated
// from their one declaration, dgsct_kernels/param_slots.def (CMakeLists.txt puts the
// package folder on the include path): the enum Param names the positions, kParamNames
// the state-dict name of each. Used by csrc/cpu and csrc/cuda/portable alike.
#pragma once

#include <array>

namespace dgsct {

enum Param : int {
#define DGSCT_SLOT(id, name) id,
#include "param_slots.def"
#undef DGSCT_SLOT
  kNumParams
};

inline constexpr std::array<const char*, kNumParams> kParamNames = {
#define DGSCT_SLOT(id, name) name,
#include "param_slots.def"
#undef DGSCT_SLOT
};

}  // namespace dgsct
