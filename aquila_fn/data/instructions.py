"""Instruction (SFT) data: Alpaca records in ModelLink's prompt template, tokenised with the loss
masked to the response, packed into ModelLink's three indexed datasets, read back and collated
into training batches."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch

from aquila_fn.core.progress import progress_bar
from aquila_fn.data.errors import DataError
from aquila_fn.data.indexed_dataset import IndexedDatasetBuilder, MMapIndexedDataset
from aquila_fn.data.records import require_keys
from aquila_fn.data.tokenizing import as_tokenizer, encode_documents

IGNORE_INDEX = -100

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
    require_keys(record, ("instruction", "output"), "alpaca record")
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
    tok = as_tokenizer(tokenizer)
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
    tok = as_tokenizer(tokenizer)
    builders = {k: IndexedDatasetBuilder(packed_prefix(prefix, k), np.int32) for k in INSTRUCTION_KEYS}
    try:
        encoded = encode_documents(records, tok, _InstructionEncoder(max_len, bos, eos),
                                   workers=workers, chunk_size=chunk_size)
        for example in progress_bar(encoded, total=total, desc=f"{os.fspath(prefix)}_packed",
                                    enabled=progress):
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


def collate_instruction(examples: Sequence[dict], pad_id: int,
                        seq_len: int | None = None) -> dict[str, torch.Tensor]:
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
