"""Worker (run under torchrun): train a tiny model a few steps under several layouts and print,
as one JSON line per layout, the per-step losses and the largest parameter difference against
the same steps run in one process (each rank computes that reference itself).

    torchrun --standalone --nproc-per-node 2 tests/dist_layouts.py "dp=2" "tp=2;sp" "dp=2;zero=2"

A layout is "<mesh>[;zero=N][;sp][;offload][;micro=M][;recompute=POLICY][;fp16][;compile=BACKEND]"
(compile: each layer compiled with that torch.compile backend, regional compilation); pipeline
layouts (a pp axis) also take "[;v=VIRTUAL][;schedule=NAME][;untied]" and train the
tied-embedding model unless untied.
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
from aquila_fn.training import optim, pipeline_stages, sharding, train
from aquila_fn.core.config import get_config
from aquila_fn.core.transforms import value_and_grad

CONFIG = get_config("tiny").replace(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    vocab_size=64, max_seq_len=64, tie_embeddings=False)
TIED = CONFIG.replace(tie_embeddings=True)  # as the tiny preset ships
SEED, STEPS, BATCH, SEQ = 0, 3, 4, 16
# fp16 runs start at a loss scale that overflows in steps 1 and 3 (skipped) and not in step 2
LOSS_SCALE = train.LossScaleConfig(init_scale=2.0 ** 20)


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


def eval_batches(config):
    """Validation batches shaped unlike the training micro-batches (2 and 6 rows)."""
    g = torch.Generator().manual_seed(99)
    out = []
    for rows in (2, 6):
        x = torch.randint(0, config.vocab_size, (rows, SEQ + 1), generator=g)
        out.append({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()})
    return out


def run_pipeline(mesh, *, zero=0, sp=False, micro=1, virtual=1, schedule="1f1b", config=TIED,
                 precision="fp32"):
    """(losses, skipped steps, state, validation loss, staged model) of a pipelined run."""
    staged = pipeline_stages.make_pipeline(
        config, SEED, mesh, zero=zero, sequence_parallel=sp, virtual_stages=virtual, schedule=schedule,
        micro_batches=micro, precision=precision)
    opt = parallel.distributed_optimizer(make_optimizer(), staged.layout, max_grad_norm=1.0,
                                         norm_group=mesh.group("pp"), norm_skip=pipeline_stages.copied_paths(mesh))
    state = train.init_train_state(staged.params, opt, precision=precision, loss_scale=LOSS_SCALE)
    step = pipeline_stages.make_train_step(staged, opt, loss_scale=LOSS_SCALE)
    losses, skipped = [], []
    for batch in batches(config):
        state, metrics = step(state, sharding.local_batch(batch, staged.layout))
        losses.append(metrics["loss"])
        skipped.append(metrics["skipped"])
    valid = pipeline_stages.make_eval_loss(staged)(state["params"], eval_batches(config))
    return losses, skipped, state, valid, staged


def tied_copies_equal(staged) -> bool | None:
    """Whether the first and last stage's copies of the tied embedding are bit-identical (None
    when this rank holds no copy)."""
    if staged.shared is None:
        return None
    mine = parallel.tree.named_leaves(staged.params)
    local = next(x for p, x in mine if p == "embed")
    local = local.to_local() if hasattr(local, "to_local") else local
    both = [torch.empty_like(local) for _ in range(2)]
    torch.distributed.all_gather(both, local.contiguous(), group=staged.shared.group)
    return torch.equal(both[0], both[1])


def run_pipeline_layout(text, mesh, zero, sp, micro, opts, reference):
    """The RESULT record of one pipeline layout, compared with one process."""
    t0 = time.time()
    config = CONFIG if "untied" in opts else TIED
    precision = "fp16" if "fp16" in opts else "fp32"
    losses, skipped, state, valid, staged = run_pipeline(
        mesh, zero=zero, sp=sp, micro=micro, virtual=int(opts.get("v", 1)),
        schedule=opts.get("schedule", "1f1b"), config=config, precision=precision)
    # fp16 rounding depends on the matmul shapes: compare with one process taking the same
    # micro-batches (fp32 is compared with one process taking the whole batch at once)
    ref = reference(config, precision, micro * staged.layout.data_size if precision == "fp16" else 1)
    full = pipeline_stages.full_params(state["params"], mesh)
    diff = max((a - b).abs().max().item() for a, b in
               zip(parallel.tree.leaves(ref["params"]), parallel.tree.leaves(full)))
    equal, skips = [None] * mesh.world_size, [None] * mesh.world_size
    torch.distributed.all_gather_object(equal, tied_copies_equal(staged))
    torch.distributed.all_gather_object(skips, skipped)
    if mesh.rank == 0:
        print("RESULT " + json.dumps({
            "layout": text, "losses": losses, "ref": ref["losses"], "skipped": skips,
            "skipped_ref": ref["skipped"], "param_diff": diff, "grad_rel_diff": None,
            "valid": valid, "valid_ref": ref["valid"], "tied_copies_equal": equal,
            "placements": describe_pp(state), "seconds": time.time() - t0}), flush=True)


def one_process_reference(config, precision, micro):
    trivial = parallel.Layout(parallel.mesh.trivial_mesh(), sharding.RULES)
    losses, params, _, skipped = run(trivial, config=config, precision=precision, micro=micro)
    valid = train.make_eval_loss(config, precision=precision)(params, eval_batches(config))
    return {"losses": losses, "params": params, "skipped": skipped, "valid": valid}


def run(layout, *, micro=1, offload=False, recompute="none", config=CONFIG, precision="fp32", overlap=True,
        compile=False):
    params = sharding.init_params(config, SEED, layout)
    opt = make_optimizer()
    if not layout.trivial or offload:
        opt = parallel.distributed_optimizer(opt, layout, max_grad_norm=1.0, offload=offload)
    state = train.init_train_state(params, opt, precision=precision, loss_scale=LOSS_SCALE)
    step = sharding.make_train_step(config, opt, layout, micro_batches=micro, precision=precision, recompute=recompute,
                                    loss_scale=LOSS_SCALE, overlap=overlap, compile=compile)
    losses, skipped = [], []
    for batch in batches(config):
        state, metrics = step(state, sharding.local_batch(batch, layout))
        losses.append(metrics["loss"])
        skipped.append(metrics["skipped"])
    return losses, parallel.gather(state["params"]), state, skipped


def first_grads(layout, recompute="none", config=CONFIG, micro=1, compile=False):
    """Reduced gradients of the first batch's mean loss (full tensors) over `micro` micro-batches,
    for a direct check; and for each micro-batch's backward, how many buckets it sent in all
    and how many of those while gradients were still arriving (overlapping backward)."""
    params = sharding.init_params(config, SEED, layout)
    batch = next(batches(config))
    n = float(train.count_tokens(batch))
    reducer = parallel.GradReducer(layout, bucket_bytes=4096)  # small buckets: several per backward
    events = []
    add, launch = reducer._add, reducer._launch
    reducer._add = lambda *a: (events.append("grad"), add(*a))[1]
    reducer._launch = lambda bucket: (events.append("launch"), launch(bucket))[1]
    loss_sum = sharding.make_loss_sum_fn(layout, reducer=reducer, compile_layers=compile)
    vg = train.weighted_value_and_grad(lambda p, b: loss_sum(p, b, config, recompute=recompute))
    launched, overlapped = [], []

    def observed(p, b, w):
        events.clear()
        out = vg(p, b, w)  # forward and backward: every launch in `events` was issued before it returned
        last_grad = max((i for i, e in enumerate(events) if e == "grad"), default=-1)
        launched.append(events.count("launch"))
        overlapped.append(events[:last_grad].count("launch"))
        return out

    reducer.begin_step(micro)
    micro_batches = train.split_batch(sharding.local_batch(batch, layout), micro)
    with layout.activate():
        grads, _ = train.accumulate_gradients(observed, params, micro_batches, torch.tensor(1.0 / n))
        grads = reducer.finish(grads)
    return parallel.gather(grads), {"launched": launched, "before_last_grad": overlapped}


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
    references = {}

    def reference(config, precision, micro=1):
        key = (config.tie_embeddings, precision, micro)
        if key not in references:
            references[key] = one_process_reference(config, precision, micro)
        return references[key]

    ref_grads, _ = first_grads(trivial)
    for text in argv:
        spec, zero, sp, offload, micro, opts = parse(text)
        mesh = parallel.make_mesh(spec)
        if mesh.has("pp"):
            run_pipeline_layout(text, mesh, zero, sp, micro, opts, reference)
            continue
        layout = sharding.make_layout(mesh, zero=zero, sequence_parallel=sp)
        t0 = time.time()
        recompute, compile = opts.get("recompute", "none"), opts.get("compile", False)
        precision = "fp16" if "fp16" in opts else "fp32"
        losses, params, state, skipped = run(layout, micro=micro, offload=offload, recompute=recompute,
                                             precision=precision, compile=compile)
        # fp16: one process taking the same rows per micro-batch (see run_pipeline_layout)
        ref = reference(CONFIG, precision, micro * layout.data_size if precision == "fp16" else 1)
        diff = max((a - b).abs().max().item() for a, b in
                   zip(parallel.tree.leaves(ref["params"]), parallel.tree.leaves(params)))
        skips = [None] * mesh.world_size
        torch.distributed.all_gather_object(skips, skipped)
        grads, buckets = first_grads(layout, recompute, micro=micro, compile=compile)
        same_bits = None
        if micro > 1:  # reduced during backward or after it: the same sums, so the same bits
            _, after, _, _ = run(layout, micro=micro, offload=offload, recompute=recompute, precision=precision,
                                 overlap=False, compile=compile)
            same_bits = all(torch.equal(a, b) for a, b in zip(parallel.tree.leaves(params), parallel.tree.leaves(after)))
        gathered, async_gathers = gathered_layer_bytes_after_forward(layout, recompute, compile=compile)
        gathered_bf16, _ = gathered_layer_bytes_after_forward(layout, recompute, compute_dtype=torch.bfloat16,
                                                              compile=compile)
        reshard = parallel.zero.needs_gather(layout)
        bf16_same = bf16_grads_same_without_resharding(layout, recompute, compile) if reshard else None
        grad_diff = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item() for a, b in
                        zip(parallel.tree.leaves(ref_grads), parallel.tree.leaves(grads)))
        if mesh.rank == 0:
            print("RESULT " + json.dumps({"layout": text, "losses": losses, "ref": ref["losses"],
                                          "skipped": skips, "skipped_ref": ref["skipped"],
                                          "param_diff": diff, "grad_rel_diff": grad_diff,
                                          "buckets_during_backward": buckets,
                                          "same_bits_as_post_backward_reduction": same_bits,
                                          "gathered_layer_bytes_after_forward": gathered,
                                          "gathered_layer_bytes_after_bf16_forward": gathered_bf16,
                                          "bf16_grads_same_without_resharding": bf16_same,
                                          "async_gathers": async_gathers,
                                          "placements": describe(state),
                                          "seconds": time.time() - t0}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
    parallel.shutdown_distributed()
