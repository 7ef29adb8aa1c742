"""Data pipeline: Megatron-LM indexed datasets, the GPT sampler, raw-text caching, Alpaca prompts.

    prefix = prepare_text_dataset("aquila_fn/assets/tinystories.txt", tok, "cache/")  # tokenise once
    ds = GPTDataset(MMapIndexedDataset(prefix), seq_len=256, seed=1234, split="969,30,1",
                    name="train", num_samples=steps * batch_size)
    for position, batch in batch_iterator(ds, batch_size, start=position):   # resumable
        ...   # batch["input_ids"], batch["labels"]: [B, seq_len] int64, labels already shifted

On-disk format (byte-compatible with Megatron-LM ``megatron/core/datasets/indexed_dataset.py``):

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

import hashlib
import json
import multiprocessing
import os
import struct
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from aquila_fn.core.files import read_json, utf8_errors
from parallel.cli import UserError

__all__ = [
    "DataError", "DTYPE_CODES", "INDEX_HEADER", "best_dtype",
    "IndexedDatasetBuilder", "MMapIndexedDataset", "index_file_path", "data_file_path",
    "parse_split", "split_range", "GPTDataset", "batch_iterator",
    "iter_text_documents", "iter_jsonl_records", "iter_json_records", "iter_parquet_records",
    "iter_records", "detect_format", "encode_documents", "build_indexed_dataset",
    "prepare_text_dataset", "tokenizer_fingerprint", "resolve_data_prefix", "build_gpt_datasets",
    "ALPACA_SYSTEM", "format_alpaca_prompt", "encode_instruction", "InstructionDataset",
    "collate_instruction", "INSTRUCTION_KEYS", "IGNORE_INDEX", "build_instruction_datasets",
    "packed_prefix", "index_bytes",
]

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
IGNORE_INDEX = -100


class DataError(UserError, ValueError):
    """A data file is missing, malformed or does not fit the request; the message names the file."""


def best_dtype(vocab_size: int | None) -> type:
    """Megatron's choice of token dtype: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def _strip_suffix(prefix: str | os.PathLike) -> str:
    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def data_file_path(prefix: str | os.PathLike) -> str:
    return _strip_suffix(prefix) + ".bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return _strip_suffix(prefix) + ".idx"


def _dtype_code(dtype) -> int:
    try:
        return _CODE_OF[np.dtype(dtype)]
    except KeyError:
        raise DataError(f"dtype {np.dtype(dtype)} has no Megatron code; "
                        f"use one of {[np.dtype(t).name for t in DTYPE_CODES.values()]}") from None


# ----------------------------------------------------------------------------------------------
# Writing


class IndexedDatasetBuilder:
    """Write ``<prefix>.bin`` / ``<prefix>.idx`` the way Megatron's IndexedDatasetBuilder does.

    ``add_item(tokens)`` appends one sequence, ``end_document()`` closes the current document,
    ``add_document(tokens)`` does both. ``finalize()`` writes the index. Files are written under
    temporary names and renamed at ``finalize`` (the .idx last), so an interrupted build never
    leaves a dataset that looks complete. Use as a context manager to clean up on errors.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = _strip_suffix(prefix)
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


# ----------------------------------------------------------------------------------------------
# Reading


class MMapIndexedDataset:
    """Memory-mapped reader of a Megatron indexed dataset; ``ds[i]`` is sequence i (a numpy view).

    Validates the files on open: missing files, wrong magic or version, unknown dtype code, and a
    truncated .idx or .bin all raise DataError naming the file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = _strip_suffix(prefix)
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


# ----------------------------------------------------------------------------------------------
# GPT sampling


_SPLIT_NAMES = {"train": 0, "valid": 1, "validation": 1, "val": 1, "test": 2}


def parse_split(split: str | Sequence[float]) -> list[float]:
    """'969,30,1' -> normalised [train, valid, test] weights (Megatron's split string)."""
    try:
        parts = [float(s) for s in (split.replace("/", ",").split(",") if isinstance(split, str) else split)]
    except ValueError:
        parts = []
    if not parts or len(parts) > 3 or not all(0 <= p < float("inf") for p in parts) or sum(parts) <= 0:
        raise DataError(f"bad split {split!r}: want up to three non-negative weights like '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return [p / total for p in parts]


def split_range(split: str | Sequence[float], n_documents: int, name: str) -> tuple[int, int]:
    """Document range [begin, end) of one split, computed exactly like Megatron's
    ``get_train_valid_test_split_`` (rounded cumulative bounds, rounding error taken off the end)."""
    if name not in _SPLIT_NAMES:
        raise DataError(f"unknown split name {name!r}; use one of train, valid, test")
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(n_documents))))
    diff = bounds[-1] - n_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    k = _SPLIT_NAMES[name]
    return bounds[k], bounds[k + 1]


class GPTDataset:
    """Fixed-length language-model samples of ``seq_len + 1`` tokens, packed across documents.

    Equivalent in spirit to Megatron's doc_idx / sample_idx / shuffle_idx, built lazily per epoch:
    epoch e shuffles the split's documents with ``numpy.random.default_rng([seed, e, split])``,
    concatenates them into one token stream, cuts it into samples that start every ``seq_len``
    tokens (consecutive samples share one token, as in Megatron), and visits those samples in a
    shuffled order drawn from the same generator. Sample i lives in epoch ``i // samples_per_epoch``,
    so any index can be read directly: resuming at a position needs no replay. Each epoch drops
    its last ``< seq_len`` tokens. ``len(ds)`` is ``num_samples`` when given (cycling over as many
    epochs as that needs), else one epoch.
    """

    def __init__(self, indexed: MMapIndexedDataset | str | os.PathLike, seq_len: int, seed: int,
                 split: str | Sequence[float] = "969,30,1", name: str = "train",
                 num_samples: int | None = None, shuffle: bool = True):
        self.indexed = indexed if isinstance(indexed, MMapIndexedDataset) else MMapIndexedDataset(indexed)
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.seed, self.name, self.shuffle = int(seq_len), int(seed), name, shuffle
        self.split = split
        self.doc_begin, self.doc_end = split_range(split, self.indexed.num_documents, name)
        self._doc_ids = np.arange(self.doc_begin, self.doc_end, dtype=np.int64)
        self._doc_lengths = self.indexed.document_lengths()
        self._doc_offsets = self.indexed.document_offsets()
        self.tokens_per_epoch = int(self._doc_lengths[self._doc_ids].sum())
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // self.seq_len
        if self.samples_per_epoch == 0:
            raise DataError(f"{self.indexed.prefix}: the {name} split (documents {self.doc_begin}:"
                            f"{self.doc_end} of split {split!r}) has {self.tokens_per_epoch} tokens, "
                            f"fewer than one sample of seq_len + 1 = {self.seq_len + 1}")
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_epochs(self) -> int:
        return -(-self.num_samples // self.samples_per_epoch)

    def _epoch(self, e: int):
        """(document order, cumulative token starts, sample order) of epoch e, cached."""
        if e not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, e, _SPLIT_NAMES[self.name]])
            order = rng.permutation(self._doc_ids) if self.shuffle else self._doc_ids
            cum = np.concatenate([[0], np.cumsum(self._doc_lengths[order])])
            samples = (rng.permutation(self.samples_per_epoch) if self.shuffle
                       else np.arange(self.samples_per_epoch))
            if len(self._epoch_cache) >= 2:  # keep the current and the next epoch only
                self._epoch_cache.pop(min(self._epoch_cache))
            self._epoch_cache[e] = (order, cum, samples)
        return self._epoch_cache[e]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range ({self.num_samples} samples)")
        epoch, j = divmod(int(i), self.samples_per_epoch)
        order, cum, samples = self._epoch(epoch)
        start = int(samples[j]) * self.seq_len
        return self._read(order, cum, start, self.seq_len + 1)

    def _read(self, order: np.ndarray, cum: np.ndarray, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        k = int(np.searchsorted(cum, start, side="right")) - 1
        filled = 0
        while filled < count:
            doc = int(order[k])
            within = start + filled - int(cum[k])
            take = min(count - filled, int(self._doc_lengths[doc]) - within)
            if take > 0:
                out[filled:filled + take] = self.indexed.tokens_at(int(self._doc_offsets[doc]) + within, take)
                filled += take
            k += 1
        return out

    def __repr__(self) -> str:
        return (f"GPTDataset({self.indexed.prefix!r}, name={self.name}, seq_len={self.seq_len}, "
                f"documents={self.doc_begin}:{self.doc_end}, samples={self.num_samples}, "
                f"samples_per_epoch={self.samples_per_epoch})")


def batch_iterator(dataset, batch_size: int, start: int = 0, *, stop: int | None = None,
                   dp_rank: int = 0, dp_size: int = 1) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(next_position, {"input_ids", "labels"})`` with [B, seq_len] int64 tensors.

    The position counts samples of the global batch: batch k holds samples
    ``start + k*batch_size ...``; save ``next_position`` in the checkpoint and pass it back as
    ``start`` to continue exactly. With data parallelism, ``batch_size`` is the global batch and
    rank r gets its contiguous slice of ``batch_size // dp_size`` samples. Stops before a batch that
    would run past ``stop`` (default ``len(dataset)``).
    """
    if batch_size % dp_size:
        raise DataError(f"global batch {batch_size} is not divisible by dp_size {dp_size}")
    local = batch_size // dp_size
    end = len(dataset) if stop is None else min(stop, len(dataset))
    position = int(start)
    if position == 0 and end < batch_size:
        raise DataError(f"{dataset!r} has {end} samples, fewer than one batch of {batch_size}; "
                        f"pass num_samples (e.g. steps * batch_size) to cycle over epochs")
    while position + batch_size <= end:
        first = position + dp_rank * local
        tokens = torch.from_numpy(np.stack([dataset[i] for i in range(first, first + local)]))
        position += batch_size
        yield position, {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


# ----------------------------------------------------------------------------------------------
# Reading raw inputs


def detect_format(path: str | os.PathLike) -> str:
    """'text', 'jsonl', 'json' or 'parquet' from the file name."""
    name = os.fspath(path).lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                     (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt
    return "text"


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: input file not found")
    return p


def iter_text_documents(path: str | os.PathLike, split: str = "paragraph") -> Iterator[str]:
    """Documents of a raw text file: 'paragraph' (blank-line separated), 'line', or 'file'."""
    p = _check_file(path)
    if split not in ("paragraph", "line", "file"):
        raise DataError(f"unknown text split {split!r}; use paragraph, line or file")
    with open(p, encoding="utf-8") as f, utf8_errors(p, DataError):
        if split == "file":
            text = f.read()
            if text.strip():
                yield text
            return
        block: list[str] = []
        for line in f:
            if split == "line":
                if line.strip():
                    yield line.rstrip("\n")
                continue
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")


def _require_keys(record: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; present: {sorted(record)[:10]}")


def iter_jsonl_records(path: str | os.PathLike, keys: Sequence[str] = ()) -> Iterator[dict]:
    """One JSON object per line; errors name the file and the (1-based) line."""
    p = _check_file(path)
    with open(p, encoding="utf-8") as f, utf8_errors(p, DataError):
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {n} is not valid JSON ({e.msg})") from None
            _require_keys(record, keys, f"{p}: line {n}")
            yield record


def iter_json_records(path: str | os.PathLike, keys: Sequence[str] = ()) -> Iterator[dict]:
    """A JSON file holding a list of objects (the Alpaca release format)."""
    p = _check_file(path)
    data = read_json(p, DataError, expect=None)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: holds a JSON {type(data).__name__}, expected a list of records")
    for n, record in enumerate(data):
        _require_keys(record, keys, f"{p}: record {n}")
        yield record


def open_parquet(path: str | os.PathLike):
    """A pyarrow ParquetFile, or DataError naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(_check_file(path))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on non-parquet bytes
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def iter_parquet_records(path: str | os.PathLike, keys: Sequence[str] = ()) -> Iterator[dict]:
    """Rows of a parquet file, read a record batch at a time."""
    p = _check_file(path)
    pf = open_parquet(p)
    columns = pf.schema_arrow.names
    missing = [k for k in keys if k not in columns]
    if missing:
        raise DataError(f"{p}: missing column(s) {missing}; columns: {columns}")
    for batch in pf.iter_batches(columns=list(keys) or None):
        yield from batch.to_pylist()


def iter_records(path: str | os.PathLike, keys: Sequence[str], fmt: str | None = None) -> Iterator[dict]:
    fmt = fmt or detect_format(path)
    readers = {"jsonl": iter_jsonl_records, "json": iter_json_records, "parquet": iter_parquet_records}
    if fmt not in readers:
        raise DataError(f"{path}: format {fmt!r} has no records; use jsonl, json or parquet")
    return readers[fmt](path, keys)


# ----------------------------------------------------------------------------------------------
# Tokenising (optionally in a process pool, order preserved)

_WORKER: dict[str, Any] = {}


def _load_tok(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from aquila_fn.data.tokenizer import load_tokenizer
        return load_tokenizer(tokenizer)
    return tokenizer


def _init_worker(tokenizer_path, fn) -> None:
    _WORKER["tok"] = _load_tok(tokenizer_path)
    _WORKER["fn"] = fn


def _run_chunk(chunk: list) -> list:
    tok, fn = _WORKER["tok"], _WORKER["fn"]
    return [fn(item, tok) for item in chunk]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_documents(items: Iterable, tokenizer, fn: Callable[[Any, Any], Any], *, workers: int = 1,
                     chunk_size: int = 64) -> Iterator[Any]:
    """Map ``fn(item, tokenizer)`` over items, in order, using ``workers`` processes.

    ``fn`` must be a module-level function (it is sent to the workers); each worker loads its
    own tokenizer from ``tokenizer.path`` so no tokenizer object is pickled.
    """
    if workers <= 1:
        tok = _load_tok(tokenizer)
        for item in items:
            yield fn(item, tok)
        return
    path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tokenizer.path
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(path, fn)) as pool:
        for result in pool.imap(_run_chunk, _chunks(items, chunk_size)):
            yield from result


def encode_text(text: str, tok, *, bos: bool = False, eod: bool = False) -> list[int]:
    return tok.encode(text, bos=bos, eos=eod)


class _TextEncoder:
    """Picklable ``fn(text, tok)`` with fixed bos/eod flags (for the worker pool)."""

    def __init__(self, bos: bool, eod: bool):
        self.bos, self.eod = bos, eod

    def __call__(self, text: str, tok) -> list[int]:
        return encode_text(text, tok, bos=self.bos, eod=self.eod)


def build_indexed_dataset(documents: Iterable[str], tokenizer, prefix: str | os.PathLike, *,
                          dtype=None, append_eod: bool = True, bos: bool = False, workers: int = 1,
                          chunk_size: int = 64, progress: bool = False, total: int | None = None,
                          desc: str | None = None) -> str:
    """Tokenise documents into ``<prefix>.bin/.idx``, one sequence per document. Returns prefix."""
    tok = _load_tok(tokenizer)
    dtype = dtype or best_dtype(tok.vocab_size)
    if append_eod and tok.eos_id is None:
        raise DataError(f"tokenizer {tok.path} has no EOS token; cannot append end-of-document")
    encoded = encode_documents(documents, tok, _TextEncoder(bos, append_eod), workers=workers,
                               chunk_size=chunk_size)
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for ids in _progress(encoded, progress, total, desc or os.fspath(prefix)):
            builder.add_document(ids)
    return _strip_suffix(prefix)


def _progress(it: Iterable, enabled: bool, total: int | None, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, unit="doc")


# ----------------------------------------------------------------------------------------------
# Raw text -> cached indexed dataset


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """Identity of a tokenizer: its files' bytes plus its special ids and vocabulary size."""
    h = hashlib.sha256()
    h.update(f"{type(tok).__name__}|{tok.vocab_size}|{tok.bos_id}|{tok.eos_id}|{tok.pad_id}".encode())
    path = Path(getattr(tok, "path", "") or "")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if p.is_file():
            h.update(p.name.encode())
            h.update(_file_sha256(p).encode())
    return h.hexdigest()


def prepare_text_dataset(text_path: str | os.PathLike, tokenizer, cache_dir: str | os.PathLike, *,
                         split: str = "paragraph", append_eod: bool = True, bos: bool = False,
                         workers: int = 1, progress: bool = False) -> str:
    """Tokenise a raw text file once into an indexed dataset under ``cache_dir``; return its prefix.

    The cache key is the sha256 of the file's bytes plus the tokenizer's fingerprint and the
    options, so editing the text or changing the tokenizer builds a new cache, and a second call
    with the same inputs only reads the file to hash it. Documents are split per ``split``
    (paragraphs by default) and end with EOS when ``append_eod``.
    """
    text_path = _check_file(text_path)
    tok = _load_tok(tokenizer)
    key = hashlib.sha256("|".join([
        _file_sha256(text_path), tokenizer_fingerprint(tok), split, str(append_eod), str(bos),
    ]).encode()).hexdigest()[:16]
    prefix = Path(cache_dir) / f"{text_path.stem}-{key}_text_document"
    if os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix)):
        try:
            MMapIndexedDataset(prefix)
            return os.fspath(prefix)
        except DataError:
            pass  # a damaged cache is rebuilt below
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return build_indexed_dataset(iter_text_documents(text_path, split), tok, prefix,
                                 append_eod=append_eod, bos=bos, workers=workers, progress=progress)


def resolve_data_prefix(path: str | os.PathLike, tokenizer=None, cache_dir: str | os.PathLike | None = None,
                        **text_options) -> str:
    """An indexed-dataset prefix for ``path``: a Megatron prefix (or its .bin/.idx file) as is, a
    raw text file tokenised once into ``cache_dir`` (default: ``<text dir>/.aquila_cache``)."""
    prefix = _strip_suffix(path)
    if os.path.isfile(index_file_path(prefix)) or os.path.isfile(data_file_path(prefix)):
        return prefix
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: neither an indexed dataset (.bin/.idx) nor a text file")
    if detect_format(p) != "text":
        raise DataError(f"{path}: {detect_format(p)} input must go through "
                        f"scripts/preprocess_data.py first; pass the resulting prefix")
    if tokenizer is None:
        raise DataError(f"{path}: a raw text file needs a tokenizer to be tokenised")
    cache = Path(cache_dir) if cache_dir is not None else p.parent / ".aquila_cache"
    return prepare_text_dataset(p, tokenizer, cache, **text_options)


def build_gpt_datasets(path: str | os.PathLike, seq_len: int, seed: int, *, split: str = "969,30,1",
                       train_samples: int | None = None, valid_samples: int | None = None,
                       tokenizer=None, cache_dir: str | os.PathLike | None = None
                       ) -> dict[str, GPTDataset | None]:
    """{"train", "valid", "test"} GPT datasets over one source (a split with no data is None)."""
    indexed = MMapIndexedDataset(resolve_data_prefix(path, tokenizer, cache_dir))
    begin, end = split_range(split, indexed.num_documents, "train")
    if end <= begin:
        raise DataError(f"{path}: no documents for training ({indexed.num_documents} in the data, "
                        f"split {split!r}); give a non-empty file or a split with a train share")
    samples = {"train": train_samples, "valid": valid_samples, "test": None}
    out: dict[str, GPTDataset | None] = {}
    for name in ("train", "valid", "test"):
        begin, end = split_range(split, indexed.num_documents, name)
        try:
            out[name] = GPTDataset(indexed, seq_len, seed, split, name, samples[name]) if end > begin else None
        except DataError:
            if name == "train":
                raise
            out[name] = None  # too small for one sample: no evaluation on it
    return out


# ----------------------------------------------------------------------------------------------
# Instruction data (Alpaca records, ModelLink's prompt template)

# ModelLink/MindSpeed-LLM AlpacaTemplate: system text, "### Instruction:" user token,
# "### Response:" assistant token, no end token; Prompter joins the parts with newlines.
ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request. "
                 "Please note that you need to think through your response logically and step by step.")
ALPACA_USER_TOKEN = "### Instruction:"
ALPACA_ASSISTANT_TOKEN = "### Response:"
INSTRUCTION_KEYS = ("input_ids", "attention_mask", "labels")


def format_alpaca_prompt(record: dict, system: str = ALPACA_SYSTEM) -> tuple[str, str]:
    """(prompt, response) text of one Alpaca record ({"instruction", "input", "output"}).

    Follows ModelLink's ``Prompter.generate_training_prompt`` with ``AlpacaTemplate``::

        "\\n" + system + "\\n" + "### Instruction:\\n" + user + "\\n" + "### Response:\\n" + output + "\\n"

    where user is the instruction, followed by "\\n" and the input when the input is not empty
    (LLaMA-Factory's Alpaca converter, which ModelLink uses). The prompt is everything up to and
    including "### Response:\\n"; the response is the rest.
    """
    _require_keys(record, ("instruction", "output"), "alpaca record")
    user = record["instruction"]
    if record.get("input"):
        user = user + "\n" + record["input"]
    prompt = "\n" + system + "\n" + ALPACA_USER_TOKEN + "\n" + user + "\n" + ALPACA_ASSISTANT_TOKEN + "\n"
    return prompt, record["output"] + "\n"


def encode_instruction(record: dict, tokenizer, max_len: int | None = None, *, bos: bool = True,
                       eos: bool = True, system: str = ALPACA_SYSTEM) -> dict[str, list[int]]:
    """Tokenise one Alpaca record: {"input_ids", "attention_mask", "labels"} as equal-length lists.

    labels equal input_ids (unshifted, ModelLink's layout) with every prompt token set to -100, so
    the loss covers the response (and the EOS) only. The full text is tokenised once; if the
    prompt's own tokens are not a prefix of it (a merge across the boundary), prompt and response
    are tokenised separately and joined, so the mask always covers exactly the prompt tokens.
    Truncated to ``max_len`` tokens.
    """
    tok = _load_tok(tokenizer)
    prompt, response = format_alpaca_prompt(record, system)
    use_bos = bos and tok.bos_id is not None
    prompt_ids = tok.encode(prompt, bos=use_bos)
    full = tok.encode(prompt + response, bos=use_bos)
    if full[:len(prompt_ids)] != prompt_ids:
        full = prompt_ids + tok.encode(response)
    if eos and tok.eos_id is not None:
        full = full + [tok.eos_id]
    n_prompt = len(prompt_ids)
    labels = [IGNORE_INDEX] * n_prompt + full[n_prompt:]
    if max_len is not None:
        full, labels = full[:max_len], labels[:max_len]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


class _InstructionEncoder:
    """Picklable ``fn(record, tok)`` for the worker pool."""

    def __init__(self, max_len: int | None, bos: bool, eos: bool):
        self.max_len, self.bos, self.eos = max_len, bos, eos

    def __call__(self, record: dict, tok) -> dict[str, list[int]]:
        return encode_instruction(record, tok, self.max_len, bos=self.bos, eos=self.eos)


def build_instruction_datasets(records: Iterable[dict], tokenizer, prefix: str | os.PathLike, *,
                               max_len: int | None = None, bos: bool = True, eos: bool = True,
                               workers: int = 1, chunk_size: int = 64, progress: bool = False,
                               total: int | None = None) -> str:
    """Write ``<prefix>_packed_{input_ids,attention_mask,labels}_document`` (ModelLink's names), one
    example per document, int32 (labels hold -100). Returns ``<prefix>_packed``."""
    tok = _load_tok(tokenizer)
    builders = {k: IndexedDatasetBuilder(packed_prefix(prefix, k), np.int32) for k in INSTRUCTION_KEYS}
    try:
        encoded = encode_documents(records, tok, _InstructionEncoder(max_len, bos, eos),
                                   workers=workers, chunk_size=chunk_size)
        for example in _progress(encoded, progress, total, f"{os.fspath(prefix)}_packed"):
            for k, builder in builders.items():
                builder.add_document(example[k])
        for builder in builders.values():
            builder.finalize()
    except BaseException:
        for builder in builders.values():
            builder.abort()
        raise
    return os.fspath(prefix) + "_packed"


class InstructionDataset:
    """Reader of the three packed datasets ``<prefix>_packed_{input_ids,attention_mask,labels}_document``
    written by ``scripts/preprocess_data.py --handler-name alpaca``; ``ds[i]`` is a dict of arrays."""

    def __init__(self, prefix: str | os.PathLike):
        prefix = os.fspath(prefix)
        self.parts = {k: MMapIndexedDataset(packed_prefix(prefix, k)) for k in INSTRUCTION_KEYS}
        n = {k: len(v) for k, v in self.parts.items()}
        if len(set(n.values())) != 1:
            raise DataError(f"{prefix}: packed datasets disagree on the number of examples: {n}")

    def __len__(self) -> int:
        return len(self.parts["input_ids"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(v[i], dtype=np.int64) for k, v in self.parts.items()}


def packed_prefix(prefix: str | os.PathLike, key: str) -> str:
    """ModelLink's file naming: ``<prefix>_packed_<key>_document``."""
    prefix = os.fspath(prefix)
    if prefix.endswith("_packed"):
        prefix = prefix[: -len("_packed")]
    return f"{prefix}_packed_{key}_document"


def collate_instruction(examples: Sequence[dict], pad_id: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pad encoded examples into a training batch with labels shifted for the loss.

    Returns ``input_ids`` [B, S], ``labels`` [B, S] (labels[t] = target of position t, -100 on
    prompt and padding) and ``attention_mask`` [B, S] bool. S = ``seq_len`` if given, else the
    longest example minus one.
    """
    lengths = [len(e["input_ids"]) - 1 for e in examples]
    width = seq_len if seq_len is not None else max(max(lengths), 1)
    ids = torch.full((len(examples), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, e in enumerate(examples):
        x = torch.as_tensor(np.asarray(e["input_ids"], dtype=np.int64))
        y = torch.as_tensor(np.asarray(e["labels"], dtype=np.int64))
        n = min(len(x) - 1, width)
        if n <= 0:
            continue
        ids[b, :n] = x[:n]
        labels[b, :n] = y[1:n + 1]
        mask[b, :n] = True
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
