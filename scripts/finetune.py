#!/usr/bin/env python
"""Fine-tune on instruction data: LoRA adapters (--lora-rank > 0) or all parameters (--lora-rank 0).

    python scripts/finetune.py --model aquila_fn/assets/stories260K.bin \
        --data aquila_fn/assets/alpaca_data_1k.json --lora-rank 8 --steps 100 --out runs/lora

--data is Alpaca json / jsonl / parquet, or a `<prefix>_packed` instruction dataset written by
scripts/preprocess_data.py --handler-name alpaca. Prompt tokens are masked from the loss.
Writes <out>/metrics.jsonl (one line per step: step, loss, grad_norm, lr, n_tokens, time) and
checkpoints: <out>/adapters/step_N (LoRA; evaluate with scripts/evaluate.py --adapters) or
<out>/checkpoints/step_N (full; the params with their config). --merge also writes the merged
model for LoRA runs to <out>/merged/step_N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aquila_fn.core import device
from aquila_fn.training import train
from aquila_fn.evaluation.evaluate import load_model_and_tokenizer
from aquila_fn.jobs.finetune import FinetuneConfig, finetune, load_instruction_examples
from aquila_fn.training.lora import DEFAULT_TARGETS, lora_merge
from parallel import cli


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="llama2.c .bin, Hugging Face dir or native checkpoint")
    p.add_argument("--tokenizer", help="tokenizer path (default: the model's own, or one beside it)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lora-rank", type=cli.nonnegative_int, default=8, help="0 = full fine-tune")
    p.add_argument("--lora-alpha", type=cli.positive_float, default=16.0)
    p.add_argument("--lora-targets", default=DEFAULT_TARGETS, help="regex on parameter paths")
    p.add_argument("--steps", type=cli.positive_int, default=100)
    p.add_argument("--lr", type=cli.nonnegative_float, default=1e-3)
    p.add_argument("--warmup-steps", type=cli.nonnegative_int, default=0)
    p.add_argument("--min-lr", type=cli.nonnegative_float, default=0.0, help="cosine decay floor (with warmup)")
    p.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.0)
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--micro-batches", type=cli.positive_int, default=1)
    p.add_argument("--seq-len", type=cli.positive_int, default=512, help="capped at the model's max_seq_len")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 where the device computes it natively, else fp32")
    p.add_argument("--save-every", type=cli.nonnegative_int, default=0, help="0 = at the end only")
    p.add_argument("--merge", action="store_true", help="LoRA: also save the merged model")
    p.add_argument("--no-progress", action="store_true")
    device.add_argument(p)
    args = p.parse_args(argv)
    if args.batch_size % args.micro_batches:
        p.error(f"--batch-size {args.batch_size} does not split into --micro-batches {args.micro_batches}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli.user_errors():
        run(args)
    return 0


def run(args) -> None:
    cli.check_output_dir(args.out, "--out")
    precision = train.default_precision(args.device) if args.precision == "auto" else args.precision
    print(device.header("finetune", args.device, precision=precision), file=sys.stderr, flush=True)
    config, params, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device=args.device)
    seq_len = min(args.seq_len, config.max_seq_len)
    examples = load_instruction_examples(args.data, tokenizer, seq_len)
    cfg = FinetuneConfig(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=args.lora_targets,
                         steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, min_lr=args.min_lr,
                         weight_decay=args.weight_decay, batch_size=args.batch_size,
                         micro_batches=args.micro_batches, seq_len=seq_len, seed=args.seed,
                         precision=precision, save_every=args.save_every)
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    meta = {"tokenizer": str(Path(tokenizer.path).resolve()), "base_model": str(Path(args.model).resolve()),
            "data": str(args.data)}  # so generate.load_model finds the tokenizer of a full-SFT checkpoint
    result = finetune(config, params, examples, cfg, pad_id=pad_id, out_dir=args.out, metadata=meta,
                      progress=not args.no_progress)
    summary = {"mode": "lora" if cfg.is_lora else "full", "steps": cfg.steps, "examples": len(examples),
               "loss_first": result["metrics"][0]["loss"], "loss_last": result["metrics"][-1]["loss"],
               "checkpoint": result["checkpoint"], "metrics": str(Path(args.out) / "metrics.jsonl")}
    if cfg.is_lora and args.merge:
        from aquila_fn.training.checkpoint import save_checkpoint
        merged = lora_merge(params, result["trainable"], cfg.lora_alpha)
        summary["merged"] = save_checkpoint(Path(args.out) / "merged", {"params": merged}, step=cfg.steps,
                                            metadata={**meta, "config": config.to_dict()})
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
