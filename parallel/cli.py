"""The error boundary every command line shares: a user's mistake is one line, a bug a traceback.

    parser = cli.ArgumentParser(description=...)     # bad arguments: one line, exit 2
    parser.add_argument("--steps", type=cli.positive_int)
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        run(args)

Inside `user_errors`, a `UserError` (the base of the project's error classes: config, data,
checkpoint, tokenizer, mesh, ...) or an `OSError` about a file (missing, unreadable, a directory
where a file was expected, ...) prints ``prog: error: <message>`` on stderr and exits with
status 2, as argparse does for bad arguments. Any other exception is a bug in the program and
keeps its traceback: the boundary never catches ValueError, KeyError or TypeError, so loaders
turn bad files into project errors where they read them.

Under torchrun every rank runs the same command line and usually meets the same mistake: a
message is printed by the first rank that reports it (the ranks agree through torchrun's store),
and every rank that reports exits with 2 at once, without a teardown that could wait on a peer.
Ranks that do not meet the error are ended by torchrun, or by `faults.guard` when their next
collective fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import math
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator, NoReturn

EXIT_CODE = 2  # argparse's status for a usage error

# OSErrors that say something about a path the user gave, never about the program.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError)
_FILE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


class UserError(Exception):
    """Something the user gave (an argument, a file) is wrong; the message names it and says
    what to do. The project's error classes derive from it (and from the builtin they refine)."""


def is_user_error(exc: BaseException) -> bool:
    """A mistake in the input rather than in the program."""
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, OSError) and (isinstance(exc, _FILE_ERRORS) or exc.errno in _FILE_ERRNOS
                                         or exc.filename is not None)


def describe(exc: BaseException) -> str:
    """One line: the message, or for an OSError `path: reason`."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{names}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line, whatever the message held


@contextlib.contextmanager
def user_errors(prog: str | None = None) -> Iterator[None]:
    """Report a user error as `prog: error: <message>` and exit 2; let anything else through.
    `prog` defaults to argparse's (the script's file name)."""
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - only user errors are handled, the rest re-raised
        if not is_user_error(e):
            raise
        fail(prog or os.path.basename(sys.argv[0]), describe(e))


def fail(prog: str, message: str) -> NoReturn:
    """Print `prog: error: message` (once per distributed run) and exit with status 2."""
    line = f"{prog}: error: {message}\n"
    sys.stdout.flush()  # what the job printed before comes first (os._exit below skips flushing)
    if _first_to_report(line):
        sys.stderr.write(line)
        sys.stderr.flush()
    else:
        time.sleep(1.0)  # torchrun ends the others when this rank exits: let the first one print
    if _in_process_group():
        os._exit(EXIT_CODE)  # a normal exit could block in teardown, waiting on a peer
    raise SystemExit(EXIT_CODE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage stays behind --help) that go through `fail`."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")


# ----------------------------------------------------------------------------- torchrun


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _in_process_group() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _first_to_report(line: str) -> bool:
    """True unless another rank of this torchrun job already printed the same line."""
    if _world_size() <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return True
    try:
        from torch.distributed import TCPStore
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=5))
        key = (f"aquila_fn/user_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
               f"{zlib.crc32(line.encode())}")
        return store.add(key, 1) == 1
    except Exception:  # noqa: BLE001 - no store (not torchrun's): better twice than never
        return True


# ----------------------------------------------------------------------------- output paths


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Fail before any work when `path` cannot be (or become) a directory this process writes to."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is an existing file, not a directory; give a directory path "
                        f"(it is created if missing)")
    _check_creatable(p, flag)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Fail before any work when `path` cannot be written as a file."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p} is a directory; give a file path")
    _check_creatable(p.parent, flag)


def _check_creatable(p: Path, flag: str) -> None:
    """The nearest existing ancestor of `p` must be a directory we can create entries in (probed
    with a temporary directory: permission bits say nothing for root or read-only mounts)."""
    ancestor = p.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {p}: {ancestor} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".aquila-probe-", dir=ancestor))
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot create anything in {ancestor} ({e.strerror}); "
                        f"choose a writable location") from None


# ----------------------------------------------------------------------------- argument types


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if kind is int and abs(value) >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text} is too large (at most {2 ** 63 - 1})")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def probability(text: str) -> float:
    """A probability mass in (0, 1] (top-p)."""
    value = _number(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (Adam's betas)."""
    value = _number(text, float, "a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1)")
    return value
