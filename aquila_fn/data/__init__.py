"""Data pipeline: Megatron-LM indexed datasets, the GPT sampler, raw-text caching, Alpaca prompts.

    prefix = prepare_text_dataset("aquila_fn/assets/tinystories.txt", tok, "cache/")  # tokenise once
    ds = GPTDataset(MMapIndexedDataset(prefix), seq_len=256, seed=1234, split="969,30,1",
                    name="train", num_samples=steps * batch_size)
    for position, batch in batch_iterator(ds, batch_size, start=position):   # resumable
        ...   # batch["input_ids"], batch["labels"]: [B, seq_len] int64, labels already shifted

Modules, each importing only those listed before it:

    errors           DataError and the input-file check every reader shares
    indexed_dataset  Megatron's .bin/.idx format: writer, memory-mapped reader (format spec there)
    records          JSONL / JSON / parquet records with key checks
    tokenizing       documents -> indexed dataset, in a worker pool that keeps their order
    text_corpus      raw text files -> documents -> a tokenised cache keyed by content
    gpt_dataset      train/valid/test split, packed fixed-length samples, resumable batches
    instructions     Alpaca prompts, loss-masked encoding, ModelLink's packed SFT datasets
    tokenizer        SentencePiece / Hugging Face tokenizers behind one interface

The public names of all of them are importable from ``aquila_fn.data``.
"""

from aquila_fn.data.errors import DataError, input_file
from aquila_fn.data.indexed_dataset import (
    DTYPE_CODES, INDEX_HEADER, INDEX_VERSION, IndexedDatasetBuilder, MMapIndexedDataset, best_dtype,
    data_file_path, dataset_prefix, index_bytes, index_file_path,
)
from aquila_fn.data.records import (
    detect_format, iter_json_records, iter_jsonl_records, iter_parquet_records, iter_records,
    open_parquet, require_keys,
)
from aquila_fn.data.tokenizing import as_tokenizer, build_indexed_dataset, encode_documents, encode_text
from aquila_fn.data.text_corpus import (
    iter_text_documents, prepare_text_dataset, resolve_data_prefix, tokenizer_fingerprint,
)
from aquila_fn.data.gpt_dataset import GPTDataset, batch_iterator, build_gpt_datasets, parse_split, split_range
from aquila_fn.data.instructions import (
    ALPACA_ASSISTANT_TOKEN, ALPACA_SYSTEM, ALPACA_USER_TOKEN, IGNORE_INDEX, INSTRUCTION_KEYS,
    InstructionDataset, build_instruction_datasets, collate_instruction, encode_instruction,
    format_alpaca_prompt, packed_prefix,
)

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
    "INDEX_VERSION", "dataset_prefix", "input_file", "open_parquet", "require_keys", "as_tokenizer",
    "encode_text", "ALPACA_USER_TOKEN", "ALPACA_ASSISTANT_TOKEN",
]
