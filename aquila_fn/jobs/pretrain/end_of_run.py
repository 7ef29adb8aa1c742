"""The end of a run: the loss-curve plot, sampled texts, and the summary printed on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from aquila_fn.training import train

from .run_setup import Run

SAMPLE_PROMPTS = ["ROMEO:", "First Citizen:\n", "The king"]


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", lw=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def generate_samples(run: Run, params, generator: torch.Generator) -> list[str]:
    """A few sampled continuations, through the inference engine's static-KV-cache decoder."""
    from aquila_fn.inference.decoder import generate
    from aquila_fn.inference.sampling import SamplingParams

    tok = run.tokenizer
    if tok is None or run.args.samples < 1:
        return []
    prompts = (SAMPLE_PROMPTS * run.args.samples)[:run.args.samples]
    ids = [tok.encode(p, bos=tok.bos_id is not None) for p in prompts]
    dtype = train.get_precision(run.precision).compute_dtype
    completions = generate(params, run.config, ids, compute_dtype=dtype,
                           max_new_tokens=run.args.sample_tokens, generator=generator,
                           sampling=SamplingParams(temperature=run.args.temperature),
                           eos_id=tok.eos_id, tokenizer=tok)
    return [p + c.text for p, c in zip(prompts, completions)]


def report(summary: dict, out=sys.stdout) -> None:
    """The human-readable end of a run, on stdout."""
    if summary.get("interrupted"):
        print(f"stopped by {summary['interrupted']} at step {summary['steps']}; checkpoint: "
              f"{summary['checkpoint']} (continue with --resume)", file=out)
        return
    print(f"trained {summary['steps']} steps in {summary['elapsed_s']:.0f}s: loss "
          f"{summary['first_loss']:.3f} -> {summary['train_loss']:.3f}"
          + (f", valid {summary['val_loss']:.3f}" if summary["val_loss"] is not None else ""), file=out)
    if summary.get("plot"):
        print(f"loss curve: {summary['plot']}; checkpoint: {summary['checkpoint']}", file=out)
    for i, text in enumerate(summary.get("samples", [])):
        print(f"--- sample {i + 1} ---\n{text}", file=out)
