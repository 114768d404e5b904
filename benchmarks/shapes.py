"""What the benchmarks run: the paper's AVE shapes (SPEC.md) as data, and SPEC.md's cost model.

`python benchmarks/shapes.py [--frames 80] [--bytes-per-element 2]` prints the cost table
that benchmarks/NOTES.md quotes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from dgsct_kernels.config import OP_PARAM_NAMES, Dims, expected_shapes

# The AVE configuration's module hyper-parameters (SPEC.md) that fix the weights' sizes.
NUM_LATENTS = 32
REDUCTION = 8
GROUPS = 2
SEGMENTS = 10  # F must be a multiple of this


@dataclass(frozen=True)
class Shape:
    """One module's sizes: x is [F, tokens, dim], g is [F, guide_tokens, guide_dim]."""

    label: str
    tokens: int  # N
    dim: int  # C
    guide_tokens: int  # M
    guide_dim: int  # D

    def dims(self) -> Dims:
        return Dims(tokens=self.tokens, dim=self.dim, guide_tokens=self.guide_tokens,
                    guide_dim=self.guide_dim, num_latents=NUM_LATENTS,
                    hidden=self.dim // REDUCTION, groups=GROUPS)


def _stage_pair(prefix: str, visual: tuple[int, int], audio: tuple[int, int]) -> list[Shape]:
    """A stage's visual module (guided by audio) and audio module (guided by vision)."""
    return [Shape(f"{prefix}-visual", *visual, *audio), Shape(f"{prefix}-audio", *audio, *visual)]


# SPEC.md, "Shapes of the paper's AVE configuration": stage -> ((visual N, C), (audio N, C))
AVE_STAGES = {
    1: ((2304, 192), (4096, 96)),
    2: ((576, 384), (1024, 192)),
    3: ((144, 768), (256, 384)),
    4: ((36, 1536), (64, 768)),
}
AVE_SHAPES = [s for stage, (v, a) in AVE_STAGES.items() for s in _stage_pair(f"s{stage}", v, a)]
# Small enough for a smoke test in a second; C=16 still gives hidden=2 divisible by GROUPS.
TINY_SHAPES = _stage_pair("tiny", (36, 32), (64, 16))

SHAPES = {s.label: s for s in AVE_SHAPES + TINY_SHAPES}
SHAPE_SETS = {
    "all": AVE_SHAPES,
    "tiny": TINY_SHAPES,
    **{f"s{stage}": [s for s in AVE_SHAPES if s.label.startswith(f"s{stage}-")] for stage in AVE_STAGES},
}


def select_shapes(names: str, argument: str = "--shapes") -> list[Shape]:
    """Comma-separated labels or set names (all, tiny, s1..s4), in order, without repeats."""
    chosen: list[Shape] = []
    for name in (n.strip() for n in names.split(",")):
        if name in SHAPE_SETS:
            found = SHAPE_SETS[name]
        elif name in SHAPES:
            found = [SHAPES[name]]
        else:
            raise ValueError(f"{argument}={names!r}: unknown shape {name!r}; expected labels "
                             f"{sorted(SHAPES)} or sets {sorted(SHAPE_SETS)}")
        chosen += [s for s in found if s not in chosen]
    return chosen


@dataclass(frozen=True)
class Cost:
    """SPEC.md's cost model for one module call over F frames (forward only)."""

    floor_bytes: int  # read x, g and every weight once, write o once
    guide_flops: dict[str, int]  # steps 1-2 by evaluation order
    target_flops: int  # steps 3-9

    @property
    def min_flops(self) -> int:
        return min(self.guide_flops.values()) + self.target_flops


def cost(shape: Shape, frames: int, bytes_per_element: int = 2) -> Cost:
    """Matrix-product FLOPs over tokens only (2 per multiply-add); per-frame vectors, softmaxes
    and elementwise work are O(F*N*C) and left out."""
    F, N, C, M, D = frames, shape.tokens, shape.dim, shape.guide_tokens, shape.guide_dim
    K, H, G = NUM_LATENTS, shape.dim // REDUCTION, GROUPS
    weights = sum(_numel(s) for n, s in expected_shapes(shape.dims()).items() if n in OP_PARAM_NAMES)
    activations = 2 * F * N * C + F * M * D  # x in, o out, g in
    prompt_reads_guide = 4 * F * K * N * C  # step 2 on a materialised P: scores and A @ P
    guide = {
        "as written": 2 * F * N * M * D + 2 * F * N * D * C + prompt_reads_guide,
        "channels first": 2 * F * M * D * C + 2 * F * N * M * C + prompt_reads_guide,
        "rewritten": 2 * F * K * (2 * M * N + 2 * M * D + D * C),
    }
    target = (4 * F * N * K * C  # step 3: scores and attn @ R
              + 2 * F * N * C * C  # step 5: fc_affine_video_1
              + 2 * F * N * C * (C // 2) + 2 * F * N * (C // 2)  # step 6: video_2, v_s_att
              + 2 * 2 * F * N * H * (C // G))  # step 9: grouped down and up projections
    return Cost((activations + weights) * bytes_per_element, guide, target)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cost_table(frames: int, bytes_per_element: int) -> str:
    """Markdown table of the bytes floor and FLOPs of every AVE shape."""
    lines = ["| shape | N, C, M, D | floor MB | guide GFLOP as written / channels first / "
             "rewritten | steps 3-9 GFLOP | cheapest total GFLOP | FLOP per floor byte |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in AVE_SHAPES:
        c = cost(s, frames, bytes_per_element)
        guide = " / ".join(f"{v / 1e9:.1f}" for v in c.guide_flops.values())
        lines.append(f"| {s.label} | {s.tokens}, {s.dim}, {s.guide_tokens}, {s.guide_dim} | "
                     f"{c.floor_bytes / 1e6:.1f} | {guide} | {c.target_flops / 1e9:.1f} | "
                     f"{c.min_flops / 1e9:.1f} | {c.min_flops / c.floor_bytes:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print SPEC.md's cost model for the AVE shapes.")
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 for bf16")
    args = parser.parse_args()
    print(cost_table(args.frames, args.bytes_per_element))
