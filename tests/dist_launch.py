"""Launch a worker script under torchrun for the multi-process tests (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def torchrun(script: str, nproc: int, *args: str, timeout: float = 300, env: dict | None = None,
             check: bool = True, monitor_interval_s: float | None = None,
             log_dir: Path | None = None) -> subprocess.CompletedProcess:
    """Run `script` (under tests/, or a path) on `nproc` processes; stdout+stderr captured as text.

    `monitor_interval_s` slows torchrun's check of its children, for tests of how the surviving
    ranks themselves report a dead peer (torchrun otherwise may kill them first). With `log_dir`,
    each rank's output goes to its own files there (see `rank_output`)."""
    monitor = [f"--monitor-interval={monitor_interval_s}"] if monitor_interval_s else []
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *monitor, *logs, str(TESTS / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} on {nproc} processes failed (exit {proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def results(proc: subprocess.CompletedProcess, tag: str = "RESULT") -> list[dict]:
    """The JSON records a worker printed as `RESULT {...}` lines."""
    prefix = tag + " "
    return [json.loads(line[len(prefix):]) for line in proc.stdout.splitlines() if line.startswith(prefix)]


def rank_output(log_dir: Path) -> dict[int, str]:
    """Each rank's stdout + stderr from a `torchrun(..., log_dir=)` run."""
    out: dict[int, str] = {}
    for f in sorted(Path(log_dir).glob("*/attempt_*/*/std*.log")):
        out[int(f.parent.name)] = out.get(int(f.parent.name), "") + f.read_text()
    return out
