"""Hostile checkpoint files (valid checksums, lying contents) are refused with a CheckpointError
naming the problem, before anything they declare is allocated."""

from __future__ import annotations

import re
import time
import tracemalloc
import zlib
from pathlib import Path

import msgpack
import pytest
import torch

from aquila_fn.training import checkpoint as C


def _leaf(path="w", dtype="float32", shape=(4,), data=None, **over) -> tuple[dict, list[bytes]]:
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes() if data is None else data
    meta = {"path": path, "kind": "torch", "dtype": dtype, "shape": list(shape), "global_shape": list(shape),
            "offsets": [0] * len(shape), "nbytes": len(data), "crc32": zlib.crc32(data), "chunks": 1 if data else 0}
    meta.update(over)
    return meta, [data] if data else []


def _write(path: Path, leaves: list[tuple[dict, list[bytes]]], structure=None, **header_over) -> Path:
    """A rank file in the checkpoint format, every checksum right, saying what the test wants."""
    structure = structure or {"t": "dict", "items": {m["path"]: {"t": "leaf", "path": m["path"]} for m, _ in leaves}}
    header = {"step": 1, "rank": 0, "world_size": 1, "metadata": {}, "structure": structure,
              "records": len(leaves), "created": "", "torch": torch.__version__, **header_over}
    head = msgpack.packb(header, use_bin_type=True)
    out = [msgpack.packb({"format": C.FORMAT, "version": C.VERSION, "header": head, "crc32": zlib.crc32(head)})]
    for meta, chunks in leaves:
        m = msgpack.packb(meta, use_bin_type=True)
        out.append(msgpack.packb({"meta": m, "crc32": zlib.crc32(m)}))
        out += [msgpack.packb(c, use_bin_type=True) for c in chunks]
    out.append(msgpack.packb({"end": True, "records": len(leaves)}))
    path.write_bytes(b"".join(out))
    return path


def _nested(depth: int) -> dict:
    node = {"t": "leaf", "path": "w"}
    for _ in range(depth):
        node = {"t": "list", "items": [node]}
    return node


def test_the_writer_helper_makes_loadable_files(tmp_path):
    state, meta = C.load_checkpoint(_write(tmp_path / "rank00000.msgpack", [_leaf()]))
    assert state["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and meta["step"] == 1


TB = 1 << 40


@pytest.mark.parametrize("leaves, header, words", [
    # sizes the file cannot hold: refused before the buffer is allocated
    ([_leaf(shape=(TB // 4,), nbytes=TB, chunks=1)], {}, "declares 1099511627776 bytes, more than the whole file"),
    ([_leaf(nbytes=TB)], {}, "declares 1099511627776 bytes, its shape [4] of float32 holds 16"),
    ([_leaf(shape=(2, 3))], {}, "declares 16 bytes, its shape [2, 3] of float32 holds 24"),
    ([_leaf(shape=(-4,))], {}, "malformed shape"),
    ([_leaf(chunks=10**12)], {}, "chunks"),
    ([_leaf(dtype="__class__")], {}, "unknown dtype"),
    ([_leaf(offsets=[3])], {}, "lies outside"),
    # a sharded leaf whose full tensor would be 1 TB: its blocks do not tile it
    ([_leaf(global_shape=[TB // 4])], {}, "cover 4 of 274877906944 elements"),
    # names that look like file paths
    ([_leaf(path="../../etc/passwd")], {}, "not a dotted name"),
    ([_leaf(path="params/../x")], {}, "not a dotted name"),
    # a malformed or absurd header
    ([_leaf()], {"structure": _nested(200)}, "nested deeper than 64"),
    ([_leaf()], {"structure": {"t": "dict", "items": {"w": {"path": "w"}}}}, "malformed structure"),
    ([_leaf()], {"records": "many"}, "wrong type"),
    ([_leaf()], {"rank": 3}, "wrong type"),
    ([({"path": "w"}, [])], {}, "lacks fields"),
])
def test_hostile_files_are_refused_without_allocating(tmp_path, leaves, header, words):
    path = _write(tmp_path / "rank00000.msgpack", leaves, **header)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(C.CheckpointError, match=re.escape(str(tmp_path))) as exc:
            C.load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert words in str(exc.value)
    assert peak < 16 << 20, peak  # nothing like what the file declares
    assert time.perf_counter() - start < 5


def test_deep_nesting_beyond_msgpacks_own_limit_is_a_clean_error(tmp_path):
    path = _write(tmp_path / "rank00000.msgpack", [_leaf()])
    # msgpack's packer refuses to nest this deep, so the nesting is spliced in as raw bytes:
    # 5000 levels of {"t": "list", "items": [...]} around the leaf node
    level = b"\x82" + msgpack.packb("t") + msgpack.packb("list") + msgpack.packb("items") + b"\x91"
    structure = level * 5000 + msgpack.packb({"t": "leaf", "path": "w"})
    head = msgpack.packb({"step": 1, "rank": 0, "world_size": 1, "metadata": {}, "records": 1}, use_bin_type=True)
    head = head[:1] + b"".join([msgpack.packb("structure")]) + structure + head[1:]
    head = bytes([head[0] + 1]) + head[1:]  # one more key in the fixmap
    first = msgpack.packb({"format": C.FORMAT, "version": C.VERSION, "header": head, "crc32": zlib.crc32(head)})
    rest = path.read_bytes()[len(_first_object(path)):]
    path.write_bytes(first + rest)
    with pytest.raises(C.CheckpointError, match="corrupt header"):
        C.load_checkpoint(path)


def _first_object(path: Path) -> bytes:
    unpacker = msgpack.Unpacker(raw=False)
    data = path.read_bytes()
    unpacker.feed(data)
    unpacker.unpack()
    return data[:unpacker.tell()]


def test_overlapping_shards_are_refused(tmp_path):
    """Two blocks of 2 elements at offsets 0 and 1 count 4 of 4 elements but leave [3] unwritten."""
    data = torch.zeros(2, dtype=torch.float32).numpy().tobytes()
    d = tmp_path / "step_00000001"
    d.mkdir()
    for rank in (0, 1):
        _write(d / C.rank_file_name(rank), [_leaf(shape=(2,), data=data, global_shape=[4], offsets=[rank])],
               world_size=2, rank=rank)
    with pytest.raises(C.CheckpointError, match="cover 4 of 4 elements with overlaps"):
        C.load_checkpoint(d)


def test_state_keys_that_look_like_paths_are_not_written(tmp_path):
    with pytest.raises(C.CheckpointError, match="without dots, slashes or NUL"):
        C.save_checkpoint(tmp_path, {"../x": torch.ones(1)}, step=0)
