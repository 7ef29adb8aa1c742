#!/usr/bin/env python
"""Tokenise raw text, jsonl, json or parquet into Megatron-LM indexed datasets (.bin/.idx).

Pretraining data (one dataset per --json-keys key, named like Megatron: <prefix>_<key>_document):

    python scripts/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-model tokenizer.model --output-prefix data/corpus --append-eod --workers 8

Alpaca instruction data (ModelLink's prompt template, prompt tokens masked with -100; writes
<prefix>_packed_input_ids_document, <prefix>_packed_attention_mask_document and
<prefix>_packed_labels_document):

    python scripts/preprocess_data.py --input alpaca_data.json --handler-name alpaca \\
        --tokenizer-model tokenizer.model --output-prefix data/alpaca --seq-length 2048
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from aquila_fn import data as D
from parallel import cli

# ModelLink's handler names, accepted as aliases.
HANDLERS = {
    "pretrain": "pretrain", "GeneralPretrainHandler": "pretrain",
    "alpaca": "alpaca", "GeneralInstructionHandler": "alpaca",
    "AlpacaStyleInstructionHandler": "alpaca",
}
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int32": np.int32, "int64": np.int64}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="input file: .txt (raw text), .jsonl, .json (a list of objects) or .parquet")
    p.add_argument("--input-format", default="auto", choices=["auto", "text", "jsonl", "json", "parquet"],
                   help="override the format guessed from the file name")
    p.add_argument("--json-keys", "--json-key", dest="json_keys", nargs="+", default=["text"],
                   help="field(s) of each record to tokenise; one dataset per key (default: text)")
    p.add_argument("--text-split", default="paragraph", choices=["paragraph", "line", "file"],
                   help="how raw text is cut into documents (default: blank-line separated paragraphs)")
    p.add_argument("--tokenizer-model", "--tokenizer-name-or-path", "--tokenizer", dest="tokenizer",
                   required=True, help="tokenizer file or directory (SentencePiece .model, "
                                       "tokenizer.json, or vocab.json+merges.txt)")
    p.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    p.add_argument("--handler-name", default="pretrain", choices=sorted(HANDLERS),
                   help="pretrain (plain documents) or alpaca (instruction data); ModelLink names accepted")
    p.add_argument("--append-eod", action="store_true",
                   help="append the end-of-document (EOS) token to every document")
    p.add_argument("--append-bos", action="store_true",
                   help="prepend BOS to every pretraining document (alpaca examples always get BOS)")
    p.add_argument("--seq-length", type=cli.positive_int, default=None,
                   help="alpaca: truncate each example to this many tokens")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="token dtype (auto: uint16 below 65500 ids, else int32, as Megatron)")
    p.add_argument("--workers", type=cli.positive_int, default=1, help="tokenizer processes (order is preserved)")
    p.add_argument("--chunk-size", type=cli.positive_int, default=64, help="documents per task sent to a worker")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _count_documents(path: str, fmt: str) -> int | None:
    """Cheap total for the progress bar (None for raw text)."""
    if fmt == "jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    if fmt == "parquet":
        return D.open_parquet(path).metadata.num_rows
    return None


def _preprocess_pretrain(args, tok, fmt: str) -> list[str]:
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    common = dict(dtype=dtype, append_eod=args.append_eod, bos=args.append_bos, workers=args.workers,
                  chunk_size=args.chunk_size, progress=not args.no_progress)
    if fmt == "text":
        prefix = f"{args.output_prefix}_text_document"
        return [D.build_indexed_dataset(D.iter_text_documents(args.input, args.text_split), tok,
                                        prefix, **common)]
    total = _count_documents(args.input, fmt)
    written = []
    for key in args.json_keys:
        texts = (str(r[key]) for r in D.iter_records(args.input, [key], fmt))
        prefix = f"{args.output_prefix}_{key}_document"
        written.append(D.build_indexed_dataset(texts, tok, prefix, total=total, desc=key, **common))
    return written


def _preprocess_alpaca(args, tok, fmt: str) -> list[str]:
    if fmt == "text":
        raise D.DataError(f"{args.input}: alpaca data must be json, jsonl or parquet records")
    records = D.iter_records(args.input, ["instruction", "output"], fmt)
    return [D.build_instruction_datasets(records, tok, args.output_prefix, max_len=args.seq_length,
                                         eos=args.append_eod,
                                         workers=args.workers, chunk_size=args.chunk_size,
                                         progress=not args.no_progress,
                                         total=_count_documents(args.input, fmt))]


def main(argv: list[str] | None = None) -> list[str]:
    """Run the command line; returns the written prefixes. Errors exit with a one-line message."""
    args = build_parser().parse_args(argv)
    from aquila_fn.data.tokenizer import load_tokenizer

    with cli.user_errors():
        fmt = D.detect_format(args.input) if args.input_format == "auto" else args.input_format
        if not os.path.isfile(args.input):
            raise D.DataError(f"{args.input}: input file not found")
        cli.check_output_dir(Path(args.output_prefix).parent, "--output-prefix")
        tok = load_tokenizer(args.tokenizer)
        Path(args.output_prefix).parent.mkdir(parents=True, exist_ok=True)
        run = _preprocess_alpaca if HANDLERS[args.handler_name] == "alpaca" else _preprocess_pretrain
        written = run(args, tok, fmt)
    for prefix in written:
        print(f"wrote {prefix}.bin / .idx")
    return written


if __name__ == "__main__":
    main()
