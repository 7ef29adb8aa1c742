"""Megatron-LM indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``): the writer and the
memory-mapped reader, byte-compatible with Megatron-LM ``megatron/core/datasets/indexed_dataset.py``
so datasets move between the two stacks unchanged.

``<prefix>.bin``: the token ids of every sequence, back to back, in the dataset dtype.
``<prefix>.idx``, all little-endian::

    b"MMIDIDX\\x00\\x00"            9 bytes  magic
    <Q  1                          version
    <B  dtype code                 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                   7 float32, 8 uint16   (Megatron's DType enum)
    <Q  sequence count S
    <Q  document count D           = number of documents + 1 (document_indices starts with 0)
    int32[S]  sequence lengths (in tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D]  document indices: document d holds sequences document_indices[d]:document_indices[d+1]

Preprocessing writes one sequence per document (Megatron's default without sentence splitting).
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from aquila_fn.data.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


def best_dtype(vocab_size: int | None) -> type:
    """Megatron's choice of token dtype: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dataset_prefix(prefix: str | os.PathLike) -> str:
    """The dataset's prefix, given the prefix itself or its .bin or .idx file."""
    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def data_file_path(prefix: str | os.PathLike) -> str:
    return dataset_prefix(prefix) + ".bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return dataset_prefix(prefix) + ".idx"


def _dtype_code(dtype) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        raise DataError(f"dtype {np.dtype(dtype)} has no Megatron code; "
                        f"use one of {[np.dtype(t).name for t in DTYPE_CODES.values()]}") from None


class IndexedDatasetBuilder:
    """Write ``<prefix>.bin`` / ``<prefix>.idx`` the way Megatron's IndexedDatasetBuilder does.

    ``add_item(tokens)`` appends one sequence, ``end_document()`` closes the current document,
    ``add_document(tokens)`` does both. ``finalize()`` writes the index. Files are written under
    temporary names and renamed at ``finalize`` (the .idx last), so an interrupted build never
    leaves a dataset that looks complete. Use as a context manager to clean up on errors.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = dataset_prefix(prefix)
        self.dtype = np.dtype(dtype)
        _dtype_code(self.dtype)  # fail early on a dtype Megatron cannot name
        # unique temp names: several ranks may build the same cache at once (same bytes, and the
        # final renames are atomic, so the last one wins harmlessly)
        tag = f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._bin_tmp = data_file_path(self.prefix) + tag
        self._idx_tmp = index_file_path(self.prefix) + tag
        Path(self._bin_tmp).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._finalized = False

    def _as_array(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                bad = hi if hi > info.max else lo
                raise DataError(f"{data_file_path(self.prefix)}: token id {bad} does not fit in "
                                f"{self.dtype.name} (range {info.min}..{info.max}); "
                                f"choose a wider dtype (e.g. int32)")
        return arr.astype(self.dtype, copy=False)

    def add_item(self, tokens) -> None:
        arr = self._as_array(tokens)
        self._bin.write(arr.tobytes(order="C"))
        self.sequence_lengths.append(int(arr.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Sequence[int] | None = None) -> None:
        """One document; ``lengths`` splits it into several sequences (default: one)."""
        arr = self._as_array(tokens)
        lengths = [int(arr.size)] if lengths is None else [int(n) for n in lengths]
        if sum(lengths) != arr.size:
            raise DataError(f"{data_file_path(self.prefix)}: sequence lengths {lengths} do not "
                            f"sum to the document's {arr.size} tokens")
        self._bin.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.end_document()

    def finalize(self) -> str:
        """Write the index and move both files into place; returns the prefix."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        idx_tmp = self._idx_tmp
        with open(idx_tmp, "wb") as f:
            f.write(index_bytes(self.sequence_lengths, self.document_indices, self.dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(idx_tmp, index_file_path(self.prefix))  # the .idx appearing marks completion
        self._finalized = True
        return self.prefix

    def abort(self) -> None:
        """Close and delete the partial files."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._finalized:
            self.finalize()


def index_bytes(sequence_lengths: Sequence[int], document_indices: Sequence[int], dtype) -> bytes:
    """The exact bytes of a Megatron .idx file."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1] * dtype.itemsize)
    return b"".join([
        INDEX_HEADER,
        struct.pack("<Q", INDEX_VERSION),
        struct.pack("<B", _dtype_code(dtype)),
        struct.pack("<Q", len(lengths)),
        struct.pack("<Q", len(document_indices)),
        lengths.astype("<i4").tobytes(),
        pointers.astype("<i8").tobytes(),
        np.asarray(document_indices, dtype="<i8").tobytes(),
    ])


class MMapIndexedDataset:
    """Memory-mapped reader of a Megatron indexed dataset; ``ds[i]`` is sequence i (a numpy view).

    Validates the files on open: missing files, wrong magic or version, unknown dtype code, and a
    truncated .idx or .bin all raise DataError naming the file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = dataset_prefix(prefix)
        self.idx_path, self.bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: file not found (indexed dataset prefix {self.prefix!r} "
                                f"needs both .bin and .idx)")
        self._read_index()
        self._map_data()

    def _read_index(self) -> None:
        path = self.idx_path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if head[:9] != INDEX_HEADER[:len(head[:9])]:
            raise DataError(f"{path}: wrong magic {head[:9]!r}, expected {INDEX_HEADER!r} "
                            f"(not a Megatron .idx file)")
        if len(head) < _HEADER_BYTES:
            raise DataError(f"{path}: truncated header ({size} bytes, need {_HEADER_BYTES})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != INDEX_VERSION:
            raise DataError(f"{path}: unsupported index version {version} (expected 1)")
        if code not in DTYPE_CODES:
            raise DataError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        need = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if size < need:
            raise DataError(f"{path}: truncated index ({size} bytes, header promises {need} for "
                            f"{n_seq} sequences and {n_doc} document indices)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        raw = np.memmap(path, mode="r", dtype=np.uint8)
        off = _HEADER_BYTES
        self.sequence_lengths = np.frombuffer(raw, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(raw, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(raw, dtype="<i8", count=n_doc, offset=off)
        di = self.document_indices
        if n_doc == 0 or di[0] != 0 or di[-1] != n_seq or np.any(np.diff(di) < 0):
            raise DataError(f"{path}: inconsistent document indices (must rise from 0 to {n_seq})")

    def _map_data(self) -> None:
        size = os.path.getsize(self.bin_path)
        n_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        need = n_tokens * self.dtype.itemsize
        if len(self.sequence_pointers):
            last = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            need = max(need, last)
        if size < need:
            raise DataError(f"{self.bin_path}: truncated data file ({size} bytes, the index needs "
                            f"{need})")
        self.num_tokens = n_tokens
        usable = size - size % self.dtype.itemsize
        # np.memmap cannot map an empty file; an empty dataset gets an empty array.
        self._tokens = (np.memmap(self.bin_path, mode="r", dtype=self.dtype, shape=(usable // self.dtype.itemsize,))
                        if usable else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def _token_offset(self, seq: int) -> int:
        return int(self.sequence_pointers[seq]) // self.dtype.itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        i = i % len(self)
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset:offset+length`` of sequence i."""
        n = int(self.sequence_lengths[i])
        length = n - offset if length is None else length
        start = self._token_offset(i) + offset
        return self._tokens[start:start + length]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (the sum over its sequences), int64; computed once."""
        if not hasattr(self, "_doc_lengths"):
            cum = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
            self._doc_lengths = cum[self.document_indices[1:]] - cum[self.document_indices[:-1]]
        return self._doc_lengths

    def document_offsets(self) -> np.ndarray:
        """Token offset in .bin where each document starts (its sequences are contiguous)."""
        if not hasattr(self, "_doc_offsets"):
            first = self.document_indices[:-1]
            offsets = np.zeros(len(first), dtype=np.int64)
            present = first < len(self)  # an empty document (no sequences) has no pointer
            offsets[present] = self.sequence_pointers[first[present]] // self.dtype.itemsize
            self._doc_offsets = offsets
        return self._doc_offsets

    def document(self, d: int) -> np.ndarray:
        """All tokens of document d (its sequences joined)."""
        return self.tokens_at(int(self.document_offsets()[d]), int(self.document_lengths()[d]))

    def tokens_at(self, token_offset: int, count: int) -> np.ndarray:
        """Raw token range of the .bin (documents are stored back to back)."""
        return self._tokens[token_offset:token_offset + count]

    def __repr__(self) -> str:
        return (f"MMapIndexedDataset({self.prefix!r}, dtype={self.dtype.name}, "
                f"sequences={len(self)}, documents={self.num_documents}, tokens={self.num_tokens})")
