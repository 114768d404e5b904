// The precision plan (which products take bf16/fp16 operands), generated from its one
// declaration, dgsct_kernels/precision_plan.def: the enum Product names the products,
// kLowDtypes lists for each the input dtypes ("bf16", "fp16") whose type its operands take.
#pragma once

#include <array>
#include <string_view>

namespace dgsct {

enum Product : int {
#define DGSCT_PRODUCT(id, name, low) id,
#include "precision_plan.def"
#undef DGSCT_PRODUCT
  kNumProducts
};

inline constexpr std::array<const char*, kNumProducts> kProductNames = {
#define DGSCT_PRODUCT(id, name, low) name,
#include "precision_plan.def"
#undef DGSCT_PRODUCT
};

inline constexpr std::array<const char*, kNumProducts> kLowDtypes = {
#define DGSCT_PRODUCT(id, name, dtypes) dtypes,
#include "precision_plan.def"
#undef DGSCT_PRODUCT
};

// Whether `product` takes operands of the low-precision input dtype `dtype` ("bf16"/"fp16").
constexpr bool low_precision(Product product, std::string_view dtype) {
  const std::string_view listed = kLowDtypes[product];
  for (size_t start = 0; start < listed.size();) {
    size_t end = listed.find(' ', start);
    if (end == std::string_view::npos) end = listed.size();
    if (listed.substr(start, end - start) == dtype) return true;
    start = end + 1;
  }
  return false;
}

}  // namespace dgsct
