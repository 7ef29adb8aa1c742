import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from aquila_fn.training import checkpoint
from aquila_fn.jobs.pretrain import DEFAULT_RUN, MetricsLog, main, parse_args, pretrain, warn_if_emulated
from ops import _dispatch

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "aquila_fn" / "assets" / "tinyshakespeare.txt"
# A model small enough that 60 steps take seconds: the resume/signal tests check plumbing.
SMALL = "dim=64,n_layers=2,n_heads=4,n_kv_heads=2,ffn_dim=128"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def _args(out, cache, *extra):
    # Reference ops: these tests check the run's plumbing, and skip the fast kernels' compile time.
    return ["--out", str(out), "--data-cache", cache, "--batch-size", "4", "--seq-len", "64",
            "--samples", "0", "--no-progress", "--impl", "reference", *extra]


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_tiny_shakespeare_within_60_steps(tmp_path, cache):
    summary = pretrain(parse_args(_args(
        tmp_path, cache, "--config", "tiny", "--steps", "60", "--lr", "3e-3", "--warmup", "5", "--precision", "fp32",
        "--eval-every", "30", "--eval-iters", "2", "--samples", "1", "--sample-tokens", "8")))
    records = _records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 61))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 5.8 and last < first - 1.5, (first, last)
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in records[-1]
    assert "val_loss" in records[29] and summary["val_loss"] < first - 1.0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert len(summary["samples"]) == 1 and summary["samples"][0].startswith("ROMEO:")
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints").endswith("step_00000060")


def test_resume_is_bit_identical(tmp_path, cache):
    common = ["--model-overrides", SMALL, "--micro-batch-size", "2", "--eval-every", "20",
              "--eval-iters", "1", "--lr", "3e-3", "--warmup", "5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(parse_args(_args(straight, cache, *common, "--steps", "60")))
    # The first half runs the same schedule (it will be continued to 60 steps).
    pretrain(parse_args(_args(split, cache, *common, "--steps", "40", "--decay-steps", "60",
                              "--save-every", "20")))
    pretrain(parse_args(_args(split, cache, *common, "--steps", "60", "--resume")))
    a, b = _records(straight), _records(split)
    assert [r["step"] for r in b] == list(range(1, 61))
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    state_a, meta_a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(straight / "checkpoints"))
    state_b, meta_b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(split / "checkpoints"))
    assert meta_a["data_position"] == meta_b["data_position"] == 60 * 4
    from aquila_fn.core import pytree
    fa, fb = pytree.flatten_dict(state_a), pytree.flatten_dict(state_b)
    assert fa.keys() == fb.keys()
    assert all((fa[k] == fb[k]).all() for k in fa)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"),
           *_args(out, cache, "--model-overrides", SMALL, "--steps", "100000", "--eval-every", "0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    last = _records(out)[-1]["step"]
    path = checkpoint.latest_checkpoint(out / "checkpoints")
    assert path is not None and path.endswith(f"step_{last:08d}")
    _, meta = checkpoint.load_checkpoint(path)
    assert meta["data_position"] == last * 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM"
    # ...and the run continues from there.
    pretrain(parse_args(_args(out, cache, "--model-overrides", SMALL, "--steps", str(last + 2),
                              "--eval-every", "0", "--resume")))
    assert [r["step"] for r in _records(out)][-3:] == [last, last + 1, last + 2]


def test_indexed_dataset_prefix_without_a_tokenizer(tmp_path, cache):
    from aquila_fn import data
    from aquila_fn.data.tokenizer import load_tokenizer
    prefix = data.prepare_text_dataset(SHAKESPEARE, load_tokenizer(DEFAULT_RUN["tokenizer"]), cache)
    summary = pretrain(parse_args(_args(tmp_path, cache, "--data", prefix, "--tokenizer", "",
                                        "--model-overrides", SMALL, "--steps", "3", "--samples", "2")))
    assert summary["steps"] == 3 and summary["samples"] == []  # no tokenizer: nothing to decode
    assert len(_records(tmp_path)) == 3


def test_metrics_log_drops_lines_past_the_checkpoint_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    log = MetricsLog(path, resume_step=5)
    assert [r["step"] for r in log.records] == [1, 2, 3, 4, 5]
    log.write({"step": 6, "loss": 0.5})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "6", "--micro-batch-size", "4"], "not divisible by --micro-batch-size 4"),
    (["--precision", "fp8"], "unknown precision 'fp8'"),
    (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["--resume"], "no checkpoint"),
    (["--config", "huge"], "neither a preset"),
    (["--seq-len", "100000"], "exceeds the config's max_seq_len"),
])
def test_bad_input_is_a_clear_error(tmp_path, cache, capsys, extra, message):
    argv = ["--out", str(tmp_path), "--data-cache", cache, "--steps", "1", "--no-progress", *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_bad_model_override_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model-overrides", "dim"])
    assert "not key=value" in capsys.readouterr().err


def test_no_arguments_is_the_embedded_tiny_shakespeare_run():
    args = parse_args([])
    assert args.config == "tiny" and Path(args.data) == SHAKESPEARE
    assert args.tokenizer.endswith("tok512.model") and args.steps == DEFAULT_RUN["steps"]


def test_explicit_16bit_precision_warns_where_the_cpu_emulates_it(monkeypatch):
    monkeypatch.setattr(_dispatch, "NATIVE_CPU_MATMUL_DTYPES", frozenset({torch.float32, torch.float64}))
    with pytest.warns(RuntimeWarning, match="--precision bf16: this CPU has no native bf16 matmuls"):
        warn_if_emulated("bf16")
    monkeypatch.setattr(_dispatch, "NATIVE_CPU_MATMUL_DTYPES", frozenset({torch.float32, torch.bfloat16}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_emulated("bf16")
        warn_if_emulated("fp32")
