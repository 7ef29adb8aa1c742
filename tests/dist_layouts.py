"""Worker (run under torchrun): train a tiny model a few steps under several layouts and print,
as one JSON line per layout, the per-step losses and the largest parameter difference against
the same steps run in one process (each rank computes that reference itself).

    torchrun --standalone --nproc-per-node 2 tests/dist_layouts.py "dp=2" "tp=2;sp" "dp=2;zero=2"

A layout is "<mesh>[;zero=N][;sp][;offload][;micro=M][;recompute=POLICY][;compile=BACKEND]"
(compile: each layer compiled with that torch.compile backend, regional compilation).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import parallel
from aquila_fn import optim, sharding, train
from aquila_fn.config import get_config
from aquila_fn.transforms import value_and_grad

CONFIG = get_config("tiny").replace(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    vocab_size=64, max_seq_len=64, tie_embeddings=False)
SEED, STEPS, BATCH, SEQ = 0, 3, 4, 16


def batches(config=CONFIG, start=0, steps=None):
    """The global batches of steps start, start+1, ... (the same on every rank)."""
    g = torch.Generator().manual_seed(1234)
    for i in range(start + (STEPS if steps is None else steps)):
        x = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=g)
        labels = x[:, 1:].clone()
        labels[0, :5] = -100  # uneven token counts across data ranks
        if i >= start:
            yield {"input_ids": x[:, :-1].contiguous(), "labels": labels}


def make_optimizer():
    return optim.adamw(optim.warmup_cosine(1e-2, 1, 100), weight_decay=0.1, max_grad_norm=1.0)


def run_pipeline(mesh, *, zero=0, sp=False, micro=1, virtual=1, schedule="1f1b", config=CONFIG):
    params, pipe, layout, context = sharding.make_pipeline(
        config, SEED, mesh, zero=zero, sequence_parallel=sp, virtual_stages=virtual, schedule=schedule,
        micro_batches=micro)
    opt = parallel.distributed_optimizer(make_optimizer(), layout, max_grad_norm=1.0, norm_group=mesh.group("pp"))
    state = train.init_train_state(params, opt, precision="fp32")
    step = sharding.make_pipeline_train_step(config, opt, mesh, pipe, layout, context)
    losses = []
    for batch in batches(config):
        state, metrics = step(state, sharding.local_batch(batch, layout))
        losses.append(metrics["loss"])
    return losses, state


def run(layout, *, micro=1, offload=False, recompute="none", compile=False, config=CONFIG):
    params = sharding.init_params(config, SEED, layout)
    opt = make_optimizer()
    if not layout.trivial or offload:
        opt = parallel.distributed_optimizer(opt, layout, max_grad_norm=1.0, offload=offload)
    state = train.init_train_state(params, opt, precision="fp32")
    step = sharding.make_train_step(config, opt, layout, micro_batches=micro, precision="fp32", recompute=recompute,
                                    compile=compile)
    losses = []
    for batch in batches(config):
        state, metrics = step(state, sharding.local_batch(batch, layout))
        losses.append(metrics["loss"])
    return losses, parallel.gather(state["params"]), state


def first_grads(layout, recompute="none", compile=False, config=CONFIG):
    """Reduced gradients of the first batch's mean loss (full tensors), for a direct check."""
    params = sharding.init_params(config, SEED, layout)
    batch = next(batches(config))
    n = float(train.count_tokens(batch))
    reducer = parallel.GradReducer(layout, bucket_bytes=4096)  # small buckets: several per backward
    launched = []
    launch = reducer._launch
    reducer._launch = lambda bucket: (launched.append(bucket), launch(bucket))
    loss_sum = sharding.make_loss_sum_fn(layout, reducer=reducer, compile_layers=compile)
    vg = value_and_grad(lambda p, b: loss_sum(p, b, config, recompute=recompute)[0] / n)
    with layout.activate():
        _, grads = vg(params, sharding.local_batch(batch, layout))
        during_backward = len(launched)  # buckets whose reduction started before backward ended
        grads = reducer.finish(grads)
    return parallel.gather(grads), during_backward


def bf16_grads_same_without_resharding(layout, recompute, compile=False, config=CONFIG) -> bool:
    """bf16 gradients with ZeRO-3's reshard after forward (weights re-gathered and re-cast in
    backward) equal, bit for bit, those of a graph that keeps the gathered weights."""
    params = sharding.init_params(config, SEED, layout)
    batch = sharding.local_batch(next(batches(config)), layout)

    def grads():
        loss_sum = sharding.make_loss_sum_fn(layout, compile_layers=compile)
        vg = value_and_grad(lambda p, b: loss_sum(p, b, config, recompute=recompute,
                                                  compute_dtype=torch.bfloat16)[0])
        with layout.activate():
            return parallel.tree.leaves(parallel.gather(vg(params, batch)[1]))

    resharded = grads()
    keep = sharding.ReshardAfterForward
    sharding.ReshardAfterForward = contextlib.nullcontext  # the graph keeps what it saves
    try:
        kept = grads()
    finally:
        sharding.ReshardAfterForward = keep
    return all(torch.equal(a, b) for a, b in zip(resharded, kept))


class _CastsOf(TorchDispatchMode):
    """Adds to `alive` the storage of every dtype cast made of a storage already in it (the
    compute-dtype copies of gathered weights, wherever they are made)."""

    def __init__(self, alive: list):
        super().__init__()
        self.alive = alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            source = StorageWeakRef(_local(args[0]).untyped_storage()).cdata
            if any(ref.cdata == source for ref, _ in self.alive):
                local = _local(out)
                self.alive.append((StorageWeakRef(local.untyped_storage()), local.nbytes))
        return out


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def gathered_layer_bytes_after_forward(layout, recompute, config=CONFIG, compute_dtype=None,
                                       compile=False) -> tuple[int, int]:
    """Bytes of all-gathered layer weights (ZeRO-3), and of their compute-dtype casts, still
    alive when the forward has returned: what the graph keeps for backward (under
    parallel.zero.ReshardAfterForward, only the shards), and how many of the gathers were
    asynchronous (gloo must have none: overlapping_gathers_safe)."""
    params = parallel.tree.map_with_path(lambda p, x: x.detach().requires_grad_(True),
                                         sharding.init_params(config, SEED, layout))
    alive, asynchronous = [], []
    gather = parallel.zero._gather_leaf

    def recording(layout_, path, x, async_op):
        asynchronous.append(async_op)
        out = gather(layout_, path, x, async_op)
        if out is not x and path.startswith("layers."):
            local = out._local_tensor  # its storage: views and re-wrappings share it
            alive.append((StorageWeakRef(local.untyped_storage()), local.nbytes))
        return out

    parallel.zero._gather_leaf = recording
    try:
        with layout.activate(), _CastsOf(alive):
            loss, _ = sharding.make_loss_sum_fn(layout, compile_layers=compile)(
                params, next(batches(config)), config, recompute=recompute, compute_dtype=compute_dtype)
        gc.collect()
        return sum(n for ref, n in alive if not ref.expired()), sum(asynchronous)
    finally:
        parallel.zero._gather_leaf = gather


def describe(state) -> dict:
    """Placements of one matrix's parameter, optimizer moment, to show what is sharded."""
    wq = state["params"]["layers"][0]["attn"]["wq"]
    mu = state["opt_state"][1]["mu"]["layers"][0]["attn"]["wq"]
    show = lambda x: str(tuple(x.placements)) if hasattr(x, "placements") else "full"
    return {"param": show(wq), "moment": show(mu)}


def describe_pp(state) -> dict:
    """Which layers this rank (rank 0: the first stage) holds, in place of placements."""
    return {"param": ",".join(sorted(state["params"]["layers"], key=int)), "moment": ""}


def parse(text):
    parts = text.split(";")
    opts = dict(p.split("=", 1) if "=" in p else (p, "1") for p in parts[1:])
    return parts[0], int(opts.get("zero", 0)), "sp" in opts, "offload" in opts, int(opts.get("micro", 1)), opts


def main(argv):
    trivial = parallel.Layout(parallel.mesh.trivial_mesh(), sharding.RULES)
    ref_losses, ref_params, _ = run(trivial)
    ref_grads, _ = first_grads(trivial)
    for text in argv:
        spec, zero, sp, offload, micro, opts = parse(text)
        mesh = parallel.make_mesh(spec)
        if mesh.has("pp"):
            t0 = time.time()
            losses, state = run_pipeline(mesh, zero=zero, sp=sp, micro=micro, virtual=int(opts.get("v", 1)),
                                         schedule=opts.get("schedule", "1f1b"))
            if mesh.rank == 0:
                print("RESULT " + json.dumps({"layout": text, "losses": losses, "ref": ref_losses,
                                              "grad_rel_diff": None, "placements": describe_pp(state),
                                              "seconds": time.time() - t0}), flush=True)
            continue
        layout = sharding.make_layout(mesh, zero=zero, sequence_parallel=sp)
        t0 = time.time()
        recompute, compile = opts.get("recompute", "none"), opts.get("compile", False)
        losses, params, state = run(layout, micro=micro, offload=offload, recompute=recompute, compile=compile)
        diff = max((a - b).abs().max().item() for a, b in
                   zip(parallel.tree.leaves(ref_params), parallel.tree.leaves(params)))
        grads, buckets = first_grads(layout, recompute, compile)
        gathered, async_gathers = gathered_layer_bytes_after_forward(layout, recompute, compile=compile)
        gathered_bf16, _ = gathered_layer_bytes_after_forward(layout, recompute, compute_dtype=torch.bfloat16,
                                                              compile=compile)
        reshard = parallel.zero.needs_gather(layout)
        bf16_same = bf16_grads_same_without_resharding(layout, recompute, compile) if reshard else None
        grad_diff = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item() for a, b in
                        zip(parallel.tree.leaves(ref_grads), parallel.tree.leaves(grads)))
        if mesh.rank == 0:
            print("RESULT " + json.dumps({"layout": text, "losses": losses, "ref": ref_losses,
                                          "param_diff": diff, "grad_rel_diff": grad_diff,
                                          "buckets_during_backward": buckets,
                                          "gathered_layer_bytes_after_forward": gathered,
                                          "gathered_layer_bytes_after_bf16_forward": gathered_bf16,
                                          "bf16_grads_same_without_resharding": bf16_same,
                                          "async_gathers": async_gathers,
                                          "placements": describe(state),
                                          "seconds": time.time() - t0}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    parallel.shutdown_distributed()
