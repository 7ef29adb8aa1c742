"""Shared benchmark plumbing: every fast path is timed next to its reference in the same run,
and the ratio goes into benchmark.extra_info. The ratio comes from rounds of the reference
and the fast path interleaved (A B A B ...) and compares their best (minimum) times: on a
shared machine other processes only ever add time, and interleaving exposes both sides to
the same conditions, so this is the most repeatable estimate; medians are recorded too.

Run: pytest benchmarks/ --benchmark-only   (not part of the default `pytest` run).
"""
import ctypes
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """glibc hands large blocks back to the OS on free, so the next allocation page-faults
    afresh (about 1 us per 4 KiB page here, more than many kernels take) and an op's time
    depends on which allocations ran before it. Keep freed memory in the heap instead, as
    CUDA's caching allocator does, so timings measure the kernels. Peak-memory figures come
    from fresh subprocesses and are not affected."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: leave the allocator alone
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


ALLOCATOR_KEEPS_MEMORY = keep_freed_memory()


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved_best(reference, fast, rounds: int):
    """(best reference time, best fast time) over alternating rounds, after a warm-up."""
    reference(), fast()
    times = [(_seconds(reference), _seconds(fast)) for _ in range(rounds)]
    return min(t[0] for t in times), min(t[1] for t in times)


@pytest.fixture
def timed(benchmark):
    """timed(fn, case=..., rounds=..., reference=None, min_speedup=None) -> speedup or None.

    Times fn with pytest-benchmark (group = case). With `reference`, also runs `rounds`
    interleaved rounds of reference and fn, records the ratio of their best times and
    checks it against min_speedup.
    """
    def run(fn, *, case, rounds=10, reference=None, min_speedup=None):
        benchmark.group = case
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.disabled:
            return None
        benchmark.extra_info.update(best_s=round(benchmark.stats.stats.min, 6),
                                    median_s=round(benchmark.stats.stats.median, 6),
                                    allocator_keeps_memory=ALLOCATOR_KEEPS_MEMORY)
        if reference is None:
            return None
        ref, fast = interleaved_best(reference, fn, rounds)
        speedup = ref / fast
        benchmark.extra_info.update(interleaved_reference_best_s=round(ref, 6),
                                    interleaved_best_s=round(fast, 6),
                                    speedup_vs_reference=round(speedup, 3))
        if min_speedup is not None:
            assert speedup >= min_speedup, f"{case}: fast path {speedup:.2f}x the reference"
        return speedup

    return run


def peak_rss_mib(script: str):
    """Run `script` in a fresh Python (default allocator); its last line of output holds
    peak-RSS increases in MiB: one float, or several separated by spaces (a tuple)."""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    values = [float(v) for v in out.stdout.strip().splitlines()[-1].split()]
    return values[0] if len(values) == 1 else tuple(values)


@pytest.fixture
def peak_rss():
    return peak_rss_mib
