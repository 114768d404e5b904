"""Print the Triton backend's plan (kernels, DRAM bytes, FLOPs) and its roofline estimate.

Usage: python python/plan_report.py [--frames 80] [--dtype bfloat16] [--training] [--shapes s1-visual,...]
         [--arch 90]
Nothing runs on a device: the plan comes from the launchers' own parameters. For each
kernel and each call it prints the roofline floor on an H100 and an H200 (peak figures and
their sources in dgsct_kernels/roofline.py): tensor-core FLOPs (bf16/fp16, and float32
operands as 3xTF32) and CUDA-core FLOPs apart, against HBM bandwidth.
"""
import argparse
import sys
from pathlib import Path

import torch

from dgsct_kernels import get_backend
from dgsct_kernels.roofline import PEAKS, estimate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import AVE_SHAPES, cost  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--training", action="store_true", help="train-mode BatchNorm (adds pass 3)")
    parser.add_argument("--shapes", default=",".join(s.label for s in AVE_SHAPES))
    parser.add_argument("--arch", type=int, default=90, help="the GPU architecture the tiles are chosen for")
    args = parser.parse_args()
    by_label = {s.label: s for s in AVE_SHAPES}
    unknown = [label for label in args.shapes.split(",") if label not in by_label]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; expected labels from {list(by_label)}")
    dtype = DTYPES[args.dtype]
    for label in args.shapes.split(","):
        shape = by_label[label]
        plan = get_backend("triton").plan(args.frames, shape.dims(), dtype, args.training, True, True, True,
                                          arch=args.arch)
        floor = cost(shape, args.frames, torch.empty(0, dtype=dtype).element_size()).floor_bytes
        print(f"\n{label}: F={args.frames} {args.dtype} {'train' if args.training else 'eval'}; "
              f"{plan.bytes_moved / floor:.2f}x the floor of {floor / 1e6:.1f} MB")
        print(plan.report())
        print(roofline_table(plan, dtype))


def roofline_table(plan, dtype) -> str:
    """Per kernel: tensor-core and CUDA-core GFLOP, and the floor in microseconds per GPU."""
    names = list(PEAKS)
    rows = [f"{'roofline':<19} {'TC lowp':>8} {'TC 3xTF32':>9} {'FMA':>7} GFLOP  "
            + "  ".join(f"{name + ' us':>10} {'bound':>7}" for name in names)]
    totals = dict.fromkeys(names, 0.0)
    for launch in plan.launches:
        work = launch.work(dtype)
        cells = []
        for name in names:
            est = estimate(work, PEAKS[name])
            totals[name] += est.seconds
            cells.append(f"{est.seconds * 1e6:>10.1f} {est.bound:>7}")
        rows.append(f"{launch.name:<19} {work.lowp_flops / 1e9:>8.2f} {work.split_flops / 1e9:>9.2f} "
                    f"{work.fma_flops / 1e9:>7.2f}        " + "  ".join(cells))
    rows.append(f"{'call floor':<19} {'':>8} {'':>9} {'':>7}        "
                + "  ".join(f"{totals[name] * 1e6:>10.1f} {'':>7}" for name in names))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
