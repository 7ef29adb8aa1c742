"""Shared benchmark plumbing: every fast path is timed next to its reference in the same run,
and the ratio goes into benchmark.extra_info. The ratio compares the best (minimum) times:
on a shared machine other processes only ever add time, so the minimum is the most
repeatable estimate of each kernel's own cost; medians are recorded as well.

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


def best_seconds(fn, rounds: int = 5) -> float:
    fn()  # warm-up: lazy init, compilation
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@pytest.fixture(scope="session")
def reference_times() -> dict:
    """Best reference times of this session, keyed by case, for the fast tests' ratios."""
    return {}


@pytest.fixture
def timed(benchmark, reference_times):
    """timed(fn, case=..., rounds=..., reference=None, min_speedup=None) -> speedup or None.

    Without `reference` the call is the reference run of `case` and its time is kept.
    With it, the ratio reference/fast of best times is recorded (the reference is timed
    here if its own test did not run in this session) and checked against min_speedup.
    """
    def run(fn, *, case, rounds=10, reference=None, min_speedup=None):
        benchmark.group = case
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.disabled:
            return None
        best = benchmark.stats.stats.min
        benchmark.extra_info.update(best_s=round(best, 6),
                                    median_s=round(benchmark.stats.stats.median, 6),
                                    allocator_keeps_memory=ALLOCATOR_KEEPS_MEMORY)
        if reference is None:
            reference_times[case] = best
            return None
        ref = reference_times.get(case) or best_seconds(reference, rounds)
        speedup = ref / best
        benchmark.extra_info["reference_best_s"] = round(ref, 6)
        benchmark.extra_info["speedup_vs_reference"] = round(speedup, 3)
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
