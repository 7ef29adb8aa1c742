"""Training throughput under a mesh: 2 processes (gloo, one thread each) train the `tiny` config
(dim 256, 4 layers, 4 heads, vocab 512; fp32, global batch 4 x 512 tokens, AdamW) on each layout
with three kernel choices, timed in the same run:

- reference: `impl="reference"`, the plain-torch math run on DTensors (what a mesh ran before);
- fast: the default, `impl="auto"`: each op's kernel on the rank's local blocks (SDPA or the
  chunked attention kernel on local heads, the fused or vocabulary-parallel cross-entropy,
  compiled rms_norm / rotary / swiglu kernels);
- compiled: the fast kernels with each layer compiled (`compile=True`: regional compilation).

Target: fast at least 1.3x the reference's tokens/s on dp=2, tp=2 and fsdp=2.

The two ranks are worker processes started here. The benchmark drives them one step at a time
(both ranks run it; a step's time runs from the command until both have finished), so
pytest-benchmark times whole distributed steps and `timed` interleaves a variant with the
reference. On a shared machine a rank waits for the CPU as well as for its peer, so each test
also records the ratio of the ranks' CPU time per step (best over the rounds, the busier rank):
what the kernels save, whatever the load.

Run: pytest benchmarks/test_bench_mesh.py --benchmark-only -s
"""
import multiprocessing
import os
import socket
import time

import pytest
from conftest import interleaved_best

CONFIG = "tiny"
BATCH, SEQ = 4, 512
LAYOUTS = ("dp=2", "tp=2", "fsdp=2")
VARIANTS = {"reference": dict(impl="reference"), "fast": dict(impl="auto"),
            "compiled": dict(impl="auto", compile=True)}
TARGET = 1.3
ROUNDS = 12
REPLY_TIMEOUT_S = 1200  # a first compiled step on 2 busy cores takes minutes


def _serve(rank: int, port: int, conn) -> None:
    """One rank: builds a train state per (layout, variant) on request and runs steps."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    import parallel
    from aquila_fn import get_config
    from aquila_fn.training import optim, sharding, train

    config = get_config(CONFIG)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
    meshes, runs = {}, {}

    def build(layout_spec: str, variant: str):
        mesh = meshes.setdefault(layout_spec, parallel.make_mesh(layout_spec))
        layout = sharding.make_layout(mesh)
        opt = parallel.distributed_optimizer(optim.adamw(1e-4, weight_decay=0.1), layout, max_grad_norm=1.0)
        box = {"state": train.init_train_state(sharding.init_params(config, 0, layout), opt, precision="fp32")}
        step = sharding.make_train_step(config, opt, layout, precision="fp32", **VARIANTS[variant])
        local = sharding.local_batch(batch, layout)

        def run():
            box["state"], metrics = step(box["state"], local)
            return metrics["loss"]

        runs[(layout_spec, variant)] = run
        return run()  # the first step: compilation, warm-up

    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        cpu = time.process_time()
        loss = build(*message[1:]) if message[0] == "build" else runs[message[1:]]()
        conn.send((loss, time.process_time() - cpu))
    parallel.shutdown_distributed()


class Ranks:
    """Two worker processes forming one gloo group."""

    def __init__(self):
        context = multiprocessing.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs = [], []
        for rank in range(2):
            ours, theirs = context.Pipe()
            proc = context.Process(target=_serve, args=(rank, port, theirs), daemon=True)
            proc.start()
            self.conns.append(ours)
            self.procs.append(proc)
        self.built: dict = {}
        self.cpu_seconds: dict = {}  # (layout, variant) -> the busier rank's CPU time, per step

    def call(self, *message):
        for conn in self.conns:
            conn.send(message)
        replies = []
        for conn, proc in zip(self.conns, self.procs):
            if not conn.poll(REPLY_TIMEOUT_S):
                raise RuntimeError(f"rank {self.conns.index(conn)} did not answer {message[0]!r} within "
                                   f"{REPLY_TIMEOUT_S} s (alive: {proc.is_alive()})")
            replies.append(conn.recv())
        return replies

    def stepper(self, layout: str, variant: str):
        """A function running one training step of (layout, variant) on both ranks."""
        key = (layout, variant)
        if key not in self.built:
            self.built[key] = self.call("build", layout, variant)[0]
            self.cpu_seconds[key] = []

        def step():
            replies = self.call("step", layout, variant)
            self.cpu_seconds[key].append(max(cpu for _, cpu in replies))

        return step

    def cpu_speedup(self, layout: str, variant: str) -> float:
        return min(self.cpu_seconds[(layout, "reference")]) / min(self.cpu_seconds[(layout, variant)])

    def close(self):
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(60)


@pytest.fixture(scope="module")
def ranks():
    workers = Ranks()
    yield workers
    workers.close()


def _record(benchmark, ranks, layout: str, variant: str, speedup) -> None:
    if benchmark.disabled:
        return
    tokens_per_s = BATCH * SEQ / benchmark.stats.stats.min
    benchmark.extra_info.update(layout=layout, variant=variant, tokens_per_s=round(tokens_per_s, 1))
    line = f"\n{layout} {variant}: {tokens_per_s:.0f} tokens/s"
    if speedup is not None:
        cpu = ranks.cpu_speedup(layout, variant)
        benchmark.extra_info["cpu_time_speedup_vs_reference"] = round(cpu, 3)
        line += f", {speedup:.2f}x the reference kernels (CPU time per step: {cpu:.2f}x)"
    print(line)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mesh_train_reference_kernels(timed, benchmark, ranks, layout):
    timed(ranks.stepper(layout, "reference"), case=f"train {CONFIG} {layout}", rounds=ROUNDS)
    _record(benchmark, ranks, layout, "reference", None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mesh_train_fast_kernels(timed, benchmark, ranks, layout):
    speedup = timed(ranks.stepper(layout, "fast"), case=f"train {CONFIG} {layout}", rounds=ROUNDS,
                    reference=ranks.stepper(layout, "reference"), min_speedup=TARGET)
    _record(benchmark, ranks, layout, "fast", speedup)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mesh_train_compiled_layers(timed, benchmark, ranks, layout):
    compiled = ranks.stepper(layout, "compiled")
    speedup = timed(compiled, case=f"train {CONFIG} {layout}", rounds=ROUNDS,
                    reference=ranks.stepper(layout, "reference"))
    _record(benchmark, ranks, layout, "compiled", speedup)
    if not benchmark.disabled:  # what compiling the layers adds to the fast kernels
        fast, best = interleaved_best(ranks.stepper(layout, "fast"), compiled, ROUNDS)
        benchmark.extra_info["speedup_vs_fast_kernels"] = round(fast / best, 3)
        print(f"{layout} compiled: {fast / best:.2f}x the fast kernels uncompiled")
