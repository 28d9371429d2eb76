"""Where a rank's shard of a layer lies: lora_ga.recorder's block arithmetic, in one process.

What: for many uneven sizes, meshes (1-D and 2-D) and placements (Shard on rows or columns,
Replicate, Partial, and the _StridedShard FSDP2 puts over tensor parallelism), the block the
recorder computes (shape, offset) equals what torch's own DTensor offset helper computes
(for FSDP2 over TP: what FSDP2 holds, TP's torch.chunk rows chunked again by FSDP2 —
torch's helper disagrees with that for some uneven sizes),
the blocks of all mesh coordinates tile the layer exactly once (counting replicas once), and
the DDP reduce-scatter split covers every row once with sizes differing by at most one.
No process group is needed: these are the pure functions the sharded recorder uses.

Usage:   PYTHONPATH=Scripts/python python -m pytest Scripts/tests/test_recorder_layout.py -q
"""

import itertools
import os
import sys

import numpy as np
import pytest

# The lora_ga package from this checkout (Scripts/test also puts it on PYTHONPATH).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

torch = pytest.importorskip("torch")
from torch.distributed.tensor import Partial, Replicate, Shard  # noqa: E402

from lora_ga.recorder import _even_bounds, placement_block  # noqa: E402

try:
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
except ImportError:  # torch moved its helper: the tiling check below still runs
    _compute_local_shape_and_global_offset = None
try:
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:
    _StridedShard = None

SIZES = [1, 2, 3, 5, 7, 8, 13, 16]


def layouts():
    yield (2,), (Shard(0),)
    yield (3,), (Shard(1),)
    yield (4,), (Shard(0),)
    yield (3,), (Replicate(),)
    yield (2,), (Partial(),)
    yield (2, 2), (Shard(0), Shard(1))
    yield (2, 3), (Shard(1), Shard(0))
    yield (2, 2), (Shard(0), Shard(0))
    yield (3, 2), (Replicate(), Shard(0))
    yield (2, 2), (Shard(0), Partial())
    if _StridedShard is not None:
        yield (2, 2), (_StridedShard(0, split_factor=2), Shard(0))  # FSDP2 over ColwiseParallel
        yield (3, 2), (_StridedShard(0, split_factor=2), Shard(0))


def fsdp2_over_tp_block(shape, mesh_shape, coordinate):
    """What FSDP2 holds on top of ColwiseParallel, done with real tensors: tensor parallelism
    cuts rows across mesh dimension 1 (torch.chunk), then FSDP2 chunks that TP shard's rows
    across mesh dimension 0.  (shape, offset) of the result."""
    rows = torch.arange(shape[0])
    tp_rows = list(torch.chunk(rows, mesh_shape[1]))
    tp_rows += [rows[:0]] * (mesh_shape[1] - len(tp_rows))
    mine = tp_rows[coordinate[1]]
    fsdp_rows = list(torch.chunk(mine, mesh_shape[0])) if len(mine) else []
    fsdp_rows += [rows[:0]] * (mesh_shape[0] - len(fsdp_rows))
    held = fsdp_rows[coordinate[0]]
    assert torch.equal(held, torch.arange(int(held[0]), int(held[0]) + len(held))) if len(held) else True
    return (len(held), shape[1]), ((int(held[0]) if len(held) else 0), 0)


def coordinates(mesh_shape):
    return itertools.product(*[range(n) for n in mesh_shape])


@pytest.mark.parametrize("mesh_shape,placements", list(layouts()), ids=lambda v: str(v))
def test_blocks_match_torch_and_tile_the_layer(mesh_shape, placements):
    partial = any(p.is_partial() for p in placements)
    strided = any(getattr(p, "split_factor", None) is not None for p in placements)
    for rows, cols in itertools.product(SIZES, [3, 8]):
        cover = np.zeros((rows, cols), dtype=int)
        for coordinate in coordinates(mesh_shape):
            block = placement_block((rows, cols), mesh_shape, coordinate, placements)
            if strided:
                expected_shape, expected_offset = fsdp2_over_tp_block((rows, cols), mesh_shape, coordinate)
                assert (block.shape, block.offset if all(block.shape) else expected_offset) == (
                    expected_shape, expected_offset), (rows, cols, coordinate)
            elif _compute_local_shape_and_global_offset is not None:
                shape, offset = _compute_local_shape_and_global_offset((rows, cols), mesh_shape, list(coordinate),
                                                                       placements)
                assert block.shape == tuple(shape), (rows, cols, coordinate)
                if all(shape):
                    assert block.offset == tuple(offset), (rows, cols, coordinate)
            if block.write:
                (r0, c0), (r, c) = block.offset, block.shape
                cover[r0:r0 + r, c0:c0 + c] += 1
        # Every entry written once; Partial: once per partial sum (they add up to the layer).
        copies = int(np.prod([n for n, p in zip(mesh_shape, placements) if p.is_partial()])) if partial else 1
        assert (cover == copies).all(), (rows, cols, cover)


def test_ddp_reduce_scatter_rows_cover_each_row_once():
    for rows, world in itertools.product(range(1, 20), range(1, 6)):
        bounds = [_even_bounds(rows, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [end - start for start, end in bounds]
        assert max(sizes) - min(sizes) <= 1
