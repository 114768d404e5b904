// The cpu backend's forward and backward (fused.cpp) as op.cpp calls them, and the layout of
// the state the forward keeps for the backward.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "core/op_io.h"

namespace dgsct::cpu {

// What the forward keeps for the backward (the `saved` list of fused_forward_saving and
// fused_backward_saved, in the accumulation dtype), then guide_kept's tensors.
// backends/cpu.py (CpuBackend.saved_state_shapes) states the same shapes for the fake op.
enum Kept : int {
  kKeptR = 0, kKeptPooled, kKeptQa1Pre, kKeptQa1, kKeptQa2Pre, kKeptQa2, kKeptTg, kKeptColsum, kKeptJoint,
  kKeptHidPre, kKeptHid, kKeptCh, kKeptMean1, kKeptVar1, kKeptMean2, kKeptVar2, kKeptMask1, kNumKeptCommon
};
inline constexpr const char* kKeptNames[kNumKeptCommon] = {
    "R", "a", "qa1_pre", "qa1", "qa2_pre", "qa2", "tg", "colsum", "joint", "hid_pre", "hid", "ch",
    "bn1 mean", "bn1 var", "bn2 mean", "bn2 var", "qv1 > 0 bits"};
// Every kept tensor is in the accumulation dtype except the relu mask's bits (uint8
// [F, N, ceil(C / 8)], 1/32 of x's bytes in float32): with them the backward does not rerun
// the channel product, the largest of the call.
inline at::ScalarType kept_dtype(int index, at::ScalarType acc) { return index == kKeptMask1 ? at::kByte : acc; }

// The shapes of the kept state for these inputs (enum Kept, then the guide path's share).
std::vector<std::vector<int64_t>> kept_shapes(const core::Prepared& pr, const std::string& order);

// The op's seven forward results (core::forward_outputs); fills *kept when given. x is contiguous.
std::vector<at::Tensor> run_forward(const at::Tensor& x, const at::Tensor& g, const core::Prepared& pr,
                                const std::string& order, std::vector<at::Tensor>* kept);

// The op's backward results (core::backward_outputs), from the kept state when `kept` is
// not empty (checked against kept_shapes), else recomputing everything. x is contiguous.
std::vector<at::Tensor> run_backward(const at::Tensor& grad_residual, const at::Tensor& grad_spatial_map,
                                 const at::Tensor& grad_temporal_gate, const at::Tensor& x, const at::Tensor& g,
                                 const core::Prepared& pr, const std::string& order, at::IntArrayRef wanted,
                                 const std::vector<at::Tensor>& kept);

}  // namespace dgsct::cpu
