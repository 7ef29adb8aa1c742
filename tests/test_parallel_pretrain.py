"""scripts/pretrain.py under torchrun: every layout gives the losses of one process (same global
--batch-size, seed and data), and a run checkpointed under tp=2 resumes under fsdp=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs of scripts/pretrain.py under torchrun

from dist_launch import ROOT

ARGS = ["--config", "tiny", "--model-overrides", "dim=64,n_layers=2,n_heads=4,n_kv_heads=2,ffn_dim=128",
        "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--eval-iters", "1", "--samples", "0",
        "--no-progress", "--precision", "fp32", "--lr", "1e-2", "--warmup", "1", "--decay-steps", "8"]


def pretrain(out: Path, *extra: str, nproc: int = 1) -> list[float]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(ROOT / "scripts" / "pretrain.py"), *ARGS, "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    return pretrain(tmp_path_factory.mktemp("single"), "--steps", "4")


def close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, want))


@pytest.mark.parametrize("flags", [
    ["--mesh", "tp=2", "--sequence-parallel"],
    ["--mesh", "dp=2", "--zero", "1", "--offload-optimizer"],
])
def test_pretrain_layouts_match_one_process(tmp_path, reference, flags):
    assert close(pretrain(tmp_path, "--steps", "4", *flags, nproc=2), reference)


def test_pretrain_resumes_under_another_mesh(tmp_path, reference):
    first = pretrain(tmp_path, "--steps", "2", "--mesh", "tp=2", nproc=2)
    both = pretrain(tmp_path, "--steps", "4", "--mesh", "fsdp=2", "--resume", nproc=2)
    assert close(first, reference[:2]) and close(both, reference)


PP_CONFIG = ["--model-overrides", "dim=64,n_layers=4,n_heads=4,n_kv_heads=2,ffn_dim=128,tie_embeddings=false",
             "--micro-batch-size", "1"]


def test_pretrain_pipeline_matches_one_process_and_resumes_with_another_split(tmp_path):
    reference = pretrain(tmp_path / "single", "--steps", "4", *PP_CONFIG)
    # interleaved 1F1B: 4 stages of one layer on 2 ranks, 4 micro-batches
    first = pretrain(tmp_path / "pp", "--steps", "2", *PP_CONFIG, "--mesh", "pp=2", "--virtual-stages", "2",
                     nproc=2)
    # resumed as plain 1F1B: 2 stages of two layers (the checkpoint holds the whole model)
    both = pretrain(tmp_path / "pp", "--steps", "4", *PP_CONFIG, "--mesh", "pp=2", "--resume", nproc=2)
    assert close(first, reference[:2]) and close(both, reference)
