"""parallel.cli: the error boundary, its argument types and output checks, in this process."""

from __future__ import annotations

import argparse
import datetime

import pytest

from parallel import cli
from parallel.mesh import mesh_spec


class Mistake(cli.UserError, ValueError):
    pass


@pytest.mark.parametrize("exc, user", [
    (Mistake("bad field"), True),
    (FileNotFoundError(2, "No such file or directory", "/x/y.bin"), True),
    (PermissionError(13, "Permission denied", "/root/z"), True),
    (FileNotFoundError("no model at /x"), True),           # the project's own, without errno
    (OSError(28, "No space left on device"), True),
    (ValueError("bad"), False), (KeyError("k"), False), (TypeError("t"), False),
    (RuntimeError("r"), False), (ConnectionResetError(104, "reset by peer"), False),
])
def test_user_errors_are_told_from_bugs(exc, user):
    assert cli.is_user_error(exc) is user


def test_the_boundary_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        with cli.user_errors("prog"):
            raise Mistake("config field dim='x'\nmust be a positive integer")
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prog: error: config field dim='x' must be a positive integer\n"
    with pytest.raises(SystemExit):
        with cli.user_errors("prog"):
            open("/nonexistent/corpus.txt")
    assert capsys.readouterr().err == "prog: error: /nonexistent/corpus.txt: No such file or directory\n"


def test_a_bug_passes_through_the_boundary(capsys):
    with pytest.raises(KeyError):
        with cli.user_errors("prog"):
            {}["missing"]
    assert capsys.readouterr().err == ""


def test_argparse_errors_are_one_line(capsys):
    p = cli.ArgumentParser(prog="prog")
    p.add_argument("--steps", type=cli.positive_int, required=True)
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--steps", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "prog: error: argument --steps: 0 must be at least 1 (see prog --help)\n"


@pytest.mark.parametrize("kind, text, ok", [
    (cli.positive_int, "3", 3), (cli.positive_int, "0", None), (cli.positive_int, "1.5", None),
    (cli.positive_int, str(2 ** 63), None), (cli.nonnegative_int, "0", 0), (cli.nonnegative_int, "-1", None),
    (cli.positive_float, "1e-3", 1e-3), (cli.positive_float, "0", None), (cli.positive_float, "inf", None),
    (cli.nonnegative_float, "nan", None), (cli.probability, "1", 1.0), (cli.probability, "0", None),
    (cli.probability, "1.01", None), (cli.fraction, "0", 0.0), (cli.fraction, "1", None),
    (mesh_spec, "dp=2,tp=-1", "dp=2,tp=-1"), (mesh_spec, "dp=0", None), (mesh_spec, "x=2", None),
])
def test_argument_types(kind, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    else:
        assert kind(text) == ok


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("keep")
    cli.check_output_dir(tmp_path / "new" / "deeper", "--out")  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists()
    with pytest.raises(cli.UserError, match="--out .*file is an existing file"):
        cli.check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(cli.UserError, match="file is a file, not a directory"):
        cli.check_output_dir(tmp_path / "file" / "run", "--out")
    with pytest.raises(cli.UserError, match="is a directory"):
        cli.check_output_file(tmp_path, "--out")
    with pytest.raises(cli.UserError, match="cannot create anything in /proc"):
        cli.check_output_dir("/proc/aquila-test", "--out")
    assert (tmp_path / "file").read_text() == "keep"


def test_under_torchrun_a_message_is_printed_by_the_first_rank_only(monkeypatch, capsys):
    """Two 'ranks' (two calls here) report through torchrun's store: one line is printed."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)
    for _ in range(2):
        with pytest.raises(SystemExit):
            cli.fail("prog", "the same mistake on every rank")
    with pytest.raises(SystemExit):
        cli.fail("prog", "another mistake")
    assert capsys.readouterr().err == "prog: error: the same mistake on every rank\nprog: error: another mistake\n"
