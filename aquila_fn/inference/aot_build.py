"""Building compiled decode packages (aquila_fn.inference.aot_package) safely while other
processes may want the same one: a lock file naming the builder's pid, a foreground build
that waits for a build in progress, and the detached low-priority background build that
`--compile auto` starts when a run is too short to repay compiling in the foreground:
`python -m aquila_fn.inference.aot_build SPEC.json`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from aquila_fn.core import pytree
from aquila_fn.inference.aot_package import StepSpec, build_package, write_atomic

BACKGROUND_ENV = "AQUILA_FN_COMPILE_BACKGROUND"  # "0": never start background builds
LOCK_MAX_AGE_S = 3 * 3600


# ----------------------------------------------------------------------------- locks


def _lock_path(package: Path) -> Path:
    return package.with_suffix(".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def build_in_progress(package: Path) -> int | None:
    """The pid building this package, if a live one holds its lock. A lock whose process is gone,
    or older than LOCK_MAX_AGE_S (its pid may have been reused), is stale and removed."""
    lock = _lock_path(package)
    try:
        pid = int(lock.read_text().strip() or 0)
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return None
    if pid and _alive(pid) and age < LOCK_MAX_AGE_S:
        return pid
    lock.unlink(missing_ok=True)
    return None


def _take_lock(package: Path, pid: int) -> bool:
    package.parent.mkdir(parents=True, exist_ok=True)
    build_in_progress(package)  # clears a stale lock
    try:
        fd = os.open(_lock_path(package), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(pid))
    return True


def _release_lock(package: Path) -> None:
    _lock_path(package).unlink(missing_ok=True)


def wait_for_build(package: Path, poll_s: float = 0.5) -> None:
    while build_in_progress(package) is not None:
        time.sleep(poll_s)


def build_locked(params, spec: StepSpec, directory: Path) -> float | None:
    """Build under the lock; None when another process built it meanwhile (waited for)."""
    package = spec.package_path(directory)
    while not package.exists():
        if _take_lock(package, os.getpid()):
            try:
                return build_package(params, spec, directory)
            finally:
                _release_lock(package)
        wait_for_build(package)
    return None


# ----------------------------------------------------------------------------- background builds


def background_builds_enabled() -> bool:
    return os.environ.get(BACKGROUND_ENV, "1") != "0"


def start_background_build(spec: StepSpec, directory: Path) -> int | None:
    """Build the package in a detached, low-priority process that outlives this one; its pid,
    or None when a build already holds the lock. Its output goes to <package>.log."""
    package = spec.package_path(directory)
    if not _take_lock(package, os.getpid()):
        return None
    try:
        spec_file = package.with_suffix(".spec.json")
        write_atomic(spec_file, json.dumps({"spec": spec.to_json(), "directory": str(directory),
                                             "package": str(package)}))
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        with open(package.with_suffix(".log"), "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "aquila_fn.inference.aot_build", str(spec_file)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        write_atomic(_lock_path(package), str(proc.pid))
        return proc.pid
    except BaseException:
        _release_lock(package)
        raise


def _placeholder_params(spec: StepSpec):
    """Uninitialised tensors of the parameters' shapes: a build reads no weight values."""
    device = torch.device(spec.device)
    return pytree.unflatten_dict({path: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                                  for path, shape, dtype in spec.leaves})


def main(argv: list[str] | None = None) -> int:
    """The background build: `python -m aquila_fn.inference.aot_build SPEC.json`."""
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    spec, directory, package = StepSpec.from_json(job["spec"]), Path(job["directory"]), Path(job["package"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still release the lock
    try:
        os.nice(10)  # yield the CPU to whoever is decoding meanwhile
    except OSError:
        pass
    try:
        if spec.package_path(directory) != package:
            print(f"error: {package} does not match this process's build of its spec", file=sys.stderr)
            return 1
        seconds = build_package(_placeholder_params(spec), spec, directory)
        print(f"built {package} in {seconds:.1f} s", flush=True)
        return 0
    finally:
        _release_lock(package)
        Path(argv[0]).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
