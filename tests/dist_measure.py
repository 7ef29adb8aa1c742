"""Worker: what one rank really holds and sends in a training step, to check parallel.plan.

    torchrun --standalone --nproc-per-node 2 tests/dist_measure.py BATCH SEQ CASE...
    python tests/dist_measure.py --plan BATCH SEQ CASE...      (the planner's figures, no torchrun)

A CASE is "MESH/ZERO/SP/RECOMPUTE", e.g. "tp=2/0/1/none", on the `tiny` config.

Prints `RESULT {...}` (from rank 0) with the bytes of the rank's parameter, gradient and optimizer
blocks, the bytes autograd saved in one micro-batch's forward (by the saved-tensor hooks; independently by
walking the autograd graph's saved tensors, real storages; and malloc's count of what the
forward allocated and did not free, which also holds the loss and the autograd graph's own objects),
the bytes of the tensors the forward left alive as the planner's meter counts them on this real
forward, and the bytes sent by every collective of one full training step.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys

import torch

import parallel
from aquila_fn.training import optim, sharding, train
from aquila_fn.core.config import get_config
from ops.rotary import _rope_table_cached
from parallel.meter import CommMeter, LiveMeter, SavedMeter, graph_saved_bytes, tree_local_bytes


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                       "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back, over every thread of the process (glibc)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # in the heaps + in mmapped chunks (large tensors)


def quiesce(mesh) -> None:
    """Let every collective already issued finish and its buffers go: gloo runs a group's work
    in order on its own thread, so a barrier on each group waits for all of it."""
    for axis in mesh.axes:
        torch.distributed.barrier(group=mesh.group(axis))
    gc.collect()


def forward_retained_bytes(fn, mesh) -> tuple[int, object]:
    """Bytes the forward allocated and had not freed when it returned, read off the allocator
    before and after at quiet moments. (The profiler's count is not used: frees made on gloo's
    worker thread are not recorded there, so it counted buffers already gone, more or fewer
    from run to run.) A first, unmeasured forward fills the caches a process builds once."""
    fn()  # its result and graph are dropped at once
    quiesce(mesh)
    _rope_table_cached.cache_clear()  # every measured forward builds it, as the plan's does
    before = heap_in_use()
    out = fn()
    quiesce(mesh)
    return heap_in_use() - before, out


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
                lambda: loss_sum(inputs, batch, config, recompute=recompute), mesh)
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
    from aquila_fn.training.parallel_setup import plan_model

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
