"""From parsed arguments to a `Run`: the config, tokenizer, datasets, optimizer and parallel
layout, built once before the first step."""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aquila_fn import data
from aquila_fn.core import device
from aquila_fn.core.config import PRESETS, ModelConfig, get_config
from aquila_fn.training import optim, parallel_setup, train
from ops import _dispatch as ops_dispatch

from .arguments import PretrainError, validate_args


@dataclass
class Run:
    """Everything the loop needs, built once."""
    args: argparse.Namespace
    config: ModelConfig
    precision: str
    micro_batches: int
    datasets: dict
    tokenizer: Any
    optimizer: optim.GradientTransformation
    out: Path
    par: Any = None  # parallel_setup.ParallelSetup: the identity on one process

    @property
    def device(self) -> torch.device:
        """Where parameters, optimizer state and batches live."""
        return self.par.device


def load_config(name: str, overrides: dict) -> ModelConfig:
    if name in PRESETS:
        return get_config(name, **overrides)
    path = Path(name)
    if not path.is_file():
        raise PretrainError(f"--config {name!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    config = ModelConfig.from_file(path)
    return config.replace(**overrides) if overrides else config


def load_tokenizer_or_none(path: str | None):
    if not path:
        return None
    from aquila_fn.data.tokenizer import load_tokenizer
    if not os.path.exists(path):
        raise PretrainError(f"--tokenizer {path}: no such file or directory")
    return load_tokenizer(path)


def warn_if_emulated(precision: str) -> None:
    """16-bit matmuls on a CPU without the instructions run many times slower than fp32."""
    dtype = train.get_precision(precision).compute_dtype
    if dtype not in ops_dispatch.NATIVE_CPU_MATMUL_DTYPES:
        warnings.warn(f"--precision {precision}: this CPU has no native {precision} matmuls "
                      "(avx512_bf16, avx512_fp16, AMX), so they are emulated and training runs "
                      "many times slower than --precision fp32 (what --precision auto picks here)",
                      RuntimeWarning, stacklevel=2)


def setup(args: argparse.Namespace) -> Run:
    validate_args(args)
    dev = device.of(args)
    precision = train.default_precision(dev) if args.precision == "auto" else args.precision
    if dev.type == "cpu":
        warn_if_emulated(precision)
    tokenizer = load_tokenizer_or_none(args.tokenizer)
    config = load_config(args.config, args.model_overrides)
    if tokenizer is not None:
        config = config.with_vocab(tokenizer.vocab_size)
    if args.seq_len > config.max_seq_len:
        raise PretrainError(f"--seq-len {args.seq_len} exceeds the config's max_seq_len {config.max_seq_len}")
    data_path = args.data
    if not (os.path.exists(data_path) or os.path.exists(data_path + ".idx")):
        raise PretrainError(f"--data {data_path}: no such file (nor {data_path}.idx)")
    mbs = args.micro_batch_size or args.batch_size
    datasets = data.build_gpt_datasets(
        data_path, args.seq_len, args.seed, split=args.split, train_samples=args.steps * args.batch_size,
        valid_samples=None, tokenizer=tokenizer, cache_dir=args.data_cache)
    decay_steps = args.decay_steps or args.steps
    schedule = optim.make_schedule(args.decay, args.lr, args.warmup, max(decay_steps, args.warmup),
                                   min(args.min_lr, args.lr))
    mask = lambda params: optim.decay_mask(params, decay_embeddings=not args.no_decay_embeddings)
    optimizer = optim.adamw(schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_eps,
                            weight_decay=args.weight_decay, mask=mask,
                            max_grad_norm=args.clip_grad or None)
    par = parallel_setup.ParallelSetup.from_args(args)
    optimizer = par.wrap_optimizer(optimizer, args.clip_grad or None)
    return Run(args, config, precision, args.batch_size // mbs, datasets, tokenizer, optimizer,
               Path(args.out), par)
