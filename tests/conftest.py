"""Test-session setup."""
import os

# Triton kernels run on the CPU through its interpreter, which must be chosen before any
# kernel is defined. A GPU run (benchmarks/gpu_suite.sh) sets DGSCT_GPU_TESTS=1 instead.
if os.environ.get("DGSCT_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
