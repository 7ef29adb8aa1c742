"""One rank's checkpoint file: the state streamed leaf by leaf into msgpack, and read back with
every checksum verified.

Leaf bytes travel in chunks of at most CHUNK_BYTES, so neither side buffers a whole large leaf
twice. Writing is not atomic by itself: ``save_checkpoint`` writes into a temporary directory and
renames it into place.
"""

from __future__ import annotations

import datetime
import os
import zlib
from pathlib import Path
from typing import Any

import msgpack
import torch

from .encoding import (FORMAT, VERSION, CheckpointError, _clean_metadata, _dtype_name, _encode_structure,
                       _from_bytes, _raw_bytes)
from .shards import _leaf_block
from .validation import _check_header, _check_record

CHUNK_BYTES = 64 << 20


# ----------------------------------------------------------------------------------------------
# Writing


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


# ----------------------------------------------------------------------------------------------
# Reading


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
