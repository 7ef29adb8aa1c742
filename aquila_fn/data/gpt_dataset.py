"""Language-model samples from an indexed dataset, as Megatron's GPT dataset draws them.

Megatron's train/valid/test split of the documents, fixed-length samples packed across documents
in a seeded per-epoch shuffle (any sample index is readable directly, so resuming needs no replay),
and batches that carry their position for exact resumption.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch

from aquila_fn.data.errors import DataError
from aquila_fn.data.indexed_dataset import MMapIndexedDataset
from aquila_fn.data.text_corpus import resolve_data_prefix

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
