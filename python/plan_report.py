"""Print the Triton backend's plan (kernels, DRAM bytes, FLOPs) for the AVE shapes.

Usage: python python/plan_report.py [--frames 80] [--dtype bfloat16] [--training] [--shapes s1-visual,...]
Nothing runs on a device: the plan comes from the launchers' own parameters.
"""
import argparse
import sys
from pathlib import Path

import torch

from dgsct_kernels import get_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import AVE_SHAPES, cost  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--training", action="store_true", help="train-mode BatchNorm (adds pass 3)")
    parser.add_argument("--shapes", default=",".join(s.label for s in AVE_SHAPES))
    args = parser.parse_args()
    by_label = {s.label: s for s in AVE_SHAPES}
    unknown = [label for label in args.shapes.split(",") if label not in by_label]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected labels from {list(by_label)}")
    dtype = DTYPES[args.dtype]
    for label in args.shapes.split(","):
        shape = by_label[label]
        plan = get_backend("triton").plan(args.frames, shape.dims(), dtype, args.training, True, True, True)
        floor = cost(shape, args.frames, torch.empty(0, dtype=dtype).element_size()).floor_bytes
        print(f"\n{label}: F={args.frames} {args.dtype} {'train' if args.training else 'eval'}; "
              f"{plan.bytes_moved / floor:.2f}x the floor of {floor / 1e6:.1f} MB")
        print(plan.report())


if __name__ == "__main__":
    main()
