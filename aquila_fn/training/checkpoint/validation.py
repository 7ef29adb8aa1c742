"""Hostile-input checks: what a checkpoint file declares is checked before it is believed.

A damaged or hostile file must not make the reader allocate the sizes it claims, recurse
without bound, or name leaves like filesystem paths; each check raises CheckpointError naming
the file and the field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoding import CheckpointError

_MAX_DEPTH = 64
_RECORD_KEYS = ("path", "kind", "dtype", "shape", "global_shape", "offsets", "nbytes", "crc32", "chunks")


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_leaf_path(name: Any, path: Path) -> None:
    if not isinstance(name, str) or not all(part and not any(c in part for c in "/\\\0")
                                            for part in name.split(".")):
        raise CheckpointError(f"{path}: corrupt (leaf path {name!r} is not a dotted name; its parts "
                              f"may not be empty or hold '/', '\\' or NUL)")


def _check_header(header: Any, path: Path) -> None:
    ok = (isinstance(header, dict) and all(_is_int(header.get(k)) for k in ("step", "rank", "records"))
          and _is_int(header.get("world_size"), 1) and isinstance(header.get("metadata"), dict)
          and isinstance(header.get("structure"), dict))
    if not ok or header["rank"] >= header["world_size"]:
        raise CheckpointError(f"{path}: corrupt header (fields missing or of the wrong type)")
    stack = [(header["structure"], 0)]
    while stack:  # iterative: a hostile depth cannot exhaust the interpreter's stack
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{path}: corrupt header (the state is nested deeper than {_MAX_DEPTH} levels)")
        kind = node.get("t") if isinstance(node, dict) else None
        items = node.get("items") if isinstance(node, dict) else None
        if kind == "leaf":
            _check_leaf_path(node.get("path"), path)
        elif kind == "dict" and isinstance(items, dict) or kind in ("list", "tuple") and isinstance(items, list):
            stack.extend((child, depth + 1) for child in (items.values() if kind == "dict" else items))
        elif kind != "value" or "v" not in node:
            raise CheckpointError(f"{path}: corrupt header (malformed structure node at depth {depth})")


def _itemsize(kind: Any, dtype: Any) -> int | None:
    if not isinstance(dtype, str):
        return None
    if kind == "numpy":
        try:
            return np.dtype(dtype).itemsize
        except TypeError:
            return None
    tdtype = getattr(torch, dtype, None) if kind == "torch" else None
    return tdtype.itemsize if isinstance(tdtype, torch.dtype) else None


def _check_record(meta: Any, path: Path, what: str, file_size: int) -> None:
    """A leaf's description must be self-consistent, and its bytes must fit in the file."""
    if not isinstance(meta, dict) or any(k not in meta for k in _RECORD_KEYS):
        raise CheckpointError(f"{path}: corrupt (the description of {what} lacks fields)")
    _check_leaf_path(meta["path"], path)
    what = f"leaf {meta['path']!r}"
    itemsize = _itemsize(meta["kind"], meta["dtype"])
    if itemsize is None:
        raise CheckpointError(f"{path}: {what} has an unknown dtype {meta['kind']}:{meta['dtype']!r}")
    shape, full, offsets = meta["shape"], meta["global_shape"], meta["offsets"]
    if not all(isinstance(x, list) and all(_is_int(n) for n in x) for x in (shape, full, offsets)) \
            or not len(shape) == len(full) == len(offsets):
        raise CheckpointError(f"{path}: {what} has a malformed shape {shape}, global shape {full} or "
                              f"offsets {offsets}")
    if any(o + n > g for o, n, g in zip(offsets, shape, full)):
        raise CheckpointError(f"{path}: {what}: a block of shape {shape} at {offsets} lies outside {full}")
    need = math.prod(shape) * itemsize
    if meta["nbytes"] != need:
        raise CheckpointError(f"{path}: {what} declares {meta['nbytes']} bytes, its shape {shape} of "
                              f"{meta['dtype']} holds {need}")
    if need > file_size:
        raise CheckpointError(f"{path}: {what} declares {need} bytes, more than the whole file "
                              f"({file_size} bytes): truncated or corrupt")
    if not _is_int(meta["chunks"]) or meta["chunks"] > need or (need and not meta["chunks"]):
        raise CheckpointError(f"{path}: {what} declares {meta['chunks']!r} chunks for {need} bytes")
