"""The run, top to bottom: set up, train until --steps or a stop signal (validating on schedule,
checkpointing every --save-every steps and on SIGTERM / Ctrl-C), then save, plot and sample."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager

from aquila_fn import data
from aquila_fn.core import device
from parallel import cli, shutdown_distributed

from .arguments import build_parser
from .end_of_run import generate_samples, plot_losses, report
from .metrics import MetricsLog, peak_flops, step_record
from .run_setup import Run, setup
from .state import fresh_state, resume_state, save


class StopRequest:
    """SIGTERM / Ctrl-C set a flag the loop checks after each step (so a checkpoint is written
    from a consistent state); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals can only be caught on the main thread
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def validation_loss(run: Run, eval_loss, params) -> float | None:
    """Token-weighted loss over the first --eval-iters micro-batches of the valid split (always the
    same ones, so values are comparable across steps). Micro-batch shape = the training one."""
    ds = run.datasets.get("valid")
    if ds is None or run.args.eval_iters < 1:
        return None
    mbs = run.args.micro_batch_size or run.args.batch_size
    stop = min(len(ds), run.args.eval_iters * mbs)
    batches = [b for _, b in data.batch_iterator(ds, mbs, stop=stop)]
    if not batches:  # the split is smaller than one micro-batch: evaluate what there is
        batches = [b for _, b in data.batch_iterator(ds, len(ds))]
    return eval_loss(params, [device.to_device(b, run.device) for b in batches]) if batches else None


def train_loop(run: Run, state: dict, position: int, log: MetricsLog):
    """Steps until --steps or a stop signal; returns (state, data position, signal name or None,
    last validation loss)."""
    args = run.args
    train_step = run.par.make_train_step(run.config, run.optimizer, micro_batches=run.micro_batches,
                                         precision=run.precision, recompute=args.recompute,
                                         compile=args.compile, impl=args.impl)
    eval_loss = run.par.make_eval_loss(run.config, precision=run.precision, impl=args.impl)
    tokens, flops = args.batch_size * args.seq_len, run.config.flops_per_token(args.seq_len)
    peak = peak_flops(run.precision, run.device, args.peak_tflops)
    if peak is None and run.par.is_main:
        warnings.warn(f"no peak FLOP/s known for {device.name(run.device)}: MFU is not reported "
                      "(pass --peak-tflops)", RuntimeWarning, stacklevel=2)
    peak = peak * run.par.world_size if peak else None
    batches = data.batch_iterator(run.datasets["train"], args.batch_size, start=position,
                                  stop=args.steps * args.batch_size)
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=int(state["step"]), file=sys.stderr, dynamic_ncols=True,
               disable=not args.progress or not run.par.is_main, desc="pretrain")
    interrupted, val = None, None
    with StopRequest().installed() as stop, bar:
        for position, batch in batches:
            t0 = time.perf_counter()
            state, m = train_step(state, device.to_device(run.par.local_batch(batch), run.device))
            step = int(state["step"])
            record = step_record(step, m, time.perf_counter() - t0, tokens, flops, peak)
            if step == args.steps or (args.eval_every and step % args.eval_every == 0):
                val = record["val_loss"] = validation_loss(run, eval_loss, state["params"])
            log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            mfu=f"{record['mfu']:.1%}" if peak else "?", refresh=False)
            if run.par.any_rank(stop.signum is not None):  # every rank stops at the same step
                interrupted = signal.Signals(stop.signum or signal.SIGTERM).name
                break
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(run, state, position)
    return state, position, interrupted, val


def pretrain(args: argparse.Namespace) -> dict:
    """Run (or continue) pretraining; returns a summary dict (also written to <out>/summary.json)."""
    started = time.perf_counter()
    run = setup(args)
    if run.par.is_main:
        print(device.header("pretrain", run.device, precision=run.precision,
                            processes=run.par.world_size if run.par.world_size > 1 else None),
              file=sys.stderr, flush=True)
    state, position = resume_state(run) if args.resume else fresh_state(run)
    start_step = int(state["step"])
    log = MetricsLog(run.out / "metrics.jsonl", start_step if args.resume else None,
                     enabled=run.par.is_main)
    with run.par.guard():  # a dead or stalled rank ends every process with a clear error
        state, position, interrupted, val = train_loop(run, state, position, log)
    step = int(state["step"])
    summary = {"steps": step, "interrupted": interrupted, "precision": run.precision,
               "checkpoint": save(run, state, position) if step > start_step and getattr(args, "save_final", True) else None,
               "first_loss": log.records[0]["loss"] if log.records else None,
               "train_loss": log.records[-1]["loss"] if log.records else None, "val_loss": val}
    if interrupted is None:
        if log.records and run.par.is_main:
            plot_losses(log.records, run.out / "loss.png")
            summary["plot"] = os.fspath(run.out / "loss.png")
        generator = device.generator_from_state(state["rng"], run.device)
        params = run.par.full_params(state["params"])  # a collective: every rank takes part
        summary["samples"] = generate_samples(run, params, generator) if run.par.is_main else []
    summary["elapsed_s"] = time.perf_counter() - started
    summary["rank"] = run.par.layout.mesh.rank
    if run.par.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        summary = pretrain(args)
    shutdown_distributed()
    if summary.get("rank", 0) == 0:
        report(summary)
    return 0
