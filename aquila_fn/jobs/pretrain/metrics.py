"""Per-step metrics: throughput and MFU against the device's peak, and `<out>/metrics.jsonl`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from aquila_fn.core import device

from .arguments import PretrainError

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


def step_record(step: int, m: dict, seconds: float, tokens: int, flops_per_token: float,
                peak: float | None) -> dict:
    """One metrics.jsonl line: the step's metrics plus throughput and MFU."""
    return {"step": step, "loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
            "tokens_per_s": tokens / seconds,
            "mfu": flops_per_token * tokens / seconds / peak if peak else None,
            "n_tokens": m["n_tokens"], "skipped": m["skipped"], "loss_scale": m["loss_scale"],
            "step_time": seconds}
