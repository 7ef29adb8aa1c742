"""Worker: save under one mesh, resume under another (run with torchrun, or as one process).

    dist_checkpoint.py train  MESH OUT STEPS            fresh state, STEPS steps, save to OUT
    dist_checkpoint.py resume MESH IN OUT STEPS         load IN (any mesh), reshard, STEPS more, save OUT

Prints `RESULT {...}` from rank 0: the per-step losses and sha256 digests of the full parameters
and optimizer state right after loading and at the end.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

import parallel
from aquila_fn.training import checkpoint, sharding, train
from dist_layouts import CONFIG, SEED, batches, make_optimizer


def digest(tree) -> str:
    h = hashlib.sha256()
    for path, x in parallel.tree.named_leaves(parallel.gather(tree)):
        if isinstance(x, torch.Tensor):
            h.update(path.encode())
            h.update(x.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def setup(spec):
    mesh = parallel.make_mesh(spec if spec != "single" else None)
    layout = sharding.make_layout(mesh)
    opt = parallel.distributed_optimizer(make_optimizer(), layout, max_grad_norm=1.0)
    state = train.init_train_state(sharding.init_params(CONFIG, SEED, layout), opt, precision="fp32")
    step = sharding.make_train_step(CONFIG, opt, layout, precision="fp32")
    return mesh, layout, state, step


def run_steps(step, state, layout, start, n):
    losses = []
    for batch in batches(start=start, steps=n):
        state, metrics = step(state, sharding.local_batch(batch, layout))
        losses.append(metrics["loss"])
    return state, losses


def main(mode, spec, *rest):
    mesh, layout, state, step = setup(spec)
    out = {}
    if mode == "train":
        directory, n = rest[0], int(rest[1])
        start = 0
    else:
        src, directory, n = rest[0], rest[1], int(rest[2])
        loaded, meta = checkpoint.load_checkpoint(src)
        state = parallel.shard_like(loaded, state)  # reshard into this mesh
        start = int(meta["data_position"])
        out["loaded"] = {"params": digest(state["params"]), "opt_state": digest(state["opt_state"])}
        out["file"] = {"params": digest(loaded["params"]), "opt_state": digest(loaded["opt_state"])}
    state, out["losses"] = run_steps(step, state, layout, start, n)
    checkpoint.save_checkpoint(directory, state, step=int(state["step"]),
                               metadata={"data_position": start + n, "mesh": str(mesh)})
    out["final"] = {"params": digest(state["params"]), "opt_state": digest(state["opt_state"])}
    if mesh.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
    parallel.shutdown_distributed()
