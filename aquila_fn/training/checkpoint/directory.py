"""A run's directory of checkpoints: atomic saves, keeping the newest K, finding the latest, and
loading (a whole checkpoint, its metadata only, or the newest one that loads).

    <directory>/step_00000100/rank00000.msgpack     one file per rank (a single process writes one)
    <directory>/.tmp-step_00000100/                  only while writing; renamed into place when done

A kill at any moment leaves the previous checkpoint as the latest: files are fsynced before the
temporary directory is renamed, and pruning renames a directory away before deleting it.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .encoding import CheckpointError, _clean_metadata, _decode_structure, _structure_paths
from .rank_file import _read_header, _unpacker, read_state_file, write_state_file
from .shards import _assemble

_STEP_DIR = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"^rank(\d{5})\.msgpack$")


def rank_file_name(rank: int) -> str:
    return f"rank{rank:05d}.msgpack"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------
# Loading


def _rank_files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.iterdir() if _RANK_FILE.match(p.name))


def _resolve(path: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(checkpoint dir, rank files) for a step dir, a rank file, or a run dir (its latest)."""
    p = Path(path)
    if p.is_file():
        return p.parent, [p]
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint not found")
    files = _rank_files(p)
    if not files:
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"{p}: no rank*.msgpack files and no step_* checkpoints inside")
        p = Path(latest)
        files = _rank_files(p)
    return p, files


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (plus "step"), reading only the header of one file."""
    _, files = _resolve(path)
    with open(files[0], "rb") as f:
        header = _read_header(_unpacker(f), files[0])
    return {**header["metadata"], "step": header["step"]}



def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> tuple[Any, dict]:
    """Load ``(state, metadata)``; metadata holds the saved metadata plus "step".

    ``path`` is a checkpoint dir (all its rank files are merged by offsets), a single rank file
    (must then hold whole tensors), or a run directory (its latest checkpoint). Every leaf's
    checksum is verified; any problem raises CheckpointError naming the file.
    """
    ckpt_dir, files = _resolve(path)
    headers, by_path = [], {}
    for file in files:
        header, records = read_state_file(file)
        headers.append(header)
        for meta, value in records:
            by_path.setdefault(meta["path"], []).append((meta, value))
    world = headers[0]["world_size"]
    if len(files) > 1 and len(files) != world:
        raise CheckpointError(f"{ckpt_dir}: {len(files)} rank files, but the checkpoint was "
                              f"written by {world} ranks")
    structure = headers[0]["structure"]
    leaves = {}
    for name in _structure_paths(structure):
        hint = " (load the whole directory, not one rank file)" if len(files) < world else ""
        if name not in by_path:
            raise CheckpointError(f"{ckpt_dir}: no record for leaf {name!r}{hint}")
        value = _assemble(name, by_path[name], ckpt_dir, hint)
        if map_location is not None and isinstance(value, torch.Tensor):
            value = value.to(map_location)
        leaves[name] = value
    state = _decode_structure(structure, leaves)
    return state, {**headers[0]["metadata"], "step": headers[0]["step"]}


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Read every file of a checkpoint and check all checksums; raise CheckpointError if bad."""
    load_checkpoint(path, map_location=None)


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints in a run directory as (step, path), oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / rank_file_name(0)).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> str | None:
    """Path of the newest committed checkpoint in ``directory`` (temp dirs are never listed)."""
    found = list_checkpoints(directory)
    return os.fspath(found[-1][1]) if found else None


def load_latest(directory: str | os.PathLike, *, map_location: str | torch.device | None = "cpu"
                ) -> tuple[str, Any, dict] | None:
    """``(path, state, metadata)`` of the newest checkpoint that loads, or None if there is none.

    A damaged newest checkpoint is skipped with a warning naming it and the problem, and the
    previous one is tried. Raises CheckpointError only if checkpoints exist and none loads.
    """
    found = list_checkpoints(directory)
    errors = []
    for _, path in reversed(found):
        try:
            state, meta = load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:  # said once, and only when an older checkpoint is taken instead
            warnings.warn(f"skipped damaged checkpoint(s), loading {path}: {'; '.join(errors)}", stacklevel=2)
        return os.fspath(path), state, meta
    if errors:
        raise CheckpointError(f"{directory}: no loadable checkpoint; " + "; ".join(errors))
    return None


# ----------------------------------------------------------------------------------------------
# Saving


def _prune(directory: Path, keep: int | None) -> None:
    if keep is not None:
        for _, p in list_checkpoints(directory)[:-keep]:
            # rename first (atomic), so a kill mid-delete never leaves a half step_ dir listed
            doomed = p.with_name(f".del-{p.name}")
            if doomed.exists():
                shutil.rmtree(doomed, ignore_errors=True)
            os.replace(p, doomed)
    for p in directory.iterdir():  # leftovers of interrupted saves and the renamed dirs
        if p.is_dir() and p.name.startswith((".tmp-", ".old-", ".del-")):
            shutil.rmtree(p, ignore_errors=True)


def _dist_defaults(rank: int | None, world_size: int | None, barrier: Callable[[], None] | None):
    dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if dist_on else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_on else 1
    if barrier is None:
        barrier = torch.distributed.barrier if (dist_on and world_size > 1) else (lambda: None)
    return rank, world_size, barrier


def save_checkpoint(directory: str | os.PathLike, state: Any, *, step: int, metadata: dict | None = None,
                    keep: int | None = None, rank: int | None = None, world_size: int | None = None,
                    barrier: Callable[[], None] | None = None) -> str:
    """Write ``state`` as ``<directory>/step_<step:08d>`` atomically; return its path.

    Every rank writes ``rank{r:05d}.msgpack`` into ``.tmp-step_<step>`` beside the target; after
    all files are fsynced, rank 0 renames the temp dir into place and fsyncs ``directory``, so a
    kill at any moment leaves the previous checkpoint as the latest. ``keep`` keeps the newest K
    checkpoints. ``rank``/``world_size``/``barrier`` default to torch.distributed's when it is
    initialised (else 0 / 1 / no-op).
    """
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be >= 1 or None, got {keep}")
    _clean_metadata(dict(metadata or {}))  # fail before touching the directory
    rank, world_size, barrier = _dist_defaults(rank, world_size, barrier)
    directory = Path(directory)
    final = directory / step_dir_name(step)
    tmp = directory / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        write_state_file(tmp / rank_file_name(rank), state, step=step, metadata=metadata,
                         rank=rank, world_size=world_size)
    except OSError as e:
        raise CheckpointError(f"{tmp / rank_file_name(rank)}: cannot write checkpoint: {e}") from e
    barrier()
    if rank == 0:
        _commit(tmp, final)
        _prune(directory, keep)
    barrier()
    return os.fspath(final)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place (moving an existing same-step dir aside first)."""
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
