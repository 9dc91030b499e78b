"""Small launch helpers shared by the Triton launchers: tile shapes, warps, program counts, rows.

Kept deliberately tiny and stable (the RMSNorm, RoPE and cross-entropy launchers import it).
Heuristics follow the usual Triton practice (Liger-Kernel, the Triton tutorials): one power-of-
two block per row, several short rows per program so small hidden sizes still move enough bytes
per program, warps scaled with the tile so each thread holds a handful of elements.
"""

from __future__ import annotations

import functools

import torch
import triton

# Elements one program keeps in flight per tile (RMSNorm rows, RoPE q + k lanes): enough bytes
# per program at small hidden sizes (512 -> 8 rows, 768 -> 4 rows of 1024 lanes), one row from
# 4096 upwards.
TILE_ELEMENTS = 4096


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def row_tile(hidden: int, tile_elements: int = TILE_ELEMENTS) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_H) for row-wise kernels over a (rows, hidden) matrix.

    BLOCK_H is the power of two covering `hidden` (masked); BLOCK_ROWS packs several short rows
    into one program so that a tile holds about `tile_elements` lanes.
    """
    block_h = next_power_of_2(hidden)
    return max(1, tile_elements // block_h), block_h


def num_warps_for(elements: int, elements_per_thread: int = 16, lo: int = 2, hi: int = 32) -> int:
    """Warps for a tile of `elements` lanes: about `elements_per_thread` per thread, in [lo, hi]."""
    warps = next_power_of_2(max(elements // (32 * elements_per_thread), 1))
    return int(min(max(warps, lo), hi))


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs serially)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 1


def persistent_programs(device: torch.device, work_items: int, programs_per_sm: int = 4) -> int:
    """Programs for a persistent (grid-stride) kernel: a few per SM, never more than the work."""
    return max(1, min(work_items, sm_count(device) * programs_per_sm))


def as_rows(x: torch.Tensor, hidden: int) -> torch.Tensor:
    """View x (..., hidden) as (rows, hidden), unit stride along hidden, copying only if needed.

    Row-sliced views keep their row stride (pass `x2d.stride(0)` to the kernel); transposed or
    stride-0 (expanded) tensors are made contiguous.
    """
    x2d = x.reshape(-1, hidden)
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) < hidden):
        x2d = x2d.contiguous()
    return x2d
