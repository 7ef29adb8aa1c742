"""The data package's error and its check for an input file, shared by every reader and writer."""

from __future__ import annotations

import os
from pathlib import Path

from parallel.cli import UserError


class DataError(UserError, ValueError):
    """A data file is missing, malformed or does not fit the request; the message names the file."""


def input_file(path: str | os.PathLike, error: type[Exception] = DataError) -> Path:
    """``path`` as a Path if it is a file, else ``error`` naming it."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: input file not found")
    return p
