"""The pretraining run: data -> train steps -> metrics, checkpoints, evaluation, samples.

    python scripts/pretrain.py                      # the embedded default: `tiny` on tiny-shakespeare
    python scripts/pretrain.py --config small --data corpus_text_document --tokenizer tok.model \\
        --steps 10000 --batch-size 64 --micro-batch-size 8 --seq-len 2048 --out runs/x

`pretrain(args)` reads top to bottom: build the config, data, optimizer and state (fresh or from
the newest checkpoint with --resume), then loop over `train.make_train_step`, writing one JSON
line per step to `<out>/metrics.jsonl`, evaluating on the valid split, checkpointing every
--save-every steps and on SIGTERM / Ctrl-C, and at the end saving a loss-curve PNG and printing
samples. A resumed run continues bit-identically: the checkpoint holds params, optimizer state,
step, loss scale and RNG state; its metadata holds the data position.

Modules: `arguments` (the command line), `run_setup` (arguments -> Run), `state` (fresh, resumed,
saved), `metrics` (throughput, MFU, metrics.jsonl), `loop` (the loop and the run), `end_of_run`
(plot, samples, report). Import the public names from here.
"""

from .arguments import (ASSETS, DEFAULT_RUN, PretrainError, build_parser, default_cache_dir, parse_args,
                        validate_args)
from .end_of_run import SAMPLE_PROMPTS, generate_samples, plot_losses, report
from .loop import StopRequest, main, pretrain, train_loop, validation_loss
from .metrics import PEAK_TFLOPS, MetricsLog, peak_flops, step_record
from .run_setup import Run, load_config, load_tokenizer_or_none, setup, warn_if_emulated
from .state import checkpoint_dir, fresh_state, restore_into, resume_state, save

__all__ = [
    "ASSETS", "DEFAULT_RUN", "PretrainError", "build_parser", "default_cache_dir", "parse_args", "validate_args",
    "SAMPLE_PROMPTS", "generate_samples", "plot_losses", "report",
    "StopRequest", "main", "pretrain", "train_loop", "validation_loss",
    "PEAK_TFLOPS", "MetricsLog", "peak_flops", "step_record",
    "Run", "load_config", "load_tokenizer_or_none", "setup", "warn_if_emulated",
    "checkpoint_dir", "fresh_state", "restore_into", "resume_state", "save",
]
