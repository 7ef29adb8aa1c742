"""Worker: what one rank really holds and sends in a training step, to check parallel.plan.

    torchrun --standalone --nproc-per-node 2 tests/dist_measure.py BATCH SEQ CASE...
    python tests/dist_measure.py --plan BATCH SEQ CASE...      (the planner's figures, no torchrun)

A CASE is "MESH/ZERO/SP/RECOMPUTE", e.g. "tp=2/0/1/none", on the `tiny` config.

Prints `RESULT {...}` (from rank 0) with the bytes of the rank's parameter, gradient and optimizer
blocks, the bytes autograd saved in one micro-batch's forward (by the saved-tensor hooks; independently by
walking the autograd graph's saved tensors, real storages; and the profiler's count of what the
forward allocated and did not free, which also holds the loss and temporaries), the bytes of the
tensors the forward left alive as the planner's meter counts them on this real forward, and
the bytes sent by every collective of one full training step.
"""

from __future__ import annotations

import json
import sys

import torch

import parallel
from aquila_fn import optim, sharding, train
from aquila_fn.config import get_config
from ops.rotary import _rope_table_cached
from parallel.meter import CommMeter, LiveMeter, SavedMeter, graph_saved_bytes, tree_local_bytes


def forward_retained_bytes(fn) -> tuple[int, object]:
    """Bytes the forward allocated and had not freed when it returned (profiler count)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    total = sum(e.self_cpu_memory_usage for e in prof.events())  # allocations minus frees
    return total, out


def forward_live_bytes(fn) -> int:
    """Bytes of the tensors the forward created and left alive, counted by the planner's own meter
    (parallel.meter.LiveMeter) on real tensors. Without the bytes a process group keeps outside
    tensors (gloo's staging, in the profiler's count), this is exactly what the plan's meta run
    must find."""
    _rope_table_cached.cache_clear()
    with LiveMeter() as live:
        out = fn()
    return live.live


def measure(spec, zero, sp, recompute, batch_size, seq_len):
    zero, sp = int(zero), sp == "1"
    config = get_config("tiny")
    mesh = parallel.make_mesh(spec)
    layout = sharding.make_layout(mesh, zero=zero, sequence_parallel=sp)
    params = sharding.init_params(config, 0, layout)
    opt = parallel.distributed_optimizer(optim.adamw(1e-4, max_grad_norm=1.0), layout, max_grad_norm=1.0)
    state = train.init_train_state(params, opt, precision="fp32")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g)
    batch = sharding.local_batch({"input_ids": ids, "labels": ids.roll(-1, 1)}, layout)

    # activations: one forward, measured two ways
    loss_sum = sharding.make_loss_sum_fn(layout)
    inputs = parallel.tree.map_with_path(lambda p, x: x.detach().requires_grad_(True), state["params"])
    diff = parallel.tree.leaves(inputs)
    with layout.activate():
        _rope_table_cached.cache_clear()  # every measured forward builds it, as the plan's does
        with SavedMeter(exclude=diff) as saved:
            retained, (total, _) = forward_retained_bytes(
                lambda: loss_sum(inputs, batch, config, recompute=recompute))
        graph_bytes = graph_saved_bytes(total, diff)
        loss_bytes = total.numel() * total.element_size()  # the forward's result, not held for backward
        grads = torch.autograd.grad(total, diff)
        del total
        live_bytes = forward_live_bytes(lambda: loss_sum(inputs, batch, config, recompute=recompute))
    grad_tree = parallel.reduce_gradients(parallel.tree.unflatten(parallel.tree.structure(inputs), list(grads)), layout)

    # communication: one real training step
    step = sharding.make_train_step(config, opt, layout, precision="fp32", recompute=recompute)
    with CommMeter() as comm:
        state, metrics = step(state, batch)
    out = {"params_bytes": tree_local_bytes(state["params"]), "grads_bytes": tree_local_bytes(grad_tree),
           "optimizer_bytes": tree_local_bytes(state["opt_state"]), "saved_bytes": saved.bytes,
           "graph_saved_bytes": graph_bytes, "forward_retained_bytes": retained - loss_bytes,
           "forward_live_bytes": live_bytes - loss_bytes, "comm": comm.summary(), "comm_sent_bytes": comm.total_sent()}
    if mesh.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def plan_case(spec, zero, sp, recompute, batch_size, seq_len):
    from parallel.plan import plan
    from aquila_fn.sharding import plan_model

    model = plan_model("tiny", {}, "fp32", recompute)
    _rope_table_cached.cache_clear()  # its forward builds the rotary table, as the measured ones do
    result = plan(model, spec, zero=int(zero), sequence_parallel=sp == "1", batch_size=batch_size,
                  seq_len=seq_len)
    print("RESULT " + json.dumps(result["stages"][0]), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    fn = measure
    if args[0] == "--plan":
        fn, args = plan_case, args[1:]
    batch_size, seq_len = int(args[0]), int(args[1])
    for case in args[2:]:
        fn(*case.split("/"), batch_size, seq_len)
    parallel.shutdown_distributed()
