"""Reading the user's text and JSON files, with errors that name the file and say what is wrong.

Each caller passes its own error class (ConfigError, DataError, TokenizerError, ...), so a bad
byte or a JSON typo surfaces as that module's error instead of a UnicodeDecodeError or a
KeyError far from the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from parallel.cli import UserError


@contextlib.contextmanager
def utf8_errors(path: str | os.PathLike, error: type[Exception] = UserError) -> Iterator[None]:
    """Turn a UnicodeDecodeError while reading `path` into `error` naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.end]
        raise error(f"{os.fspath(path)}: not UTF-8 text (byte(s) {bad!r}: {e.reason}); "
                    f"save the file as UTF-8") from None


def read_text(path: str | os.PathLike, error: type[Exception] = UserError) -> str:
    with utf8_errors(path, error), open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path: str | os.PathLike, error: type[Exception] = UserError, *,
              expect: type | None = dict) -> Any:
    """The JSON value in `path`; with `expect`, it must be of that type (an object by default)."""
    try:
        value = json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{os.fspath(path)} is not valid JSON ({e.msg} at line {e.lineno}, "
                    f"column {e.colno})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{os.fspath(path)} holds a JSON {_json_name(type(value))}, expected "
                    f"a JSON {_json_name(expect)}")
    return value


def _json_name(kind: type) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number",
             bool: "boolean", type(None): "null"}
    return names.get(kind, kind.__name__)
