"""Checkpoints: a streamed msgpack file per rank, written atomically, a checksum per leaf, no pickle.

    path = save_checkpoint("runs/x", {"params": params, "opt_state": opt_state, "rng": gen.get_state()},
                           step=100, metadata={"config": config.to_dict(), "data_position": pos},
                           keep=3)
    state, meta = load_checkpoint(path)           # meta["step"] == 100, meta["data_position"] == pos
    found = load_latest("runs/x")                 # (path, state, meta) of the newest good one, or None

Layout::

    <directory>/step_00000100/rank00000.msgpack     one file per rank (a single process writes one)
    <directory>/.tmp-step_00000100/                  only while writing; renamed into place when done

Each ``rank{r:05d}.msgpack`` is a stream of msgpack objects:

1. ``{"format": "aquila-fn-checkpoint", "version": 1, "header": <bin>, "crc32": int}``; the bin is
   a msgpack map {"step", "rank", "world_size", "metadata" (JSON-able plus bytes), "structure"
   (the state's tree of dicts/lists/tuples with leaves named by path), "records": N, "created",
   "torch"}; ``read_metadata`` reads only this object.
2. N leaf records, each ``{"meta": <bin>, "crc32": int}`` followed by ``chunks`` bin objects holding
   the leaf's raw bytes (at most 64 MiB each, so reading never buffers a whole large leaf twice).
   meta = {"path": "params.layers.0.attn.wq", "kind": "torch"|"numpy", "dtype": "bfloat16",
   "shape": local shape, "global_shape": full shape, "offsets": where the local block starts in
   the full tensor, "nbytes", "crc32": zlib.crc32 of the raw bytes, "chunks"}. Bytes are the
   little-endian C-order element bytes (bf16 and other dtypes are byte views, no conversion).
3. ``{"end": true, "records": N}``; a file without it is truncated.

Sharded runs write each rank's local blocks (``LocalShard`` leaves, or DTensors) with their global
offsets; ``load_checkpoint`` on the directory reassembles every full tensor from all rank files.
Plain tensors are taken as replicated and written by rank 0 only; DTensor replicas are written
by the rank at coordinate 0 of each replicated mesh dim. A single process writes offsets of zero
and global_shape == shape.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import numpy as np
import torch
from parallel.cli import UserError

__all__ = [
    "CheckpointError", "LocalShard", "save_checkpoint", "load_checkpoint", "load_latest",
    "latest_checkpoint", "list_checkpoints", "read_metadata", "verify_checkpoint",
    "write_state_file", "read_state_file", "rank_file_name", "FORMAT", "VERSION",
]

FORMAT = "aquila-fn-checkpoint"
VERSION = 1
CHUNK_BYTES = 64 << 20
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"^rank(\d{5})\.msgpack$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and the problem."""


@dataclass
class LocalShard:
    """One rank's block of a larger tensor: ``data`` sits at ``offsets`` inside ``global_shape``."""

    data: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]


def rank_file_name(rank: int) -> str:
    return f"rank{rank:05d}.msgpack"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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
    if isinstance(leaf, torch.Tensor) and type(leaf).__name__ == "DTensor":
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


# ----------------------------------------------------------------------------------------------
# One rank file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state_file(path: str | os.PathLike, state: Any, *, step: int, metadata: dict | None = None,
                     rank: int = 0, world_size: int = 1) -> str:
    """Stream ``state`` into one msgpack file (no atomic rename: ``save_checkpoint`` does that)."""
    metadata = _clean_metadata(dict(metadata or {}))
    leaves: list = []
    structure = _encode_structure(state, "", leaves)
    blocks = [(p, _leaf_block(p, leaf, rank)) for p, leaf in leaves]
    blocks = [(p, b) for p, b in blocks if b is not None]
    header = {
        "step": int(step), "rank": int(rank), "world_size": int(world_size), "metadata": metadata,
        "structure": structure, "records": len(blocks),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
    }
    header_bytes = msgpack.packb(header, use_bin_type=True)
    packer = msgpack.Packer(use_bin_type=True)
    with open(path, "wb") as f:
        f.write(packer.pack({"format": FORMAT, "version": VERSION, "header": header_bytes,
                             "crc32": zlib.crc32(header_bytes)}))
        for p, block in blocks:
            _write_record(f, packer, p, *block)
        f.write(packer.pack({"end": True, "records": len(blocks)}))
        f.flush()
        os.fsync(f.fileno())
    return os.fspath(path)


def _write_record(f, packer: msgpack.Packer, path: str, kind: str, data, global_shape, offsets) -> None:
    if kind == "torch" and data.device.type == "meta":
        raise CheckpointError(f"state leaf {path!r} is on the meta device (shapes only, no data)")
    raw = _raw_bytes(kind, data)
    n = raw.nbytes
    chunks = [raw[i:i + CHUNK_BYTES] for i in range(0, n, CHUNK_BYTES)]
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    meta = {"path": path, "kind": kind, "dtype": _dtype_name(kind, data), "shape": list(data.shape),
            "global_shape": list(global_shape), "offsets": list(offsets), "nbytes": n,
            "crc32": crc, "chunks": len(chunks)}
    meta_bytes = msgpack.packb(meta, use_bin_type=True)
    f.write(packer.pack({"meta": meta_bytes, "crc32": zlib.crc32(meta_bytes)}))
    for chunk in chunks:
        f.write(packer.pack(chunk))


def _unpacker(f) -> msgpack.Unpacker:
    return msgpack.Unpacker(f, raw=False, max_buffer_size=2 * CHUNK_BYTES + (1 << 20),
                            strict_map_key=False)


def _next(unpacker: msgpack.Unpacker, path: Path, what: str) -> Any:
    try:
        return unpacker.unpack()
    except msgpack.OutOfData:
        raise CheckpointError(f"{path}: truncated (file ends inside {what})") from None
    except Exception as e:  # malformed msgpack bytes: FormatError, StackError, ValueError, ...
        raise CheckpointError(f"{path}: corrupt ({what} cannot be decoded: {e})") from None


def _read_header(unpacker: msgpack.Unpacker, path: Path) -> dict:
    first = _next(unpacker, path, "the header")
    if not isinstance(first, dict) or first.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an aquila-fn checkpoint (bad header)")
    if first.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {first.get('version')}")
    raw = first.get("header")
    if not isinstance(raw, bytes) or zlib.crc32(raw) != first.get("crc32"):
        raise CheckpointError(f"{path}: header checksum mismatch (corrupt header)")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # malformed msgpack bytes: FormatError, StackError (deep nesting), ...
        raise CheckpointError(f"{path}: corrupt header ({type(e).__name__}{f': {e}' if str(e) else ''})") from None
    _check_header(header, path)
    return header


def _read_record(unpacker: msgpack.Unpacker, path: Path, index: int, file_size: int) -> tuple[dict, Any]:
    what = f"leaf record {index}"
    rec = _next(unpacker, path, what)
    if not isinstance(rec, dict) or not isinstance(rec.get("meta"), bytes):
        raise CheckpointError(f"{path}: corrupt ({what} is malformed)")
    if zlib.crc32(rec["meta"]) != rec.get("crc32"):
        raise CheckpointError(f"{path}: checksum mismatch in the description of {what}")
    try:
        meta = msgpack.unpackb(rec["meta"], raw=False)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt description of {what} ({e})") from None
    _check_record(meta, path, what, file_size)  # before a byte of it is allocated
    what = f"leaf {meta['path']!r}"
    buf = bytearray(meta["nbytes"])
    filled, crc = 0, 0
    for _ in range(meta["chunks"]):
        chunk = _next(unpacker, path, f"the bytes of {what}")
        if not isinstance(chunk, bytes) or filled + len(chunk) > len(buf):
            raise CheckpointError(f"{path}: corrupt (bytes of {what} malformed)")
        buf[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
        crc = zlib.crc32(chunk, crc)
    if filled != meta["nbytes"]:
        raise CheckpointError(f"{path}: {what} has {filled} bytes, expected {meta['nbytes']}")
    if crc != meta["crc32"]:
        raise CheckpointError(f"{path}: checksum mismatch for {what} (corrupt data)")
    try:
        value = _from_bytes(meta["kind"], meta["dtype"], meta["shape"], buf)
    except Exception as e:
        raise CheckpointError(f"{path}: {what} cannot be rebuilt as {meta['dtype']}{meta['shape']}: {e}") from None
    return meta, value


# ----------------------------------------------------------------------------------------------
# What a file declares is checked before it is believed: a damaged or hostile file must not make
# the reader allocate the sizes it claims, recurse without bound, or name leaves like paths.

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


def read_state_file(path: str | os.PathLike) -> tuple[dict, list[tuple[dict, Any]]]:
    """(header, [(record meta, local tensor), ...]) of one rank file, all checksums verified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        unpacker = _unpacker(f)
        header = _read_header(unpacker, path)
        size = os.fstat(f.fileno()).st_size
        records = [_read_record(unpacker, path, i, size) for i in range(header["records"])]
        end = _next(unpacker, path, "the end marker")
        if not isinstance(end, dict) or not end.get("end") or end.get("records") != header["records"]:
            raise CheckpointError(f"{path}: corrupt end marker")
        try:
            unpacker.unpack()
        except msgpack.OutOfData:
            pass
        except Exception:
            raise CheckpointError(f"{path}: unexpected bytes after the end marker") from None
        else:
            raise CheckpointError(f"{path}: unexpected data after the end marker")
    return header, records


# ----------------------------------------------------------------------------------------------
# Directories of checkpoints


def _rank_files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.iterdir() if _RANK_FILE.match(p.name))


def _resolve(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(checkpoint dir, rank files) for a step dir, a rank file, or a run dir (its latest)."""
    p = Path(path)
    if p.is_file():
        return p.parent, [p]
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint not found")
    files = _rank_files(p)
    if not files:
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"{p}: no rank*.msgpack files and no step_* checkpoints inside")
        p = Path(latest)
        files = _rank_files(p)
    return p, files


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (plus "step"), reading only the header of one file."""
    _, files = _resolve(path)
    with open(files[0], "rb") as f:
        header = _read_header(_unpacker(f), files[0])
    return {**header["metadata"], "step": header["step"]}


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


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> tuple[Any, dict]:
    """Load ``(state, metadata)``; metadata holds the saved metadata plus "step".

    ``path`` is a checkpoint dir (all its rank files are merged by offsets), a single rank file
    (must then hold whole tensors), or a run directory (its latest checkpoint). Every leaf's
    checksum is verified; any problem raises CheckpointError naming the file.
    """
    ckpt_dir, files = _resolve(path)
    headers, by_path = [], {}
    for file in files:
        header, records = read_state_file(file)
        headers.append(header)
        for meta, value in records:
            by_path.setdefault(meta["path"], []).append((meta, value))
    world = headers[0]["world_size"]
    if len(files) > 1 and len(files) != world:
        raise CheckpointError(f"{ckpt_dir}: {len(files)} rank files, but the checkpoint was "
                              f"written by {world} ranks")
    structure = headers[0]["structure"]
    leaves = {}
    for name in _structure_paths(structure):
        hint = " (load the whole directory, not one rank file)" if len(files) < world else ""
        if name not in by_path:
            raise CheckpointError(f"{ckpt_dir}: no record for leaf {name!r}{hint}")
        value = _assemble(name, by_path[name], ckpt_dir, hint)
        if map_location is not None and isinstance(value, torch.Tensor):
            value = value.to(map_location)
        leaves[name] = value
    state = _decode_structure(structure, leaves)
    return state, {**headers[0]["metadata"], "step": headers[0]["step"]}


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Read every file of a checkpoint and check all checksums; raise CheckpointError if bad."""
    load_checkpoint(path, map_location=None)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints in a run directory as (step, path), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / rank_file_name(0)).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """Path of the newest committed checkpoint in ``directory`` (temp dirs are never listed)."""
    found = list_checkpoints(directory)
    return os.fspath(found[-1][1]) if found else None


def load_latest(directory: str | os.PathLike, *, map_location: str | torch.device | None = "cpu"
                ) -> tuple[str, Any, dict] | None:
    """``(path, state, metadata)`` of the newest checkpoint that loads, or None if there is none.

    A damaged newest checkpoint is skipped with a warning naming it and the problem, and the
    previous one is tried. Raises CheckpointError only if checkpoints exist and none loads.
    """
    found = list_checkpoints(directory)
    errors = []
    for _, path in reversed(found):
        try:
            state, meta = load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:  # said once, and only when an older checkpoint is taken instead
            warnings.warn(f"skipped damaged checkpoint(s), loading {path}: {'; '.join(errors)}", stacklevel=2)
        return os.fspath(path), state, meta
    if errors:
        raise CheckpointError(f"{directory}: no loadable checkpoint; " + "; ".join(errors))
    return None


def _prune(directory: Path, keep: int | None) -> None:
    if keep is not None:
        for _, p in list_checkpoints(directory)[:-keep]:
            # rename first (atomic), so a kill mid-delete never leaves a half step_ dir listed
            doomed = p.with_name(f".del-{p.name}")
            if doomed.exists():
                shutil.rmtree(doomed, ignore_errors=True)
            os.replace(p, doomed)
    for p in directory.iterdir():  # leftovers of interrupted saves and the renamed dirs
        if p.is_dir() and p.name.startswith((".tmp-", ".old-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)


def _dist_defaults(rank: int | None, world_size: int | None, barrier: Callable[[], None] | None):
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if barrier is None:
        barrier = torch.distributed.barrier if (dist_on and world_size > 1) else (lambda: None)
    return rank, world_size, barrier


def save_checkpoint(directory: str | os.PathLike, state: Any, *, step: int, metadata: dict | None = None,
                    keep: int | None = None, rank: int | None = None, world_size: int | None = None,
                    barrier: Callable[[], None] | None = None) -> str:
    """Write ``state`` as ``<directory>/step_<step:08d>`` atomically; return its path.

    Every rank writes ``rank{r:05d}.msgpack`` into ``.tmp-step_<step>`` beside the target; after
    all files are fsynced, rank 0 renames the temp dir into place and fsyncs ``directory``, so a
    kill at any moment leaves the previous checkpoint as the latest. ``keep`` keeps the newest K
    checkpoints. ``rank``/``world_size``/``barrier`` default to torch.distributed's when it is
    initialised (else 0 / 1 / no-op).
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be >= 1 or None, got {keep}")
    _clean_metadata(dict(metadata or {}))  # fail before touching the directory
    rank, world_size, barrier = _dist_defaults(rank, world_size, barrier)
    directory = Path(directory)
    final = directory / step_dir_name(step)
    tmp = directory / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        write_state_file(tmp / rank_file_name(rank), state, step=step, metadata=metadata,
                         rank=rank, world_size=world_size)
    except OSError as e:
        raise CheckpointError(f"{tmp / rank_file_name(rank)}: cannot write checkpoint: {e}") from e
    barrier()
    if rank == 0:
        _commit(tmp, final)
        _prune(directory, keep)
    barrier()
    return os.fspath(final)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place (moving an existing same-step dir aside first)."""
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
