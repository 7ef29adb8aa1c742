#!/usr/bin/env python
"""Convert model checkpoints: Hugging Face <-> native (aquila_fn.training.checkpoint msgpack), llama2.c -> native.

    python scripts/convert_checkpoint.py path/to/hf_dir  out/native            # HF -> native
    python scripts/convert_checkpoint.py out/native      out/hf --to hf        # native -> HF
    python scripts/convert_checkpoint.py stories260K.bin out/native            # llama2.c -> native
    python scripts/convert_checkpoint.py hf_dir out/hf_bf16 --to hf --dtype bfloat16 --max-shard-size 2GB

The source format is detected (a directory with config.json is Hugging Face, a file with a valid
llama2.c header is llama2.c, anything else is read as a native checkpoint: a run directory, a step
directory or a rank file). The target defaults to native, or to hf when the source is native.
A native checkpoint holds {"params": ...} with metadata {"config": ..., "source": ..., "tokenizer": ...}.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch

from aquila_fn.core import pytree
from aquila_fn.core.config import ModelConfig
from parallel import cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a number of bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1048576)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    try:
        size = int(float(m.group(1)) * units[(m.group(2) or "").upper()])
    except ValueError:  # "1.2.3"
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1048576)") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a shard holds at least one byte")
    return size


def detect_format(path: Path) -> str:
    from aquila_fn.inference.loading import is_llama2c
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if is_llama2c(path):
        return "llama2c"
    return "native"


def read(path: Path, fmt: str) -> tuple[ModelConfig, dict, str | None]:
    """(config, params, tokenizer path or None)."""
    if fmt == "hf":
        from aquila_fn.interop.hf import load_hf
        config, params = load_hf(path)
        has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
        return config, params, str(path) if has_tokenizer else None
    if fmt == "llama2c":
        from aquila_fn.interop.llama2c import load_llama2c
        config, params = load_llama2c(path)
        return config, params, None
    from aquila_fn.inference.loading import load_native
    return load_native(path, None)


def write_native(dst: Path, config: ModelConfig, params: dict, source: Path, tokenizer: str | None) -> Path:
    from aquila_fn.training.checkpoint import save_checkpoint
    metadata = {"config": config.to_dict(), "source": str(source)}
    if tokenizer:
        metadata["tokenizer"] = str(Path(tokenizer).resolve())
    return Path(save_checkpoint(dst, {"params": params}, step=0, metadata=metadata))


def write_hf(dst: Path, config: ModelConfig, params: dict, tokenizer: str | None, max_shard_bytes: int) -> Path:
    from aquila_fn.interop.hf import save_hf
    save_hf(dst, config, params, max_shard_bytes=max_shard_bytes)
    copy_tokenizer(tokenizer, dst)
    return dst


def copy_tokenizer(tokenizer: str | None, dst: Path) -> None:
    """Put the tokenizer beside the weights, where transformers and load_model look for it."""
    if not tokenizer:
        return
    src = Path(tokenizer)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and src.resolve() != dst.resolve():
                shutil.copy(src / name, dst / name)
    elif src.suffix == ".model":
        shutil.copy(src, dst / "tokenizer.model")
    elif src.is_file():
        shutil.copy(src, dst / src.name)


def parse_args(argv):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="HF directory, llama2.c .bin, or native checkpoint")
    p.add_argument("dest", help="output directory")
    p.add_argument("--from", dest="src_format", choices=["hf", "llama2c", "native"],
                   help="source format (default: detected)")
    p.add_argument("--to", dest="dst_format", choices=["hf", "native"],
                   help="target format (default: native, or hf for a native source)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast float weights (default: keep)")
    p.add_argument("--tokenizer", help="tokenizer to record (native) or copy beside the weights (hf)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GiB"),
                   help="HF output: split safetensors above this size (default 2GiB)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with cli.user_errors():
        convert(args)
    return 0


def convert(args) -> None:
    src, dst = Path(args.source), Path(args.dest)
    if not src.exists():
        raise cli.UserError(f"{src} does not exist")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise cli.UserError(f"--tokenizer {args.tokenizer} does not exist")
    cli.check_output_dir(dst, "dest")
    src_format = args.src_format or detect_format(src)
    dst_format = args.dst_format or ("hf" if src_format == "native" else "native")
    config, params, tokenizer = read(src, src_format)
    tokenizer = args.tokenizer or tokenizer
    if args.dtype:
        dtype = DTYPES[args.dtype]
        params = pytree.tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, params)
    if dst_format == "hf":
        out = write_hf(dst, config, params, tokenizer, args.max_shard_size)
    else:
        out = write_native(dst, config, params, src, tokenizer)
    n = pytree.param_count(params)
    print(f"{src_format} {src} -> {dst_format} {out}: {n:,} parameters, {config.n_layers} layers, "
          f"dim {config.dim}, vocab {config.vocab_size}")


if __name__ == "__main__":
    sys.exit(main())
