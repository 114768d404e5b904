"""What one call launches, read and written, and computes: the plan report.

Every launcher derives its grid and tile sizes from a `Launch` made by its pass's
`*_launch` function, and the same record carries the traffic and FLOPs, so the report
cannot drift from the code. Bytes are DRAM bytes under the usual kernel model: each
distinct byte a kernel touches is read once (a program re-reads its own token tile from
cache, `reread_factor` times; weights are shared through L2), and every intermediate one
kernel writes and another reads counts twice. The PyTorch guide path is counted op by op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...roofline import Work


@dataclass(frozen=True)
class Launch:
    name: str
    grid: tuple[int, ...]
    tiles: dict[str, int]
    bytes_read: int
    writes: dict[str, tuple[tuple[int, ...], int]]  # tensor name -> (shape, bytes per element)
    flops: int
    reread_factor: int = 1  # how often a program re-reads its own tile (cache traffic)
    host_read: int = 0  # bytes of its outputs that PyTorch reads back (partials, s)
    # of `flops`: the part whose operands are float32 (3xTF32 on tensor cores) when the
    # input is bf16/fp16 (for float32 inputs every product is); and FLOPs with no tensor core
    split_flops: int = 0
    fma_flops: int = 0

    def work(self, dtype) -> Work:
        """This launch as roofline work (dgsct_kernels/roofline.py) for inputs of `dtype`."""
        tensor = self.flops - self.fma_flops
        split = tensor if dtype == torch.float32 else self.split_flops
        return Work(self.name, self.bytes_moved, tensor - split, split, self.fma_flops)

    @property
    def bytes_written(self) -> int:
        return sum(math.prod(shape) * size for shape, size in self.writes.values())

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written + self.host_read


@dataclass
class Plan:
    launches: list[Launch] = field(default_factory=list)
    guide_order: str = ""
    guide_flops: dict[str, int] = field(default_factory=dict)

    def add(self, launch: Launch) -> Launch:
        self.launches.append(launch)
        return launch

    @property
    def bytes_moved(self) -> int:
        return sum(launch.bytes_moved for launch in self.launches)

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)

    def report(self) -> str:
        rows = [f"{'kernel':<19} {'grid':>14} {'read MB':>9} {'written MB':>11} {'host MB':>8} "
                f"{'GFLOP':>8}"]
        for k in self.launches:
            rows.append(f"{k.name:<19} {str(k.grid):>14} {k.bytes_read / 1e6:>9.2f} "
                        f"{k.bytes_written / 1e6:>11.2f} {k.host_read / 1e6:>8.2f} {k.flops / 1e9:>8.3f}")
        rows.append(f"{'total':<19} {len(self.launches):>14} {self.bytes_moved / 1e6:>29.2f} MB "
                    f"{self.flops / 1e9:>8.3f}   guide path: {self.guide_order}")
        return "\n".join(rows)


def guide_path_launch(order: str, frames: int, tokens: int, guide_tokens: int, guide_dim: int,
                      dim: int, latents: int, itemsize: int, flops: int) -> Launch:
    """The guide path's PyTorch products in float32, as one record (several kernels)."""
    from ...guide_path import guide_path_bytes
    moved = guide_path_bytes(order, frames, tokens, guide_tokens, guide_dim, dim, latents, itemsize)
    # PyTorch float32 matmuls: CUDA-core FMA unless the user allows TF32
    return Launch(name="guide_path (torch)", grid=(), tiles={}, bytes_read=moved, writes={},
                  flops=flops, fma_flops=flops)
