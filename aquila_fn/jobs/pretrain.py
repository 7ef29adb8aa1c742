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
"""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aquila_fn import data
from aquila_fn.core import device, model, pytree
from aquila_fn.training import checkpoint, optim, sharding, train
from aquila_fn.core.config import ModelConfig, PRESETS, get_config
from ops import _dispatch as ops_dispatch
from parallel import cli, shutdown_distributed

ASSETS = Path(__file__).resolve().parents[1] / "assets"

# The embedded default run: a few million parameters on ~0.7M tokens of Shakespeare, sized so
# the loss falls from ln(512) ≈ 6.2 to well under 3 within a few minutes on 2 CPU cores.
DEFAULT_RUN = dict(config="tiny", data=str(ASSETS / "tinyshakespeare.txt"),
                   tokenizer=str(ASSETS / "tok512.model"), steps=300, batch_size=16, seq_len=128,
                   lr=2e-3, warmup=20, min_lr=2e-4, eval_every=100, out="runs/tiny-shakespeare")

# Dense peak TFLOP/s per device for MFU, by compute dtype. The CPU row is this project's
# development machine (2 cores; fp32 and avx512_bf16 matmul measured); override with --peak-tflops.
PEAK_TFLOPS = {
    "cpu": {"fp32": 0.2, "bf16": 0.875, "fp16": 0.2},
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "V100": {"fp32": 15.7, "bf16": 15.7, "fp16": 125.0},
    "4090": {"fp32": 82.6, "bf16": 165.0, "fp16": 165.0},
    "Ascend910B": {"fp32": 80.0, "bf16": 313.0, "fp16": 313.0},
}


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "aquila_fn", "data")


SAMPLE_PROMPTS = ["ROMEO:", "First Citizen:\n", "The king"]


class PretrainError(cli.UserError, ValueError):
    """Bad arguments or inputs for a pretraining run; the message says what to change."""


# ----------------------------------------------------------------------------- arguments


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
    sharding.add_arguments(p)  # --mesh, --zero, --sequence-parallel, ... (parallel layouts)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- setup


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
    par: Any = None  # sharding.ParallelSetup: the identity on one process

    @property
    def device(self) -> torch.device:
        """Where parameters, optimizer state and batches live."""
        return self.par.device


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
    par = sharding.ParallelSetup.from_args(args)
    optimizer = par.wrap_optimizer(optimizer, args.clip_grad or None)
    return Run(args, config, precision, args.batch_size // mbs, datasets, tokenizer, optimizer,
               Path(args.out), par)


# ----------------------------------------------------------------------------- state and checkpoints


def fresh_state(run: Run) -> tuple[dict, int]:
    params = run.par.init_params(run.config, run.args.seed)  # sharded init == init, then shard
    state = train.init_train_state(params, run.optimizer, precision=run.precision)
    state["rng"] = torch.Generator().manual_seed(run.args.seed).get_state()
    return state, 0


def restore_into(template: Any, loaded: Any) -> Any:
    """Loaded leaves placed into the template's structure by path; shapes and dtypes must match."""
    got = pytree.flatten_dict(loaded)
    leaves = []
    for path, want in pytree.named_leaves(template):
        if path not in got:
            raise PretrainError(f"checkpoint lacks {path!r} (was it written with another config?)")
        have = got[path]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise PretrainError(f"checkpoint leaf {path!r} is {tuple(have.shape)} {have.dtype}, the run "
                                f"expects {tuple(want.shape)} {want.dtype}")
        leaves.append(sharding.place_like(have, want))  # reshards onto this run's mesh
    return pytree.unflatten(pytree.structure(template), leaves)


def resume_state(run: Run) -> tuple[dict, int]:
    """(state, data position) from the newest loadable checkpoint in --out."""
    found = checkpoint.load_latest(checkpoint_dir(run))
    if found is None:
        raise PretrainError(f"--resume: no checkpoint in {checkpoint_dir(run)}")
    path, loaded, meta = found
    if meta.get("config") != run.config.to_dict():
        raise PretrainError(f"--resume: {path} was written with config {meta.get('config')}, "
                            f"this run has {run.config.to_dict()}")
    template, _ = fresh_state(run)
    return restore_into(template, loaded), int(meta["data_position"])


def _json_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, dict))


def checkpoint_dir(run: Run) -> Path:
    return run.out / "checkpoints"


def save(run: Run, state: dict, position: int) -> str:
    meta = {"config": run.config.to_dict(), "data_position": position, "precision": run.precision,
            "tokenizer": os.path.abspath(run.args.tokenizer) if run.args.tokenizer else None,
            "args": {k: v for k, v in vars(run.args).items() if _json_scalar(v)}, "device": str(run.device)}
    return checkpoint.save_checkpoint(checkpoint_dir(run), run.par.checkpoint_view(state), step=int(state["step"]), metadata=meta,
                                      keep=run.args.keep)


# ----------------------------------------------------------------------------- signals


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


# ----------------------------------------------------------------------------- metrics


def peak_flops(precision: str, where: str | torch.device = "cpu",
               override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device for MFU: --peak-tflops, else the PEAK_TFLOPS row whose
    key is in the device's product name (cuda:0 (NVIDIA H200) -> H200); None for an
    accelerator the table does not know (MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    dev = torch.device(where)
    if dev.type == "cpu":
        return PEAK_TFLOPS["cpu"][precision] * 1e12
    label = device.name(dev)
    row = next((v for k, v in PEAK_TFLOPS.items() if k != "cpu" and k in label), None)
    return row[precision] * 1e12 if row else None


class MetricsLog:
    """`<out>/metrics.jsonl`, one JSON object per step. On resume, lines past the checkpoint's
    step (written after it by the interrupted run) are dropped so the file has no duplicates;
    the file is replaced atomically, so a kill at any moment keeps the lines before it."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled  # disabled: records kept, nothing written (ranks > 0)
        if not enabled:
            self.records = []
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = self._kept(path, resume_step) if resume_step is not None and path.exists() else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, path)

    @staticmethod
    def _kept(path: Path, resume_step: int) -> list[dict]:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # the last line, cut short by a kill while it was written
                raise PretrainError(f"{path}:{i + 1}: not a JSON line; move the file away to resume") from None
            if record["step"] <= resume_step:
                records.append(record)
        return records

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


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


# ----------------------------------------------------------------------------- evaluation and samples


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


def generate_samples(run: Run, params, generator: torch.Generator) -> list[str]:
    """A few sampled continuations, through the inference engine's static-KV-cache decoder."""
    from aquila_fn.inference.generate import generate
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


# ----------------------------------------------------------------------------- the loop


def step_record(step: int, m: dict, seconds: float, tokens: int, flops_per_token: float,
                peak: float | None) -> dict:
    """One metrics.jsonl line: the step's metrics plus throughput and MFU."""
    return {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
            "tokens_per_s": tokens / seconds,
            "mfu": flops_per_token * tokens / seconds / peak if peak else None,
            "n_tokens": m["n_tokens"], "skipped": m["skipped"], "loss_scale": m["loss_scale"],
            "step_time": seconds}


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        summary = pretrain(args)
    shutdown_distributed()
    if summary.get("rank", 0) == 0:
        report(summary)
    return 0
