"""Worker (under torchrun, 2 ranks, dp=2): tokens/s of the data-parallel train step with 4
micro-batches, gradients reduced in buckets during the last micro-batch's backward (overlap) or
after backward (each leaf reduced by itself), timed in interleaved rounds in the same run; and,
from a torch.profiler trace of one overlapped step, when each gradient all-reduce started
relative to the end of backward. Prints one `RESULT {...}` line on rank 0.

    torchrun --standalone --nproc-per-node 2 benchmarks/dist_overlap.py [rounds]
"""

from __future__ import annotations

import json
import sys
import time

import torch

import parallel
from aquila_fn.training import optim, sharding, train
from aquila_fn.core.config import get_config

CONFIG = get_config("tiny")  # 3.5M parameters: 14 MiB of fp32 gradients per step
BATCH, SEQ, MICRO = 8, 128, 4  # per rank: 4 micro-batches of one 128-token sequence


def make_step(layout, overlap: bool, bucket_bytes: int = 25 << 20):
    opt = parallel.distributed_optimizer(optim.adamw(1e-3, max_grad_norm=1.0), layout, max_grad_norm=1.0)
    box = {"state": train.init_train_state(sharding.init_params(CONFIG, 0, layout), opt, precision="fp32")}
    step = sharding.make_train_step(CONFIG, opt, layout, micro_batches=MICRO, precision="fp32", overlap=overlap,
                                    bucket_bytes=bucket_bytes)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g)
    batch = sharding.local_batch({"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}, layout)

    def run():
        box["state"], metrics = step(box["state"], batch)
        return metrics["loss"]

    return run


def timed(fn) -> float:
    torch.distributed.barrier()
    t = time.perf_counter()
    fn()
    torch.distributed.barrier()
    return time.perf_counter() - t


def profile_overlap(run) -> dict:
    """Gradient all-reduces (the bucket ones: not the step's scalar token and loss sums) against
    the end of the last backward op, from the profiler's events of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    events = prof.events()
    backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function")]
    backward_end = max(e.time_range.end for e in backward)
    buckets = sorted((e for e in events if e.name == "gloo:all_reduce" and e.input_shapes
                      and e.input_shapes[0] and e.input_shapes[0][0] > 1), key=lambda e: e.time_range.start)
    return {"gradient_all_reduces": len(buckets),
            "started_before_backward_end": sum(e.time_range.start < backward_end for e in buckets),
            "bucket_numels": [e.input_shapes[0][0] for e in buckets],
            "ms_before_backward_end": [round((backward_end - e.time_range.start) / 1e3, 1) for e in buckets]}


def main(rounds: int) -> None:
    torch.set_num_threads(1)
    mesh = parallel.make_mesh("dp=2")
    layout = sharding.make_layout(mesh)
    post, overlap = make_step(layout, overlap=False), make_step(layout, overlap=True)
    assert abs(post() - overlap()) < 1e-5  # the same step either way (first step: same state)
    times = [(timed(post), timed(overlap)) for _ in range(rounds)]
    trace = profile_overlap(overlap)
    tokens = BATCH * SEQ
    best_post, best_overlap = min(t[0] for t in times), min(t[1] for t in times)
    if mesh.rank == 0:
        print("RESULT " + json.dumps({
            "tokens_per_s_post_backward": tokens / best_post, "tokens_per_s_overlap": tokens / best_overlap,
            "speedup": best_post / best_overlap, "rounds": rounds, **trace}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
    parallel.shutdown_distributed()
