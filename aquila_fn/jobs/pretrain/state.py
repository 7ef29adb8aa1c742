"""The train state of a run: fresh, resumed from the newest checkpoint (resharded onto this
run's mesh), and saved with what a bit-identical resume needs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from aquila_fn.core import pytree
from aquila_fn.training import checkpoint, parallel_setup, train

from .arguments import PretrainError
from .run_setup import Run


def fresh_state(run: Run) -> tuple[dict, int]:
    params = run.par.init_params(run.config, run.args.seed)  # sharded init == init, then shard
    state = train.init_train_state(params, run.optimizer, precision=run.precision)
    state["rng"] = torch.Generator().manual_seed(run.args.seed).get_state()
    return state, 0


def restore_into(template: Any, loaded: Any) -> Any:
    """Loaded leaves placed into the template's structure by path; shapes and dtypes must match."""
    got = pytree.flatten_dict(loaded)
    leaves = []
    for path, want in pytree.named_leaves(template):
        if path not in got:
            raise PretrainError(f"checkpoint lacks {path!r} (was it written with another config?)")
        have = got[path]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise PretrainError(f"checkpoint leaf {path!r} is {tuple(have.shape)} {have.dtype}, the run "
                                f"expects {tuple(want.shape)} {want.dtype}")
        leaves.append(parallel_setup.place_like(have, want))  # reshards onto this run's mesh
    return pytree.unflatten(pytree.structure(template), leaves)


def resume_state(run: Run) -> tuple[dict, int]:
    """(state, data position) from the newest loadable checkpoint in --out."""
    found = checkpoint.load_latest(checkpoint_dir(run))
    if found is None:
        raise PretrainError(f"--resume: no checkpoint in {checkpoint_dir(run)}")
    path, loaded, meta = found
    if meta.get("config") != run.config.to_dict():
        raise PretrainError(f"--resume: {path} was written with config {meta.get('config')}, "
                            f"this run has {run.config.to_dict()}")
    template, _ = fresh_state(run)
    return restore_into(template, loaded), int(meta["data_position"])


def _json_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, dict))


def checkpoint_dir(run: Run) -> Path:
    return run.out / "checkpoints"


def save(run: Run, state: dict, position: int) -> str:
    meta = {"config": run.config.to_dict(), "data_position": position, "precision": run.precision,
            "tokenizer": os.path.abspath(run.args.tokenizer) if run.args.tokenizer else None,
            "args": {k: v for k, v in vars(run.args).items() if _json_scalar(v)}, "device": str(run.device)}
    return checkpoint.save_checkpoint(checkpoint_dir(run), run.par.checkpoint_view(state), step=int(state["step"]), metadata=meta,
                                      keep=run.args.keep)
