"""Tokenising documents into an indexed dataset, optionally across a pool of worker processes
that keeps the documents' order (preprocessing a large corpus is tokenizer-bound)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator

from aquila_fn.core.progress import progress_bar
from aquila_fn.data.errors import DataError
from aquila_fn.data.indexed_dataset import IndexedDatasetBuilder, best_dtype, dataset_prefix

_WORKER: dict[str, Any] = {}


def as_tokenizer(tokenizer):
    """A tokenizer object, loading it when given its path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from aquila_fn.data.tokenizer import load_tokenizer
        return load_tokenizer(tokenizer)
    return tokenizer


def _init_worker(tokenizer_path, fn) -> None:
    _WORKER["tok"] = as_tokenizer(tokenizer_path)
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
        tok = as_tokenizer(tokenizer)
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
    tok = as_tokenizer(tokenizer)
    dtype = dtype or best_dtype(tok.vocab_size)
    if append_eod and tok.eos_id is None:
        raise DataError(f"tokenizer {tok.path} has no EOS token; cannot append end-of-document")
    encoded = encode_documents(documents, tok, _TextEncoder(bos, append_eod), workers=workers,
                               chunk_size=chunk_size)
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for ids in progress_bar(encoded, total=total, desc=desc or os.fspath(prefix), enabled=progress):
            builder.add_document(ids)
    return dataset_prefix(prefix)
