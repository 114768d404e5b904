"""Roofline estimates: the least time a kernel can take on a GPU, from its bytes and FLOPs.

A kernel that moves B bytes and does F FLOPs takes at least max(B / bandwidth, F / rate).
FLOPs are counted apart by the unit that does them, because the rates differ tenfold:

  lowp    tensor-core products with bf16/fp16 operands (float32 accumulation)
  split   tensor-core products with float32 operands as 3xTF32: three TF32 products each
  fma     CUDA-core arithmetic (float32 FMA loops, no tensor cores)

Peak figures, dense (the datasheets' sparsity figures halved), SXM parts:
  H100 SXM5 80 GB: HBM3 3.35 TB/s; bf16/fp16 tensor 989 TFLOP/s; TF32 tensor 495 TFLOP/s;
                   float32 on CUDA cores 67 TFLOP/s (NVIDIA H100 Tensor Core GPU datasheet).
  H200 SXM 141 GB: HBM3e 4.8 TB/s; the same compute rates as the H100 SXM (NVIDIA H200
                   Tensor Core GPU datasheet).
Real kernels reach perhaps 70-90% of bandwidth and 50-80% of tensor-core peak, so an
estimate is a floor to compare measured times against, not a prediction of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Peaks:
    name: str
    bytes_per_s: float
    lowp_flops_per_s: float  # bf16 / fp16 tensor cores, dense
    tf32_flops_per_s: float  # TF32 tensor cores, dense
    fma_flops_per_s: float  # float32 on CUDA cores

    def ridge(self) -> float:
        """FLOP per byte above which a bf16 tensor-core kernel is compute-bound."""
        return self.lowp_flops_per_s / self.bytes_per_s


H100 = Peaks("H100 SXM", 3.35e12, 989e12, 495e12, 67e12)
H200 = Peaks("H200 SXM", 4.8e12, 989e12, 495e12, 67e12)
PEAKS = {"H100": H100, "H200": H200}


@dataclass(frozen=True)
class Work:
    """What one kernel (or one library op) moves and computes."""

    name: str
    bytes: int
    lowp_flops: int = 0
    split_flops: int = 0  # counted once; the estimate charges the three TF32 products
    fma_flops: int = 0


@dataclass(frozen=True)
class Estimate:
    name: str
    memory_s: float
    compute_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def estimate(work: Work, peaks: Peaks) -> Estimate:
    compute = (work.lowp_flops / peaks.lowp_flops_per_s + 3 * work.split_flops / peaks.tf32_flops_per_s
               + work.fma_flops / peaks.fma_flops_per_s)
    return Estimate(work.name, work.bytes / peaks.bytes_per_s, compute)


def total_seconds(works: Iterable[Work], peaks: Peaks) -> float:
    """Kernels run one after another: their floors add."""
    return sum(estimate(w, peaks).seconds for w in works)


def peaks_for(device_name: str) -> Peaks:
    """The peak figures of a GPU by its name; unknown GPUs are estimated as an H100."""
    return H200 if "H200" in device_name.upper() else H100
