"""Loading a model for generation from any of the three formats it may come in (a llama2.c
`.bin`, a Hugging Face directory, a native aquila-fn checkpoint), with the tokenizer found
beside it (or named by the checkpoint's metadata)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from aquila_fn.core.config import ConfigError, ModelConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "stories260K.bin"
DEFAULT_TOKENIZER = ASSETS / "tok512.model"


def is_llama2c(path: Path) -> bool:
    if not path.is_file():
        return False
    from aquila_fn.interop.llama2c import Llama2cFormatError, read_llama2c_header
    try:
        read_llama2c_header(path)  # checks the header's fields
        return True
    except Llama2cFormatError:
        return False


def _tokenizer_near(path: Path):
    """A tokenizer shipped beside (or inside) a model, if any."""
    from aquila_fn.data.tokenizer import load_tokenizer
    if path.resolve() == DEFAULT_MODEL.resolve():
        return load_tokenizer(DEFAULT_TOKENIZER)
    directory = path if path.is_dir() else path.parent
    for name in ("tokenizer.model", "tokenizer.json", "vocab.json"):
        if (directory / name).is_file():
            return load_tokenizer(directory if name != "tokenizer.model" else directory / name)
    return None


def load_model(path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", tokenizer: str | os.PathLike | None = None):
    """(config, params, tokenizer or None) from a llama2.c `.bin`, a Hugging Face directory
    (config.json + safetensors / pytorch_model.bin) or a native aquila_fn checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no model (llama2.c file, Hugging Face directory or "
                                "aquila-fn checkpoint) here", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        from aquila_fn.interop.hf import load_hf
        config, params = load_hf(path, dtype=dtype, device=device)
    elif is_llama2c(path):
        from aquila_fn.interop.llama2c import load_llama2c
        config, params = load_llama2c(path)
    else:
        config, params, tokenizer = load_native(path, tokenizer)
    from aquila_fn.core import pytree
    params = pytree.tree_map(lambda x: _cast(x, dtype, device), params)
    from aquila_fn.data.tokenizer import check_tokenizer_fits, load_tokenizer
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _tokenizer_near(path)
    if tok is not None:
        check_tokenizer_fits(tok, config.vocab_size)
    return config, params, tok


def load_native(path: Path, tokenizer):
    """A native checkpoint (a pretrain.py output directory, a run directory, a step directory or a
    rank file; the newest checkpoint is taken); its metadata must hold the config, and may name
    the tokenizer the run used."""
    from aquila_fn.training.checkpoint import CheckpointError, load_checkpoint, latest_checkpoint, read_metadata
    if path.is_dir() and latest_checkpoint(path / "checkpoints"):  # a pretrain.py output directory
        path = path / "checkpoints"
    try:
        read_metadata(path)
    except CheckpointError as e:  # no checkpoint header at all: say what was looked for
        problem = str(e).removeprefix(f"{path}: ")
        if path.is_dir():
            raise CheckpointError(f"{path}: no model in this directory (no Hugging Face config.json, no "
                                  f"aquila-fn checkpoint: {problem})") from None
        raise CheckpointError(f"{path} is not a model: neither a llama2.c file (no valid header) nor an "
                              f"aquila-fn checkpoint ({problem})") from None
    state, metadata = load_checkpoint(path)
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no model config in its metadata")
    try:
        config = ModelConfig.from_dict(metadata["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its model config is invalid: {e}") from None
    params = state["params"] if isinstance(state, dict) and "params" in state else state
    if tokenizer is None:
        named = metadata.get("tokenizer") or (metadata.get("args") or {}).get("tokenizer")
        if isinstance(named, str) and Path(named).exists():
            tokenizer = named
    return config, params, tokenizer


def _cast(x: torch.Tensor, dtype, device) -> torch.Tensor:
    # Integer leaves (int8 weights) keep their dtype; float leaves follow `dtype`.
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x.to(device)
