"""Sharded checkpoints: each rank writes its own blocks with global offsets, and a checkpoint
saved under one mesh resumes under another (tp=2 -> fsdp=2 -> one process) with identical
parameters and optimizer state."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dist_launch import ROOT, TESTS, results, torchrun

from aquila_fn.training import checkpoint


def one_process(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(TESTS / "dist_checkpoint.py"), *args], cwd=TESTS,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(ROOT),
                                                                           "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results(proc)[0]


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(tmp_path):
    a, b, c, d = (str(tmp_path / n) for n in "abcd")
    saved = results(torchrun("dist_checkpoint.py", 2, "train", "tp=2", a, "2"))[0]
    step2 = checkpoint.latest_checkpoint(a)
    assert sorted(p.name for p in (tmp_path / "a" / "step_00000002").iterdir()) == [
        "rank00000.msgpack", "rank00001.msgpack"]
    # every rank wrote its own half of a tensor-parallel matrix, with its offset
    _, records = checkpoint.read_state_file(f"{step2}/rank00001.msgpack")
    wq = {m["path"]: m for m, _ in records}["params.layers.0.attn.wq"]
    assert wq["offsets"] == [wq["global_shape"][0] // 2, 0] and wq["shape"][0] == wq["global_shape"][0] // 2

    resumed = results(torchrun("dist_checkpoint.py", 2, "resume", "fsdp=2", step2, b, "1"))[0]
    assert resumed["loaded"] == resumed["file"] == saved["final"]  # resharded bit for bit
    single = one_process("resume", "single", checkpoint.latest_checkpoint(b), c, "0")
    assert single["loaded"] == resumed["final"]                     # and again into one process
    # the step after resuming under fsdp=2 is the step one process takes from the same checkpoint
    reference = one_process("resume", "single", step2, d, "1")
    assert abs(resumed["losses"][0] - reference["losses"][0]) <= 1e-4 * reference["losses"][0]
