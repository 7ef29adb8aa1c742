"""Failing loudly instead of hanging.

Three layers, each bounding the time a dead or stalled peer can cost:

1. `make_mesh(timeout_s=...)` gives every collective a timeout (a stalled peer raises there);
   a peer that dies closes its connections, so the survivors' next collective raises at once.
2. `guard()` turns such an error into one clear line naming this rank and the cause, and ends
   the process with `os._exit` (a normal exit could block in the process group's teardown,
   waiting on the very peer that is gone); torchrun then stops the remaining ranks.
3. `Watchdog(timeout_s)` covers what no collective timeout sees (a rank stuck in compute, a
   backend without timeouts): if a step does not finish in time it prints every thread's stack
   and ends the process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from typing import Iterator

EXIT_CODE = 17  # distinctive: "a distributed failure ended this rank"

_DIST_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError", "DistError")
_DIST_WORDS = ("gloo", "nccl", "hccl", "timed out", "timeout", "connection", "peer", "collective",
               "process group", "recv", "send", "socket")


def _rank() -> str:
    return os.environ.get("RANK", "0")


def is_distributed_error(exc: BaseException) -> bool:
    """Errors raised by a collective or the rendezvous (not a bug in the program)."""
    if type(exc).__name__ in _DIST_ERRORS:
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(w in text for w in _DIST_WORDS)
    return False


def abort(message: str, code: int = EXIT_CODE) -> None:
    """Print `message` for this rank and end the process now (no teardown that could block)."""
    sys.stdout.flush()
    sys.stderr.write(f"[rank {_rank()}] {message}\n")
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def guard(what: str = "training") -> Iterator[None]:
    """End the process with a clear error when a collective fails (dead or stalled peer)."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - we re-raise anything that is not distributed
        if not is_distributed_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        abort(f"distributed failure during {what}: {type(e).__name__}: {first[:500]} -- a peer "
              f"rank died or stalled (collectives time out after the mesh's timeout); aborting")


class Watchdog:
    """`with Watchdog(600) as dog: for ...: dog.pet(); step()` — ends the process if `pet()` is not
    called for `timeout_s` seconds, after dumping every thread's stack."""

    def __init__(self, timeout_s: float, what: str = "step"):
        self.timeout_s = float(timeout_s)
        self.what = what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pet(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                sys.stderr.write(f"[rank {_rank()}] no {self.what} finished for {idle:.0f}s "
                                 f"(watchdog timeout {self.timeout_s:.0f}s): stacks follow\n")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                abort(f"watchdog: {self.what} stalled for more than {self.timeout_s:.0f}s -- a peer "
                      f"rank died or stalled; aborting")

    def __enter__(self) -> "Watchdog":
        self.pet()
        self._thread = threading.Thread(target=self._watch, name="aquila-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
