"""Raw text files: their documents, and their tokenisation once into a cached indexed dataset
keyed by the text's and the tokenizer's bytes, so pretraining on a ``.txt`` needs no preprocessing
step and a changed file or tokenizer can never reuse a stale cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

from aquila_fn.core.files import utf8_errors
from aquila_fn.data.errors import DataError, input_file
from aquila_fn.data.indexed_dataset import (MMapIndexedDataset, data_file_path, dataset_prefix,
                                            index_file_path)
from aquila_fn.data.records import detect_format
from aquila_fn.data.tokenizing import as_tokenizer, build_indexed_dataset


def iter_text_documents(path: str | os.PathLike, split: str = "paragraph") -> Iterator[str]:
    """Documents of a raw text file: 'paragraph' (blank-line separated), 'line', or 'file'."""
    p = input_file(path)
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
    text_path = input_file(text_path)
    tok = as_tokenizer(tokenizer)
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
    prefix = dataset_prefix(path)
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
