"""Sharded leaves: which block of each leaf a rank writes, and whole tensors rebuilt from blocks.

A rank writes its ``LocalShard`` blocks and DTensor blocks with their global offsets; plain
tensors count as replicated and only rank 0 writes them. Loading tiles the blocks of all rank
files back into full tensors, so a checkpoint loads onto any mesh (or none) and is resharded there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from parallel.layout import is_dtensor

from .encoding import CheckpointError, LocalShard


def _dtensor_block(t) -> LocalShard | None:
    """This rank's block of a DTensor, or None when another rank holds the same replica."""
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = t.device_mesh
    coords = mesh.get_coordinate() or []
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Partial):
            raise CheckpointError("cannot checkpoint a DTensor with Partial placement; reduce it first")
        if isinstance(placement, Replicate) and coords and coords[dim] != 0:
            return None  # written by the replica at coordinate 0 of this mesh dim
    _, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    return LocalShard(t.to_local(), tuple(t.shape), tuple(int(o) for o in offsets))


def _leaf_block(path: str, leaf: Any, rank: int) -> tuple[str, torch.Tensor | np.ndarray, tuple, tuple] | None:
    """(kind, local data, global_shape, offsets), or None if this rank does not write the leaf.

    Plain tensors and arrays count as replicated: only rank 0 writes them. Rank-local values
    (e.g. per-rank RNG states) must be given as ``LocalShard`` blocks of a larger tensor."""
    if is_dtensor(leaf):
        leaf = _dtensor_block(leaf)
        if leaf is None:
            return None
    if isinstance(leaf, LocalShard):
        data = leaf.data
        if len(leaf.global_shape) != data.dim() or len(leaf.offsets) != data.dim():
            raise CheckpointError(f"shard {path!r}: global_shape {leaf.global_shape} / offsets "
                                  f"{leaf.offsets} do not match the local rank {data.dim()}")
        return "torch", data, tuple(int(s) for s in leaf.global_shape), tuple(int(o) for o in leaf.offsets)
    if rank != 0:
        return None
    if isinstance(leaf, np.ndarray):
        return "numpy", leaf, tuple(leaf.shape), (0,) * leaf.ndim
    return "torch", leaf, tuple(leaf.shape), (0,) * leaf.dim()


def _assemble(path_name: str, pieces: list[tuple[dict, Any]], where: Path, hint: str = "") -> Any:
    """One full tensor from its blocks (one block with zero offsets is returned as is)."""
    meta, value = pieces[0]
    global_shape = list(meta["global_shape"])
    if len(pieces) == 1 and list(meta["shape"]) == global_shape:
        return value
    if meta["kind"] != "torch":
        raise CheckpointError(f"{where}: numpy leaf {path_name!r} is sharded; only tensors can be")
    blocks = {}
    for m, block in pieces:
        if list(m["global_shape"]) != global_shape or m["dtype"] != meta["dtype"]:
            raise CheckpointError(f"{where}: shards of {path_name!r} disagree on shape or dtype")
        blocks[(tuple(m["offsets"]), tuple(m["shape"]))] = block  # identical replicas count once
    # the blocks must tile the tensor exactly before it is allocated (at most the bytes read)
    covered, total = sum(math.prod(shape) for _, shape in blocks), math.prod(global_shape)
    if covered != total or _overlapping(list(blocks)):
        raise CheckpointError(f"{where}: shards of {path_name!r} cover {covered} of {total} elements"
                              f"{' with overlaps' if covered == total else ''}"
                              f"{hint or ' (a rank file is missing?)'}")
    full = torch.empty(global_shape, dtype=value.dtype)
    for (offsets, shape), block in blocks.items():
        full[tuple(slice(o, o + n) for o, n in zip(offsets, shape))] = block
    return full


def _overlapping(boxes: list[tuple[tuple, tuple]]) -> bool:
    """Whether two of the (offsets, shape) boxes share an element."""
    for i, (oa, sa) in enumerate(boxes):
        for ob, sb in boxes[i + 1:]:
            if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(oa, sa, ob, sb)):
                return True
    return False
