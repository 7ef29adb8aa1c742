"""A rank that dies or stalls ends every process with a clear error within the timeout."""

from __future__ import annotations

import time

import pytest

from dist_launch import torchrun

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
