"""A rank that dies or stalls ends every process with a clear error within the timeout."""

from __future__ import annotations

import time

import pytest

from dist_launch import ROOT, rank_output, torchrun

TIMEOUT_S = 5


@pytest.mark.parametrize("mode, words", [
    ("die", "distributed failure during the fault test"),          # peer gone: next collective fails
    ("stall", "Timed out"),                                         # peer alive but silent: timeout
    ("watchdog", "watchdog: step stalled"),                         # stuck outside any collective
])
def test_a_failed_rank_ends_the_run_with_a_clear_error(mode, words):
    start = time.monotonic()
    # torchrun looks at its children every 3 s here: the survivors' own error must come first
    proc = torchrun("dist_faults.py", 2, mode, str(TIMEOUT_S), timeout=120, check=False, monitor_interval_s=3)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert words in out, out[-3000:]
    assert "[rank 0]" in out and "aborting" in out
    assert "UNEXPECTEDLY" not in out
    assert elapsed < 60, f"took {elapsed:.0f}s to fail"


@pytest.mark.parametrize("script, args, words", [
    # every rank meets the same bad config before the process group exists
    (str(ROOT / "scripts" / "pretrain.py"), ["--config", "{tmp}/cfg.json", "--out", "{tmp}/run"],
     "cfg.json: config lacks field(s): n_layers"),
    # one rank meets a bad file while the other waits for it in a collective
    ("dist_user_error.py", [], "/data/shard1.bin: No such file"),
])
def test_a_user_error_under_torchrun_is_printed_once_and_ends_every_rank(tmp_path, script, args, words):
    (tmp_path / "cfg.json").write_text('{"dim": 64}')
    proc = torchrun(script, 2, *(a.format(tmp=tmp_path) for a in args), timeout=120, check=False,
                    log_dir=tmp_path / "logs")
    ranks = rank_output(tmp_path / "logs")
    lines = [line for text in ranks.values() for line in text.splitlines() if ": error: " in line]
    assert proc.returncode != 0 and len(ranks) == 2
    assert len(lines) == 1 and words in lines[0], ranks
    assert not any("Traceback" in text for text in ranks.values()), ranks
    assert "exitcode  : 0" not in proc.stderr  # torchrun's summary: no rank ended as if it succeeded
