"""Checkpoints: a streamed msgpack file per rank, written atomically, a checksum per leaf, no pickle.

    path = save_checkpoint("runs/x", {"params": params, "opt_state": opt_state, "rng": gen.get_state()},
                           step=100, metadata={"config": config.to_dict(), "data_position": pos},
                           keep=3)
    state, meta = load_checkpoint(path)           # meta["step"] == 100, meta["data_position"] == pos
    found = load_latest("runs/x")                 # (path, state, meta) of the newest good one, or None

Layout::

    <directory>/step_00000100/rank00000.msgpack     one file per rank (a single process writes one)
    <directory>/.tmp-step_00000100/                  only while writing; renamed into place when done

Each ``rank{r:05d}.msgpack`` is a stream of msgpack objects:

1. ``{"format": "aquila-fn-checkpoint", "version": 1, "header": <bin>, "crc32": int}``; the bin is
   a msgpack map {"step", "rank", "world_size", "metadata" (JSON-able plus bytes), "structure"
   (the state's tree of dicts/lists/tuples with leaves named by path), "records": N, "created",
   "torch"}; ``read_metadata`` reads only this object.
2. N leaf records, each ``{"meta": <bin>, "crc32": int}`` followed by ``chunks`` bin objects holding
   the leaf's raw bytes (at most 64 MiB each, so reading never buffers a whole large leaf twice).
   meta = {"path": "params.layers.0.attn.wq", "kind": "torch"|"numpy", "dtype": "bfloat16",
   "shape": local shape, "global_shape": full shape, "offsets": where the local block starts in
   the full tensor, "nbytes", "crc32": zlib.crc32 of the raw bytes, "chunks"}. Bytes are the
   little-endian C-order element bytes (bf16 and other dtypes are byte views, no conversion).
3. ``{"end": true, "records": N}``; a file without it is truncated.

Sharded runs write each rank's local blocks (``LocalShard`` leaves, or DTensors) with their global
offsets; ``load_checkpoint`` on the directory reassembles every full tensor from all rank files.
Plain tensors are taken as replicated and written by rank 0 only; DTensor replicas are written
by the rank at coordinate 0 of each replicated mesh dim. A single process writes offsets of zero
and global_shape == shape.

Modules: ``encoding`` (the format's vocabulary: state tree, metadata and leaf bytes),
``validation`` (hostile-input checks), ``shards`` (per-rank blocks and their reassembly),
``rank_file`` (one rank file, written and read), ``directory`` (a run's checkpoints: atomic save,
keep, latest, load). Import the public names from here.
"""

from .directory import (latest_checkpoint, list_checkpoints, load_checkpoint, load_latest, rank_file_name,
                        read_metadata, save_checkpoint, step_dir_name, verify_checkpoint)
from .encoding import FORMAT, VERSION, CheckpointError, LocalShard
from .rank_file import CHUNK_BYTES, read_state_file, write_state_file

__all__ = [
    "CheckpointError", "LocalShard", "save_checkpoint", "load_checkpoint", "load_latest",
    "latest_checkpoint", "list_checkpoints", "read_metadata", "verify_checkpoint",
    "write_state_file", "read_state_file", "rank_file_name", "step_dir_name", "FORMAT", "VERSION", "CHUNK_BYTES",
]
