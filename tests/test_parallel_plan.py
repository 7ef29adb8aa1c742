"""parallel.plan: per-rank memory and communication without allocating, checked against what
real ranks hold and send on small configs (gloo on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dist_launch import ROOT, TESTS, results, torchrun

from aquila_fn.core.config import get_config

CASES = ["tp=2/0/0/none", "tp=2/0/1/none", "dp=2/1/0/selective", "dp=2/2/0/none", "dp=2/3/0/none"]
# What the real forward leaves allocated also holds what the plan does not count: the autograd
# graph's own nodes and malloc's bookkeeping (0.4 MiB on these runs, the same from run to run).
GRAPH_OVERHEAD = 1 << 20
BATCH, SEQ = "4", "64"


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def planned_and_measured():
    planned = results(run_python(str(TESTS / "dist_measure.py"), "--plan", BATCH, SEQ, *CASES))
    measured = results(torchrun("dist_measure.py", 2, BATCH, SEQ, *CASES))
    return dict(zip(CASES, zip(planned, measured)))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_plan_matches_real_allocations_and_traffic(planned_and_measured, case):
    plan, real = planned_and_measured[case]
    # the blocks a rank holds: exact
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert plan[key] == real[key], (case, key, plan[key], real[key])
    # activations: the tensors the real forward left alive (its kernels, its saved tensors),
    # counted by the planner's meter on real tensors: the meta run takes the same kernels and
    # keeps the same tensors
    act = plan["activation_bytes"]
    assert act == pytest.approx(real["forward_live_bytes"], rel=0.02), (case, act, real["forward_live_bytes"])
    # and what the real forward allocated and had not freed when it returned (malloc's count over
    # all threads once every collective has finished; independent of the planner's meter), for
    # every layout, collectives and ZeRO-3 re-gathers included
    real_act = real["forward_retained_bytes"]
    assert real_act - GRAPH_OVERHEAD <= act <= real_act, (case, act, real_act)
    # bytes sent by every collective of a real training step (it also reduces the loss and
    # token counts for its metrics: a few bytes the plan leaves out)
    assert real["comm_sent_bytes"] == pytest.approx(plan["comm_sent_bytes"], rel=0.02), case


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_a_meta_forward_keeps_what_a_real_forward_keeps(recompute):
    """The plan's dry run leaves exactly the tensors a real forward leaves, kernel for kernel: the
    fused elementwise kernels declare what they save (a dispatch mode such as the planner's
    meter runs compiled code eagerly), and attention on meta takes the flash kernel's memory
    (SDPA's math path on meta would keep the [B, H, S, S] probabilities)."""
    import torch
    from unittest import mock

    from aquila_fn.core import model, pytree
    from ops._dispatch import resolve_elementwise
    from ops.rotary import _rope_table_cached
    from parallel.meter import LiveMeter

    config = get_config("tiny").replace(n_layers=2)
    live = {}
    for device in ("cpu", "meta"):
        params = model.param_shapes(config) if device == "meta" else model.init_params(config, 0)
        params = pytree.tree_map(lambda x: x.detach().requires_grad_(), params)
        ids = torch.zeros((2, 64), dtype=torch.long, device=device)
        _rope_table_cached.cache_clear()
        with mock.patch.object(model, "check_tokens", lambda *a, **k: None), LiveMeter() as meter:
            total, _ = model.loss_sum_fn(params, {"input_ids": ids, "labels": ids}, config, recompute=recompute)
        live[device] = meter.live
    assert resolve_elementwise("auto", torch.zeros(2, 64, config.dim)) == "fused"  # kernels, not reference
    assert live["meta"] == live["cpu"], live


def test_plan_cli_for_a_model_that_does_not_fit_here():
    args = ["-m", "parallel.plan", "--config", "aquila2-34b", "--mesh", "dp=8,tp=8,pp=2", "--batch-size", "64",
            "--micro-batch-size", "1", "--seq-len", "4096", "--recompute", "selective", "--zero", "1",
            "--sequence-parallel"]
    plan = json.loads(run_python(*args, "--json").stdout)
    stages = plan["stages"]
    assert [s["stage"] for s in stages] == [0, 1] and plan["micro_batches"] == 8
    n = get_config("aquila2-34b").num_params()
    norms = (2 * 60 + 1) * 6144  # replicated over tp
    assert sum(s["params_bytes"] for s in stages) == pytest.approx(4 * ((n - norms) / 8 + norms), rel=1e-3)
    # Adam moments, ZeRO-1: split over dp and tp, and between the two stages
    assert sum(s["optimizer_bytes"] for s in stages) == pytest.approx(8 * n / 64, rel=1e-2)
    for s in stages:
        # gradients all-reduced once per step over 8 data ranks (2 * 7/8 of their bytes), on top of
        # the tensor/sequence-parallel traffic; activations cross the stage boundary point to point
        assert s["comm"]["all_reduce@8"]["sent_bytes"] >= 2 * 7 / 8 * s["grads_bytes"] * 0.99
        assert s["comm"]["send@2"]["calls"] == 8  # 8 micro-batches, one direction each
    # 1F1B: the first stage holds two micro-batches' activations at its peak, the last one
    assert [s["micro_batches_in_flight"] for s in stages] == [2, 1]
    text = run_python("-m", "parallel.plan", "--config", "aquila2-7b", "--mesh", "dp=2,tp=4",
                      "--batch-size", "8", "--seq-len", "2048", "--zero", "3").stdout
    assert "per rank" in text and "activations" in text and "communication" in text


def test_plan_of_tied_embeddings_under_pp_and_of_gradient_buckets():
    from parallel.plan import load_model, plan

    config = get_config("tiny", n_layers=2)
    model = load_model("aquila_fn.training.parallel_setup", "tiny", {"n_layers": 2}, "fp32", "none")
    embed, norm = config.vocab_size * config.dim * 4, config.dim * 4
    layer = (config.num_params() - config.vocab_size * config.dim - config.dim) // 2 * 4
    first, last = plan(model, "pp=2", batch_size=4, micro_batch_size=1, seq_len=32)["stages"]
    # the last stage's output layer is a copy of the first stage's embedding
    assert first["params_bytes"] == embed + layer and last["params_bytes"] == embed + layer + norm
    for stage in (first, last):  # whose gradients the two end stages sum: one all-reduce of it
        assert stage["comm"]["all_reduce@2"] == {"calls": 1, "payload_bytes": embed, "sent_bytes": embed}
        assert stage["grad_bucket_bytes"] == 0  # no data axis: nothing to reduce
    # data parallel: the all-reduced gradients live in their buckets (a second copy); ZeRO-3's
    # reduce-scatters pass whole (gathered) gradients through them, here all within two buckets
    dp, zero3 = (plan(model, "dp=2", zero=z, batch_size=4, seq_len=32)["stages"][0] for z in (0, 3))
    assert dp["grad_bucket_bytes"] == dp["grads_bytes"] == dp["params_bytes"]
    assert zero3["grad_bucket_bytes"] == 2 * zero3["params_bytes"] == dp["params_bytes"]


@pytest.mark.parametrize("precision,recompute", [("bf16", "none"), ("fp32", "selective"), ("bf16", "full")])
def test_planned_step_peak_matches_a_real_step(precision, recompute):
    """The plan's peak (parameters + optimizer state + the high-water mark of its meta step:
    forward, backward, optimizer) against a real one-process train step, its high-water mark
    counted by the same meter on real tensors on top of the parameters and state it started with."""
    import torch

    from aquila_fn.core import model
    from aquila_fn.training import optim, train
    from ops.rotary import _rope_table_cached
    from parallel.meter import LiveMeter, tree_local_bytes
    from parallel.plan import load_model, plan

    config = get_config("tiny", n_layers=2)
    planned = load_model("aquila_fn.training.parallel_setup", "tiny", {"n_layers": 2}, precision, recompute)
    _rope_table_cached.cache_clear()
    peak = plan(planned, {}, batch_size=2, seq_len=64)["stages"][0]["peak_bytes"]

    opt = optim.adamw(1e-4, max_grad_norm=1.0)
    state = train.init_train_state(model.init_params(config, 0), opt, precision=precision)
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    step = train.make_train_step(config, opt, precision=precision, recompute=recompute)
    resident = tree_local_bytes(state["params"]) + tree_local_bytes(state["opt_state"])
    _rope_table_cached.cache_clear()
    with LiveMeter() as live:
        step(state, {"input_ids": ids, "labels": ids.roll(-1, 1)})
    # the real step also keeps its loss and metrics scalars; the bf16 kernels on CPU keep a few
    # buffers the meta run does not (0.26 MB of 27 MB here)
    assert resident + live.peak == pytest.approx(peak, rel=0.015), (resident + live.peak, peak)
