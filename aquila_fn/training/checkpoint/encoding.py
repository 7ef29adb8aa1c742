"""The checkpoint format's vocabulary and encodings: what a state tree becomes on disk.

A state tree is stored as a msgpack-able skeleton in the header (so lists stay lists and
None/scalars survive) plus one record per tensor leaf holding its raw little-endian bytes;
metadata must be JSON-able (plus bytes). See the package docstring for the file layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from parallel.cli import UserError

FORMAT = "aquila-fn-checkpoint"
VERSION = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


@dataclass
class LocalShard:
    """One rank's block of a larger tensor: ``data`` sits at ``offsets`` inside ``global_shape``."""

    data: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


# ----------------------------------------------------------------------------------------------
# The tree's structure, stored in the header so lists stay lists and None/scalars survive.


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray, LocalShard))


def _encode_structure(tree: Any, path: str, leaves: list) -> Any:
    """A msgpack-able skeleton of ``tree``; tensors are replaced by their path and appended to leaves."""
    if _is_leaf(tree):
        leaves.append((path, tree))
        return {"t": "leaf", "path": path}
    if isinstance(tree, dict):
        items = {}
        for k, v in tree.items():
            if not isinstance(k, str) or not k or any(c in k for c in "./\\\0"):
                raise CheckpointError(f"state key {k!r} under {path or '<root>'!r} must be a "
                                      f"non-empty string without dots, slashes or NUL")
            items[k] = _encode_structure(v, f"{path}.{k}" if path else k, leaves)
        return {"t": "dict", "items": items}
    if isinstance(tree, (list, tuple)):
        items = [_encode_structure(v, f"{path}.{i}" if path else str(i), leaves)
                 for i, v in enumerate(tree)]
        return {"t": "tuple" if isinstance(tree, tuple) else "list", "items": items}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"t": "value", "v": tree}
    raise CheckpointError(f"state leaf {path!r} has type {type(tree).__name__}; checkpoints hold "
                          f"tensors, numpy arrays, dicts, lists, tuples and plain scalars")


def _decode_structure(node: dict, leaves: dict[str, Any]) -> Any:
    t = node["t"]
    if t == "leaf":
        return leaves[node["path"]]
    if t == "dict":
        return {k: _decode_structure(v, leaves) for k, v in node["items"].items()}
    if t in ("list", "tuple"):
        items = [_decode_structure(v, leaves) for v in node["items"]]
        return tuple(items) if t == "tuple" else items
    return node["v"]


def _structure_paths(node: dict) -> Iterator[str]:
    if node["t"] == "leaf":
        yield node["path"]
    elif node["t"] in ("dict", "list", "tuple"):
        children = node["items"].values() if node["t"] == "dict" else node["items"]
        for child in children:
            yield from _structure_paths(child)


def _clean_metadata(value: Any, where: str = "metadata") -> Any:
    """A msgpack-able copy of metadata: JSON types plus bytes; numpy scalars become Python
    numbers. Anything else raises CheckpointError naming the key."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_clean_metadata(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where} has a non-string key {k!r}")
            out[k] = _clean_metadata(v, f"{where}[{k!r}]")
        return out
    raise CheckpointError(f"{where} has type {type(value).__name__}, which is not JSON-able; put "
                          f"tensors in the state and plain values in metadata")


# ----------------------------------------------------------------------------------------------
# Leaves <-> bytes


def _dtype_name(kind: str, data) -> str:
    if kind == "numpy":
        return np.dtype(data.dtype).newbyteorder("<").str if data.dtype.byteorder not in "|" else data.dtype.str
    return str(data.dtype).removeprefix("torch.")


def _raw_bytes(kind: str, data) -> memoryview:
    """The leaf's little-endian C-order bytes, without converting the dtype (bf16 -> byte view)."""
    if kind == "numpy":
        arr = np.ascontiguousarray(data)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return memoryview(arr.reshape(-1).view(np.uint8))
    t = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def _from_bytes(kind: str, dtype: str, shape: list[int], buf: bytearray) -> torch.Tensor | np.ndarray:
    if kind == "numpy":
        return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
    tdtype = getattr(torch, dtype, None)
    if not isinstance(tdtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    if len(buf) == 0:
        return torch.empty(shape, dtype=tdtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    if tdtype.is_complex:
        real = {torch.complex64: torch.float32, torch.complex128: torch.float64}[tdtype]
        return torch.view_as_complex(flat.view(real).reshape(-1, 2)).reshape(shape)
    return flat.view(tdtype).reshape(shape)
