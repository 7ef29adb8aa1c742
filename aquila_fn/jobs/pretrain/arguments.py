"""The pretraining command line: its options and defaults, and the checks argparse cannot make."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from aquila_fn.core import device, model
from aquila_fn.core.config import PRESETS
from aquila_fn.training import optim, parallel_setup, train
from parallel import cli

ASSETS = Path(__file__).resolve().parents[2] / "assets"

# The embedded default run: a few million parameters on ~0.7M tokens of Shakespeare, sized so
# the loss falls from ln(512) ≈ 6.2 to well under 3 within a few minutes on 2 CPU cores.
DEFAULT_RUN = dict(config="tiny", data=str(ASSETS / "tinyshakespeare.txt"),
                   tokenizer=str(ASSETS / "tok512.model"), steps=300, batch_size=16, seq_len=128,
                   lr=2e-3, warmup=20, min_lr=2e-4, eval_every=100, out="runs/tiny-shakespeare")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aquila_fn", "data")


class PretrainError(cli.UserError, ValueError):
    """Bad arguments or inputs for a pretraining run; the message says what to change."""


def _overrides(text: str) -> dict[str, Any]:
    """"dim=64,n_layers=2,tie_embeddings=true" -> {"dim": 64, "n_layers": 2, "tie_embeddings": True}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"model override {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"model override {item!r}: {value!r} is not a number "
                                                     "or true/false") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT_RUN
    p = cli.ArgumentParser(
        description="Pretrain an Aquila/LLaMA model. With no arguments: the `tiny` config on the "
                    "shipped tiny-shakespeare corpus, a few minutes on a laptop CPU.")
    a = p.add_argument
    a("--config", default=d["config"], help=f"preset ({', '.join(PRESETS)}) or a config JSON "
      "(ModelConfig.to_dict or a Hugging Face config.json)")
    a("--model-overrides", type=_overrides, default={}, metavar="K=V,...",
      help="replace config fields, e.g. dim=64,n_layers=2")
    a("--data", default=d["data"], help="indexed dataset prefix (.bin/.idx) or a raw text file "
      "(tokenised once into --data-cache)")
    a("--data-cache", default=default_cache_dir(), help="where raw text is tokenised to, once")
    a("--split", default="969,30,1", help="train,valid,test document split (Megatron --split)")
    a("--tokenizer", default=d["tokenizer"], help="tokenizer file/dir (needed for raw text and samples)")
    a("--seed", type=cli.nonnegative_int, default=1234)
    a("--steps", type=cli.positive_int, default=d["steps"], help="train steps (optimizer updates incl. skipped)")
    a("--decay-steps", type=cli.positive_int, default=None, help="lr schedule length (default: --steps)")
    a("--batch-size", type=cli.positive_int, default=d["batch_size"], help="global batch, in sequences")
    a("--micro-batch-size", type=cli.positive_int, default=None, help="sequences per micro-batch (default: batch)")
    a("--seq-len", type=cli.positive_int, default=d["seq_len"])
    a("--lr", type=cli.nonnegative_float, default=d["lr"])
    a("--warmup", type=cli.nonnegative_int, default=d["warmup"], help="warmup steps")
    a("--min-lr", type=cli.nonnegative_float, default=d["min_lr"])
    a("--decay", choices=sorted(optim.SCHEDULES), default="cosine")
    a("--weight-decay", type=cli.nonnegative_float, default=0.1)
    a("--no-decay-embeddings", action="store_true", help="exclude the embedding from weight decay")
    a("--adam-beta1", type=cli.fraction, default=0.9)
    a("--adam-beta2", type=cli.fraction, default=0.95)
    a("--adam-eps", type=cli.positive_float, default=1e-8)
    a("--clip-grad", type=cli.nonnegative_float, default=1.0, help="max global grad norm (0: off)")
    a("--precision", default="auto", help="bf16 | fp16 | fp32 | auto (bf16 where the hardware has it)")
    a("--recompute", choices=model.RECOMPUTE_POLICIES, default="none")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="compile the loss (forward+backward) with fullgraph=True; under --mesh, each layer")
    a("--impl", choices=("auto", "reference", "fused"), default="auto", help="ops implementation")
    a("--out", default=d["out"], help="run directory: metrics.jsonl, checkpoints, loss.png")
    a("--save-every", type=cli.nonnegative_int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--keep", type=cli.positive_int, default=2, help="checkpoints to keep")
    a("--save-final", action=argparse.BooleanOptionalAction, default=True,
      help="checkpoint at the end of the run (--no-save-final: benchmarks, smoke runs)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--eval-every", type=cli.nonnegative_int, default=d["eval_every"],
      help="validation every N steps (0: only at the end)")
    a("--eval-iters", type=cli.nonnegative_int, default=8, help="validation micro-batches per evaluation")
    a("--peak-tflops", type=cli.positive_float, default=None, help="peak FLOP/s for MFU (default: device table)")
    a("--samples", type=cli.nonnegative_int, default=3, help="texts to generate at the end")
    a("--sample-tokens", type=cli.positive_int, default=96)
    a("--temperature", type=cli.nonnegative_float, default=0.8)
    a("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar on stderr")
    device.add_argument(p)
    parallel_setup.add_arguments(p)  # --mesh, --zero, --sequence-parallel, ... (parallel layouts)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """What argparse's types cannot see alone (ranges are checked there)."""
    mbs = args.micro_batch_size or args.batch_size
    if args.batch_size % mbs:
        raise PretrainError(f"--batch-size {args.batch_size} is not divisible by "
                            f"--micro-batch-size {mbs}")
    if args.precision != "auto":
        try:
            train.get_precision(args.precision)
        except ValueError as e:
            raise PretrainError(str(e)) from None
    cli.check_output_dir(args.out, "--out")

