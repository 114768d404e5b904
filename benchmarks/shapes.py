"""What the benchmarks run: the paper's AVE shapes (SPEC.md) as data, and SPEC.md's cost model.

`python benchmarks/shapes.py [--frames 80] [--bytes-per-element 2]` prints the cost table
that benchmarks/NOTES.md quotes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from dgsct_kernels.config import OP_PARAM_NAMES, Dims, expected_shapes
from dgsct_kernels.guide_path import ORDERS

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
class Product:
    """One matrix product [batch, m, k] x [batch, k, n]. batch 1 is a plain [m, k] x [k, n];
    `shared_left`: the left operand is one [m, k] matrix for every frame (a weight)."""

    batch: int
    m: int
    k: int
    n: int
    shared_left: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def guide_products(shape: Shape, frames: int, order: str) -> list[Product]:
    """The matrix products over tokens of SPEC.md steps 1, 2 and 4 in `order`
    (dgsct_kernels.guide_path.ORDERS), as guide_path.py and reference.py run them. Products of
    per-frame vectors ([K, D] or [D] with a weight) are O(F*D*C) and left out, like
    `plan_guide_path`, whose FLOP counts these sum to."""
    F, N, C, M, D, K = frames, shape.tokens, shape.dim, shape.guide_tokens, shape.guide_dim, NUM_LATENTS
    prompt_reads_p = [Product(F, K, C, N, shared_left=True),  # S = T P^T
                      Product(F, K, N, C)]  # A P
    products = {
        "as-written": [Product(F, N, M, D, shared_left=True),  # U = Wtok g
                       Product(1, F * N, D, C)] + prompt_reads_p,  # P = U Wfc^T
        "channels-first": [Product(1, F * M, D, C),  # g Wfc^T
                           Product(F, N, M, C, shared_left=True)] + prompt_reads_p,  # P = Wtok (g Wfc^T)
        "tokens-first": [Product(F, N, M, D, shared_left=True),  # U = Wtok g
                         Product(F, K, D, N, shared_left=True),  # S = Q U^T
                         Product(F, K, N, D),  # A U
                         Product(1, F * K, D, C)],  # (A U) Wfc^T
        "rewritten": [Product(F, K, D, M, shared_left=True),  # Q g^T
                      Product(1, F * K, M, N),  # S = (Q g^T) Wtok^T
                      Product(1, F * K, N, M),  # A Wtok
                      Product(F, K, M, D),  # (A Wtok) g
                      Product(1, F * K, D, C)],  # ((A Wtok) g) Wfc^T
    }
    if order not in products:
        raise ValueError(f"order={order!r}: expected one of {list(products)}")
    return products[order]


def guide_flops(shape: Shape, frames: int, order: str) -> int:
    """Forward FLOPs of the guide path in `order`: its products' 2 per multiply-add."""
    return sum(p.flops for p in guide_products(shape, frames, order))


# A training step's products: the forward's, and in the backward two of the same size per
# forward product (the gradients w.r.t. both operands). Recomputation is not counted.
TRAIN_FLOPS_OVER_FORWARD = 3


def call_flops(shape: Shape, frames: int, order: str, training: bool) -> int:
    """Matrix-product FLOPs of one call (cost's steps 1-9 with the guide path in `order`);
    fwd+bwd counts TRAIN_FLOPS_OVER_FORWARD times the forward's."""
    forward = guide_flops(shape, frames, order) + cost(shape, frames).target_flops
    return forward * (TRAIN_FLOPS_OVER_FORWARD if training else 1)


@dataclass(frozen=True)
class Cost:
    """SPEC.md's cost model for one module call over F frames (forward only)."""

    floor_bytes: int  # read x, g and every weight once, write o once
    guide_flops: dict[str, int]  # steps 1-2 (and 4) by evaluation order, guide_flops()
    target_flops: int  # steps 3-9

    @property
    def min_flops(self) -> int:
        return min(self.guide_flops.values()) + self.target_flops


def cost(shape: Shape, frames: int, bytes_per_element: int = 2) -> Cost:
    """Matrix-product FLOPs over tokens only (2 per multiply-add); per-frame vectors, softmaxes
    and elementwise work are O(F*N*C) and left out."""
    F, N, C = frames, shape.tokens, shape.dim
    K, H, G = NUM_LATENTS, shape.dim // REDUCTION, GROUPS
    weights = sum(_numel(s) for n, s in expected_shapes(shape.dims()).items() if n in OP_PARAM_NAMES)
    activations = 2 * F * N * C + F * shape.guide_tokens * shape.guide_dim  # x in, o out, g in
    guide = {order: guide_flops(shape, frames, order) for order in ORDERS}
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


TABLE_ORDERS = ("as-written", "channels-first", "rewritten")


def cost_table(frames: int, bytes_per_element: int) -> str:
    """Markdown table of the bytes floor and FLOPs of every AVE shape."""
    lines = ["| shape | N, C, M, D | floor MB | guide GFLOP as written / channels first / "
             "rewritten | steps 3-9 GFLOP | cheapest total GFLOP | FLOP per floor byte |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in AVE_SHAPES:
        c = cost(s, frames, bytes_per_element)
        guide = " / ".join(f"{c.guide_flops[o] / 1e9:.1f}" for o in TABLE_ORDERS)
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
