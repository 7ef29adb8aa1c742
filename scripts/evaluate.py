#!/usr/bin/env python
"""Evaluate a model on a task from local files.

    python scripts/evaluate.py --task boolq --data aquila_fn/assets/boolq_val.jsonl \
        --model aquila_fn/assets/stories260K.bin --limit 20
    python scripts/evaluate.py --task mmlu --data mmlu/data --model ckpt_dir --shots 5
    python scripts/evaluate.py --task perplexity --data aquila_fn/assets/tinystories.txt --model m.bin

Prints one JSON line (task, n, acc or the task's metric) on stdout, a progress bar on stderr,
and writes every per-example record to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from aquila_fn.core import device
from aquila_fn.evaluation.evaluate import load_model_and_tokenizer
from aquila_fn.evaluation.tasks import TASKS, find_task, run_task
from parallel import cli

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, type=task_name, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--data", required=True, help="task file or directory (see aquila_fn/evaluation/tasks.py)")
    p.add_argument("--model", required=True, help="llama2.c .bin, Hugging Face dir or native checkpoint")
    p.add_argument("--tokenizer", help="tokenizer path (default: the model's own, or one beside it)")
    p.add_argument("--adapters", help="LoRA adapter checkpoint to merge into the model")
    p.add_argument("--limit", type=cli.nonnegative_int, help="first N examples (per subject for "
                   "mmlu/ceval; characters of the file for perplexity)")
    p.add_argument("--shots", type=cli.nonnegative_int, help="few-shot examples (default: the task's standard)")
    p.add_argument("--split", help="mmlu: test (default) / val / dev; ceval: val (default) / dev")
    p.add_argument("--subjects", help="comma-separated mmlu/ceval subjects (default: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256, help="generative tasks")
    p.add_argument("--max-len", type=cli.positive_int, help="context window used (default: the model's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="generative tasks: the ahead-of-time compiled decode step (see generate.py --compile)")
    p.add_argument("--compile-cache", metavar="DIR", help="where compiled decode steps are kept")
    device.add_argument(p)
    p.add_argument("--out", help="results file (default: <task>_results.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def task_name(text: str) -> str:
    """--task: a task name or alias, checked before anything loads."""
    task = find_task(text)
    if task is None:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; available: {', '.join(TASKS)}")
    return task.name


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli.user_errors():
        run(args)
    return 0


def run(args) -> None:
    out = Path(args.out or f"{args.task}_results.json")
    cli.check_output_file(out, "--out")
    print(device.header("evaluate", args.device, dtype=args.dtype), file=sys.stderr, flush=True)
    config, params, tokenizer = load_model_and_tokenizer(
        args.model, args.tokenizer, adapters_path=args.adapters, dtype=DTYPES[args.dtype],
        device=args.device)
    summary, records = run_task(
        args.task, params, config, tokenizer, args.data, limit=args.limit, shots=args.shots,
        batch_size=args.batch_size, split=args.split,
        subjects=args.subjects.split(",") if args.subjects else None,
        max_new_tokens=args.max_new_tokens, max_len=args.max_len, progress=not args.no_progress,
        decoder_options=dict(compile=args.compile, cache_dir=args.compile_cache, log=_stderr_line))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "args": {**vars(args), "device": str(args.device)},
                              "records": records},
                              ensure_ascii=False, indent=1))
    print(json.dumps({**summary, "out": str(out)}, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
