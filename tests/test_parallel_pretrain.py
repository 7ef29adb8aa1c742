"""scripts/pretrain.py under torchrun: every layout gives the losses of one process (same global
--batch-size, seed and data), and a run checkpointed under tp=2 resumes under fsdp=2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs of scripts/pretrain.py under torchrun

from dist_launch import ROOT

from aquila_fn.training import checkpoint

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


PP_CONFIG = ["--model-overrides", "dim=64,n_layers=4,n_heads=4,n_kv_heads=2,ffn_dim=128", "--micro-batch-size", "1",
             "--eval-every", "1"]  # the tiny preset's tied embeddings, as shipped


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adopt_checkpoint(source: Path, step: int, out: Path) -> None:
    """Start `out` from `source`'s checkpoint of `step` (as if that run had written it)."""
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)


def test_pretrain_pipeline_with_tied_embeddings_matches_one_process_and_checkpoints_move_both_ways(tmp_path):
    single, pp, back = tmp_path / "single", tmp_path / "pp", tmp_path / "back"
    reference = pretrain(single, "--steps", "4", "--save-every", "2", *PP_CONFIG)
    ref = records(single)
    # one process's step-2 checkpoint resumed under interleaved 1F1B (4 stages of one layer on 2
    # ranks, 4 micro-batches): step 3, and its validation through the pipeline
    adopt_checkpoint(single, 2, pp)
    stepped = pretrain(pp, "--steps", "3", "--resume", *PP_CONFIG, "--mesh", "pp=2", "--virtual-stages", "2",
                       nproc=2)
    assert close(stepped, reference[2:3])
    assert close([records(pp)[-1]["val_loss"]], [ref[2]["val_loss"]])
    # the pipeline's checkpoint holds one embedding matrix (the first stage's: the last stage's
    # copy is an empty block) and no output layer
    blocks = {}
    for rank_file in sorted((pp / "checkpoints" / "step_00000003").glob("rank*.msgpack")):
        for meta, _ in checkpoint.read_state_file(rank_file)[1]:
            blocks.setdefault(meta["path"], []).append(meta["shape"])
    assert blocks["params.embed"] == [[512, 64], [0, 64]] and "params.lm_head" not in blocks
    # and resumes in one process: step 4
    adopt_checkpoint(pp, 3, back)
    assert close(pretrain(back, "--steps", "4", "--resume", *PP_CONFIG), reference[3:])
