"""Supervised fine-tuning on instruction data: LoRA (adapters trainable, base frozen) or full SFT.

    examples = load_instruction_examples("alpaca_data_1k.json", tokenizer, seq_len=256)
    result = finetune(config, params, examples, FinetuneConfig(lora_rank=8, steps=100), pad_id=0)

Both modes run the same loop: `aquila_fn.training.train.make_train_step` over a trainable tree. For full
SFT the tree is the parameters; for LoRA it is the adapter tree and the loss is
`model.loss_sum_fn ∘ lora_apply(base, ·)`, so gradients and optimizer state exist only for the
adapters and the base tensors are never written. Prompt tokens are masked from the loss
(`data.encode_instruction`, ModelLink's Alpaca template), so only responses are learned.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from aquila_fn import data
from aquila_fn.core import device, model
from aquila_fn.training import lora, optim, train
from aquila_fn.core.config import ModelConfig

INSTRUCTION_KEYS = ("instruction", "output")


@dataclass(frozen=True)
class FinetuneConfig:
    lora_rank: int = 8                 # 0 = full fine-tune
    lora_alpha: float = 16.0
    lora_targets: str = lora.DEFAULT_TARGETS
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 8
    micro_batches: int = 1
    seq_len: int = 256
    seed: int = 0
    precision: str = "fp32"
    impl: str = "auto"                 # op implementations (ops.*): auto | reference | fused | npu
    log_every: int = 1
    save_every: int = 0                # 0 = only at the end

    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0


# ----------------------------------------------------------------------------- data


def load_instruction_records(path: str | os.PathLike) -> list[dict]:
    """Alpaca-style records {"instruction", "input"?, "output"} from .json (a list), .jsonl or
    .parquet; errors name the file and the record."""
    p = Path(path)
    fmt = data.detect_format(p)
    if fmt == "text":
        raise data.DataError(f"{p}: expected Alpaca records in .json, .jsonl or .parquet")
    records = []
    for i, record in enumerate(data.iter_records(p, (), fmt)):
        missing = [k for k in INSTRUCTION_KEYS if k not in record]
        if missing:
            raise data.DataError(f"{p}: record {i} lacks {missing}; present: {sorted(record)}")
        records.append(record)
    if not records:
        raise data.DataError(f"{p}: no records")
    return records


def load_instruction_examples(path: str | os.PathLike, tokenizer, seq_len: int) -> list[dict]:
    """Encoded examples ({"input_ids", "labels"} lists, prompt labels -100) from raw records or a
    preprocessed `<prefix>_packed` instruction dataset (scripts/preprocess_data.py). Each holds at
    most seq_len + 1 tokens: inputs and shifted labels of seq_len."""
    p = Path(path)
    if not p.exists() and data.detect_format(p) != "text":
        raise data.DataError(f"{p}: no such file")
    if p.is_file():
        records = load_instruction_records(p)
        return [data.encode_instruction(r, tokenizer, max_len=seq_len + 1) for r in records]
    try:
        packed = data.InstructionDataset(p)
    except (data.DataError, FileNotFoundError, OSError) as e:
        raise data.DataError(f"{p}: neither an instruction file (.json/.jsonl/.parquet) nor a "
                             f"preprocessed <prefix>_packed dataset ({e})") from None
    return [{k: v[:seq_len + 1] for k, v in packed[i].items()} for i in range(len(packed))]


def batches(examples: Sequence[dict], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless batches: a seeded shuffle per epoch, padded to the longest example of the batch."""
    usable = [e for e in examples if any(int(t) != data.IGNORE_INDEX for t in e["labels"][1:])]
    if len(usable) < batch_size:
        raise data.DataError(f"{len(usable)} of {len(examples)} examples keep response tokens within the "
                             f"sequence length; --batch-size {batch_size} needs at least that many (give "
                             f"more data, a longer --seq-len or a smaller --batch-size)")
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(usable), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield data.collate_instruction([usable[i] for i in order[start:start + batch_size]], pad_id)


# ----------------------------------------------------------------------------- training


def make_optimizer(cfg: FinetuneConfig) -> optim.GradientTransformation:
    schedule = (optim.warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr)
                if cfg.warmup_steps or cfg.min_lr else optim.constant(cfg.lr))
    return optim.adamw(schedule, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)


def trainable_and_loss(params: dict, cfg: FinetuneConfig) -> tuple[Any, Callable | None]:
    """(the tree to train, a loss_sum_fn replacement or None for the model's own)."""
    if not cfg.is_lora:
        return params, None
    adapters = lora.lora_init(params, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    return adapters, lora.lora_loss(model.loss_sum_fn, params, cfg.lora_alpha)


def finetune(config: ModelConfig, params: dict, examples: Sequence[dict], cfg: FinetuneConfig, *,
             pad_id: int = 0, out_dir: str | os.PathLike | None = None, metadata: dict | None = None,
             on_step: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """Run cfg.steps optimizer steps. Returns {"trainable": final adapters or params, "metrics":
    [per-step dicts], "checkpoint": last saved path or None}. With out_dir, writes
    metrics.jsonl and checkpoints (adapters alone for LoRA; params for full SFT), with
    `metadata` (e.g. {"tokenizer": path}) added to the checkpoints' own. Full SFT
    updates `params` in place (the train state owns them); LoRA never writes them. Batches go
    to the device the parameters are on."""
    trainable, loss_sum_fn = trainable_and_loss(params, cfg)
    optimizer = make_optimizer(cfg)
    state = train.init_train_state(trainable, optimizer, precision=cfg.precision)
    step_fn = train.make_train_step(config, optimizer, micro_batches=cfg.micro_batches,
                                    precision=cfg.precision, impl=cfg.impl, loss_sum_fn=loss_sum_fn)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    history, saved = [], None
    from aquila_fn.core.progress import progress_bar
    bar = progress_bar(total=cfg.steps, desc="finetune", enabled=progress)
    source = batches(examples, cfg.batch_size, pad_id, cfg.seed)
    t0 = time.perf_counter()
    where = params["embed"].device
    for step in range(1, cfg.steps + 1):
        state, metrics = step_fn(state, device.to_device(next(source), where))
        record = {"step": step, **metrics, "time": round(time.perf_counter() - t0, 3)}
        history.append(record)
        if out is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if on_step:
            on_step(record)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        bar.update(1)
        if out is not None and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
            saved = save_trainable(out, state["params"], config, cfg, step, metadata)
    bar.close()
    return {"trainable": state["params"], "metrics": history, "checkpoint": saved}


def save_trainable(out: Path, trainable: Any, config: ModelConfig, cfg: FinetuneConfig, step: int,
                   metadata: dict | None = None) -> str:
    """Adapters alone (`out/adapters/step_N`) for LoRA; params (`out/checkpoints/step_N`,
    config in the metadata, as generate.load_model reads it) for full SFT."""
    meta = {**(metadata or {}), "config": config.to_dict(), "finetune": asdict(cfg)}
    if cfg.is_lora:
        return lora.save_adapters(out / "adapters", trainable, alpha=cfg.lora_alpha,
                                  targets=cfg.lora_targets, step=step, metadata=meta)
    from aquila_fn.training.checkpoint import save_checkpoint
    return save_checkpoint(out / "checkpoints", {"params": trainable}, step=step, metadata=meta)


@torch.no_grad()
def mean_loss(config: ModelConfig, params: dict, examples: Sequence[dict], *, pad_id: int = 0,
              batch_size: int = 8) -> float:
    """Token-weighted mean loss of the examples' responses (the fine-tuning objective)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = data.collate_instruction(examples[start:start + batch_size], pad_id)
        s, n = model.loss_sum_fn(params, device.to_device(batch, params["embed"].device), config)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)
