"""Worker for the crash-consistency test: pretrain runs forked from one warm process.

    python tests/crash_runs.py        # then JSON commands on stdin, one JSON reply per line

Importing torch costs seconds; forking costs milliseconds. This process imports the training code
once and forks a child per run, so a campaign of dozens of killed-and-resumed runs stays cheap.
Commands:

    {"op": "run", "argv": [...], "log": path, "failpoint": null | {"at": ..., "n": N}}  -> {"pid": P}
    {"op": "wait", "pid": P}                                  -> {"code": exit code, or -signal}

A failpoint makes the child SIGKILL itself at its N-th pass through a point of the checkpoint
writer or the metrics log (the failpoints are installed by patching the child's modules here, so
the library carries no test hooks):

    record        after writing a leaf record (flushed: a partial rank file is on disk)
    commit        before the finished temporary directory is renamed into place
    committed     right after that rename, before the directory fsync and pruning
    prune         inside the removal of an old checkpoint (after one file is gone)
    metrics       after the rewritten metrics log is written, before it replaces the old one
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(n: int):
    """A function that kills the process on its n-th call."""
    calls = [0]

    def count() -> None:
        calls[0] += 1
        if calls[0] == n:
            _die()

    return count


def install_failpoint(at: str, n: int) -> None:
    import shutil

    from aquila_fn.jobs.pretrain import metrics as pretrain_metrics
    from aquila_fn.training.checkpoint import directory, rank_file

    count = _counter(n)
    if at == "record":
        write_record = rank_file._write_record

        def _write_record(f, *args, **kwargs):
            write_record(f, *args, **kwargs)
            f.flush()  # what was written so far reaches the file
            count()

        rank_file._write_record = _write_record
    elif at == "commit":
        commit = directory._commit

        def _commit(*args):
            count()
            commit(*args)

        directory._commit = _commit
    elif at == "committed":
        def replace(src, dst):
            os.replace(src, dst)
            if os.path.basename(src).startswith(".tmp-step_"):
                count()

        directory.os = _Namespace(os, replace=replace)
    elif at == "prune":
        def rmtree(path, *args, **kwargs):
            if os.path.basename(path).startswith(".del-"):
                files = sorted(os.listdir(path))
                if files:
                    os.remove(os.path.join(path, files[0]))
                count()
            shutil.rmtree(path, *args, **kwargs)

        directory.shutil = _Namespace(shutil, rmtree=rmtree)
    elif at == "metrics":
        def replace(src, dst):
            if os.fspath(src).endswith("metrics.jsonl.tmp"):
                count()
            os.replace(src, dst)

        pretrain_metrics.os = _Namespace(os, replace=replace)
    else:
        raise ValueError(f"unknown failpoint {at!r}")


class _Namespace:
    """A module stand-in: every attribute of `base`, some replaced."""

    def __init__(self, base, **replaced):
        self._base, self._replaced = base, replaced

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._base, name)


def child(cmd: dict) -> None:
    """Run one pretraining in this (forked) process; never returns."""
    fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 1
    try:
        if cmd.get("failpoint"):
            install_failpoint(cmd["failpoint"]["at"], cmd["failpoint"]["n"])
        from aquila_fn.jobs.pretrain import main
        code = main(cmd["argv"]) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the run's log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported once here, not in every child

    import aquila_fn.jobs.pretrain  # noqa: F401 - the warm import the children share

    reply = sys.stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "run":
            pid = os.fork()
            if pid == 0:
                child(cmd)
            out = {"pid": pid}
        elif cmd["op"] == "wait":
            _, status = os.waitpid(cmd["pid"], 0)
            out = {"code": os.waitstatus_to_exitcode(status)}
        else:
            out = {"error": f"unknown op {cmd['op']!r}"}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
