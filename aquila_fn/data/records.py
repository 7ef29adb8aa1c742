"""Records of the user's JSONL, JSON and parquet files, checked for the keys a job needs.

One reader per format; each error names the file and the line (``path:line:``) or record, and is
raised as the caller's error class (DataError by default; evaluation tasks pass their own), so a
bad row surfaces as one clear line wherever the file is read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

from aquila_fn.core.files import read_json, utf8_errors
from aquila_fn.data.errors import DataError, input_file


def detect_format(path: str | os.PathLike) -> str:
    """'text', 'jsonl', 'json' or 'parquet' from the file name."""
    name = os.fspath(path).lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                     (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt
    return "text"


def require_keys(record: Any, keys: Sequence[str], where: str,
                 error: type[Exception] = DataError) -> None:
    """``record`` must be a JSON object holding ``keys``; ``where`` locates it in the message."""
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise error(f"{where}: missing key(s) {missing}; present: {sorted(record)[:10]}")


def iter_jsonl_records(path: str | os.PathLike, keys: Sequence[str] = (), *,
                       error: type[Exception] = DataError) -> Iterator[dict]:
    """One JSON object per line (blank lines skipped), each holding ``keys``; errors are ``error``
    naming the file and the 1-based line."""
    p = input_file(path, error)
    with open(p, encoding="utf-8") as f, utf8_errors(p, error):
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{p}:{n}: not valid JSON ({e.msg})") from None
            require_keys(record, keys, f"{p}:{n}", error)
            yield record


def iter_json_records(path: str | os.PathLike, keys: Sequence[str] = ()) -> Iterator[dict]:
    """A JSON file holding a list of objects (the Alpaca release format)."""
    p = input_file(path)
    data = read_json(p, DataError, expect=None)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: holds a JSON {type(data).__name__}, expected a list of records")
    for n, record in enumerate(data):
        require_keys(record, keys, f"{p}: record {n}")
        yield record


def open_parquet(path: str | os.PathLike):
    """A pyarrow ParquetFile, or DataError naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(input_file(path))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on non-parquet bytes
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def iter_parquet_records(path: str | os.PathLike, keys: Sequence[str] = ()) -> Iterator[dict]:
    """Rows of a parquet file, read a record batch at a time."""
    p = input_file(path)
    pf = open_parquet(p)
    columns = pf.schema_arrow.names
    missing = [k for k in keys if k not in columns]
    if missing:
        raise DataError(f"{p}: missing column(s) {missing}; columns: {columns}")
    for batch in pf.iter_batches(columns=list(keys) or None):
        yield from batch.to_pylist()


def iter_records(path: str | os.PathLike, keys: Sequence[str], fmt: str | None = None) -> Iterator[dict]:
    """Records of a jsonl, json or parquet file (``fmt``, else from the file name)."""
    fmt = fmt or detect_format(path)
    readers = {"jsonl": iter_jsonl_records, "json": iter_json_records, "parquet": iter_parquet_records}
    if fmt not in readers:
        raise DataError(f"{path}: format {fmt!r} has no records; use jsonl, json or parquet")
    return readers[fmt](path, keys)
