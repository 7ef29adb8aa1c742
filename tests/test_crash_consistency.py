"""Crash consistency of pretraining: runs SIGKILLed at random moments and inside every phase of a
checkpoint save, then resumed, until they finish. After every kill each checkpoint the directory
shows loads; the finished runs' metrics equal an uninterrupted run's bit for bit. SIGTERM saves
and exits.

The runs are forked from one warm process (tests/crash_runs.py), so a kill costs a fork and a
few training steps, not an import of torch. The default suite makes 8 kills (every failpoint
once, the rest at random moments or failpoints); a longer campaign is
`AQUILA_CRASH_KILLS=40 python -m pytest -s tests/test_crash_consistency.py` (AQUILA_CRASH_SEED
varies the moments).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aquila_fn.training import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "aquila_fn" / "assets"
KILLS = int(os.environ.get("AQUILA_CRASH_KILLS", "8"))
STEPS = 12
ARGS = ["--config", "tiny", "--model-overrides", "dim=32,n_layers=2,n_heads=2,n_kv_heads=1,ffn_dim=64",
        "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "16", "--save-every", "1", "--keep", "2",
        "--eval-every", "0", "--eval-iters", "1", "--samples", "0", "--no-progress", "--precision", "fp32",
        "--lr", "1e-2", "--warmup", "2", "--tokenizer", ""]
FAILPOINTS = ["record", "commit", "committed", "prune", "metrics"]
TIMING = ("tokens_per_s", "mfu", "step_time")  # the only fields allowed to differ


class Runner:
    """Client of tests/crash_runs.py: start forked pretraining runs, kill them, reap them."""

    def __init__(self, log_dir: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_runs.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.log_dir, self.n = log_dir, 0

    def _ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the crash-run worker died"
        return json.loads(line)

    def start(self, argv: list[str], failpoint: dict | None = None) -> tuple[int, Path]:
        self.n += 1
        log = self.log_dir / f"run{self.n:03d}.log"
        return self._ask(op="run", argv=argv, log=str(log), failpoint=failpoint)["pid"], log

    def wait(self, pid: int) -> int:
        return self._ask(op="wait", pid=pid)["code"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("crash_logs"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory) -> str:
    from aquila_fn.data import build_indexed_dataset, iter_text_documents
    from aquila_fn.data.tokenizer import load_tokenizer

    docs = list(iter_text_documents(ASSETS / "tinystories.txt"))[:40]
    return build_indexed_dataset(docs, load_tokenizer(ASSETS / "tok512.model"),
                                 tmp_path_factory.mktemp("crash_data") / "stories")


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def reference(runner, data_prefix, tmp_path_factory):
    """An uninterrupted run: its metrics, and how long a step (with its save) takes."""
    out = tmp_path_factory.mktemp("reference")
    pid, log = runner.start([*ARGS, "--data", data_prefix, "--out", str(out)])
    assert runner.wait(pid) == 0, log.read_text()[-3000:]
    times = sorted(json.loads(line)["step_time"] for line in (out / "metrics.jsonl").read_text().splitlines())
    return _records(out), times[len(times) // 2]


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line being written
        return 0


def _alive(pid: int) -> bool:
    """Whether the child still runs (a finished one is a zombie until the worker reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_at_a_random_moment(pid: int, out: Path, rng: random.Random, step_s: float) -> None:
    """SIGKILL once the run has logged a random step, after a random part of the next few steps
    (so the moment falls anywhere: setup, a step, a save, the metrics log). Waiting for a step
    rather than a fixed delay keeps the kill inside the run however loaded the machine is."""
    target = rng.randint(1, STEPS - 1)
    while _alive(pid) and _last_step(out / "metrics.jsonl") < target:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 3 * step_s + 0.01))
    os.kill(pid, signal.SIGKILL)


def _check_visible_checkpoints(ckpt_dir: Path) -> int:
    """Every checkpoint a reader can see loads and the newest is the one load_latest takes;
    returns how many did not load."""
    visible = checkpoint.list_checkpoints(ckpt_dir)
    bad = 0
    for _, path in visible:
        try:
            checkpoint.verify_checkpoint(path)
        except checkpoint.CheckpointError:
            bad += 1
    if visible and not bad:
        assert checkpoint.load_latest(ckpt_dir)[0] == os.fspath(visible[-1][1])
    return bad


def _kill_plan(rng: random.Random, n: int) -> list[str]:
    """n kills: every failpoint once, two at random moments, the others either way (even odds)."""
    plan = FAILPOINTS + ["random", "random"]
    plan += [rng.choice(FAILPOINTS + ["random"] * len(FAILPOINTS)) for _ in range(max(n - len(plan), 0))]
    rng.shuffle(plan)
    return plan


def _failpoint(rng: random.Random, at: str) -> dict | None:
    """The n-th pass through the point: early enough to come before the run ends."""
    if at == "random":
        return None
    return {"at": at, "n": rng.randint(1, 60) if at == "record" else rng.randint(1, 3)}


def test_killed_runs_resume_to_the_same_losses(runner, data_prefix, reference, tmp_path):
    want, step_s = reference
    rng = random.Random(int(os.environ.get("AQUILA_CRASH_SEED", "20")))
    plan = _kill_plan(rng, KILLS)
    kills, corrupt, landed, chains, runs = 0, 0, {}, 0, 0
    while plan and runs < 4 * KILLS:
        chains += 1
        out = tmp_path / f"chain{chains}"
        while True:  # one chain: start, kill, resume ... until the run finishes
            runs += 1
            resume = bool(checkpoint.list_checkpoints(out / "checkpoints"))
            argv = [*ARGS, "--data", data_prefix, "--out", str(out), *(["--resume"] if resume else [])]
            kind = plan[0] if plan else None
            pid, log = runner.start(argv, _failpoint(rng, kind) if kind else None)
            if kind == "random":
                _kill_at_a_random_moment(pid, out, rng, step_s)
            code = runner.wait(pid)
            if code == 0:
                if plan:
                    plan.append(plan.pop(0))  # the run ended before this kill: try it in the next chain
                break
            assert code == -signal.SIGKILL, f"run ended with {code}:\n{log.read_text()[-3000:]}"
            plan.pop(0)
            kills += 1
            landed[kind] = landed.get(kind, 0) + 1
            corrupt += _check_visible_checkpoints(out / "checkpoints")
        assert _records(out) == want, f"chain {chains} diverged after its kills"
    print(f"\n{kills} kills ({landed}) in {runs} runs over {chains} resumed chains: "
          f"{corrupt} corrupt checkpoints visible")
    assert corrupt == 0, f"{corrupt} corrupt checkpoints visible after {kills} kills"
    assert kills >= KILLS and set(FAILPOINTS) <= set(landed), landed


def test_sigterm_saves_and_exits(runner, data_prefix, reference, tmp_path):
    want, _ = reference
    pid, log = runner.start([*ARGS, "--data", data_prefix, "--out", str(tmp_path)])
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.005)  # the loop's signal handler is installed once steps are being logged
    os.kill(pid, signal.SIGTERM)
    assert runner.wait(pid) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM at step" in text, text[-2000:]
    step = int(text.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= step < STEPS
    path, _, meta = checkpoint.load_latest(tmp_path / "checkpoints")
    assert meta["step"] == step
    pid, log = runner.start([*ARGS, "--data", data_prefix, "--out", str(tmp_path), "--resume"])
    assert runner.wait(pid) == 0, log.read_text()[-3000:]
    assert _records(tmp_path) == want
