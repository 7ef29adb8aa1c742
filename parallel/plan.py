"""Plan a run past this machine: per-rank memory and communication, nothing allocated.

    python -m parallel.plan --config aquila2-34b --mesh dp=8,tp=8,pp=2 --batch-size 512 \\
        --micro-batch-size 1 --seq-len 4096 --recompute selective --zero 1

The plan is not a formula: it runs rank 0's real code path (each pipeline stage's first rank
under pp) on meta tensors inside a fake process group of the full world size, and observes it:
parameter, gradient and optimizer-state blocks are the DTensors the run would hold (plus the
buckets that reduce gradients during backward, GradReducer.buffer_bytes); activation
memory is what one micro-batch's forward leaves allocated for its backward (`meter.LiveMeter`:
saved tensors, inputs kept for recomputation, gathered weights) times the micro-batches the
pipeline schedule keeps in flight; communication is every collective the
forward, backward, gradient reduction and optimizer step issue (`meter.CommMeter`).

The model comes from a plugin module (`--model`, default `aquila_fn.training.parallel_setup`) exposing
`plan_model(config, overrides, precision, recompute) -> PlanModel`; parallel/ itself knows no
model.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx.experimental._config

from parallel import cli
from parallel.grads import GradReducer
from parallel.layout import Layout
from parallel.mesh import Mesh, MeshError, mesh_axes, mesh_spec, parse_mesh
from parallel.meter import CommMeter, LiveMeter, tree_local_bytes
from parallel.tree import leaves, map_with_path
from parallel.zero import distributed_optimizer

GiB = float(1 << 30)


@dataclass
class PlanModel:
    """What the planner needs from a model (supplied by a plugin)."""

    name: str
    make_layout: Callable[..., Layout]               # (mesh, zero=, sequence_parallel=) -> Layout
    init_params: Callable[[Layout], Any]             # meta DTensors (a stage's subtree under pp)
    loss: Callable[[Layout], Callable]               # layout -> loss(params, local_batch) -> scalar
    batch: Callable[[int, int], dict]                # (rows, seq_len) -> a local batch
    optimizer: Callable[[], Any]                     # the one-process optimizer
    stage_params: Callable[..., Any] | None = None   # (params, stage, n_stages) -> subtree
    stage_loss: Callable[..., Callable] | None = None  # (layout, stage, n_stages) -> loss
    boundary_bytes: Callable[[int, int], int] | None = None  # (rows, seq) -> activation sent between stages
    shared: Callable[[int, int], tuple] | None = None  # (stage, n_stages) -> paths whose gradients
    #                                                    are summed with another stage's copy (tied embeddings)
    num_params: int = 0


def fake_mesh(axes: dict[str, int]) -> Mesh:
    """A Mesh over a fake process group of the full world size, as seen from rank 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = math.prod(axes.values()) if axes else 1
    if dist.is_initialized():
        raise RuntimeError("parallel.plan needs a process without a process group (it builds a fake one)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    if not axes:
        return Mesh({}, None, "cpu")
    names = tuple(axes)
    return Mesh(dict(axes), init_device_mesh("cpu", tuple(axes[a] for a in names), mesh_dim_names=names), "cpu")


def _in_flight(schedule: str, pp: int, stage: int, micro_batches: int, virtual: int) -> int:
    """Micro-batches whose activations one rank holds at the peak of a schedule."""
    if pp <= 1:
        return 1
    if schedule == "gpipe":
        return micro_batches * virtual
    if schedule == "interleaved":  # warm-up of interleaved 1F1B (Megatron / torch.pipelining)
        return min(micro_batches * virtual, (virtual - 1) * pp + 2 * (pp - stage - 1) + 1)
    return min(micro_batches, pp - stage)  # 1F1B


def plan_stage(model: PlanModel, mesh: Mesh, *, zero: int, sequence_parallel: bool, rows: int,
               seq_len: int, micro_batches: int, offload: bool, stage: int = 0, n_stages: int = 1,
               virtual: int = 1, schedule: str = "1f1b") -> dict:
    """Memory and communication of one rank holding pipeline stage `stage` (all its virtual
    stages) of `n_stages` ranks along pp."""
    stage_mesh = mesh.without("pp")
    layout = model.make_layout(stage_mesh, zero=zero, sequence_parallel=sequence_parallel)
    params_full = model.init_params(layout)
    chunks = ([stage + k * n_stages for k in range(virtual)] if n_stages > 1 else [0])
    if n_stages > 1:
        parts = [model.stage_params(params_full, c, n_stages * virtual) for c in chunks]
    else:
        parts = [params_full]
    param_bytes = sum(tree_local_bytes(p) for p in parts)

    comm_micro, comm_once = CommMeter(), CommMeter()
    saved_total, peak_total, grad_bytes, opt_bytes, bucket_bytes = 0, 0, 0, 0, 0
    for c, params in zip(chunks, parts):
        saved, peak, grads, buckets, opt = _measure_chunk(
            model, layout, params, c, n_stages, virtual, rows, seq_len, offload, comm_micro, comm_once)
        saved_total += saved
        peak_total = max(peak_total, peak)
        grad_bytes += grads
        bucket_bytes += buckets
        opt_bytes += opt

    if n_stages > 1 and model.boundary_bytes is not None:
        _count_boundary_sends(comm_once, model.boundary_bytes(rows, seq_len), chunks,
                              n_stages * virtual, micro_batches)
    in_flight = _in_flight(schedule, n_stages, stage, micro_batches, virtual)
    activation_bytes = saved_total * in_flight / max(len(chunks), 1) if n_stages > 1 else saved_total
    comm = _merge(comm_micro, micro_batches, comm_once)
    resident = param_bytes + (0 if offload else opt_bytes)
    return {
        "stage": stage, "params_bytes": param_bytes, "grads_bytes": grad_bytes, "grad_bucket_bytes": bucket_bytes,
        "optimizer_bytes": 0 if offload else opt_bytes, "host_optimizer_bytes": opt_bytes if offload else 0,
        "activation_bytes_per_micro_batch": saved_total, "micro_batches_in_flight": in_flight,
        "activation_bytes": activation_bytes,
        "micro_batch_peak_bytes": peak_total,
        # the high-water mark of a step: parameters and optimizer state, the other micro-batches'
        # activations a pipeline holds, the gradient buckets (as if all were held at once), and
        # the meta run's own peak through forward, backward, reduction and optimizer step
        "peak_bytes": resident + bucket_bytes + (activation_bytes - saved_total / max(len(chunks), 1))
        + peak_total + (grad_bytes - grad_bytes / max(len(chunks), 1)),
        "total_bytes": param_bytes + grad_bytes + bucket_bytes + (0 if offload else opt_bytes) + activation_bytes,
        "comm": comm, "comm_sent_bytes": sum(v["sent_bytes"] for v in comm.values()),
    }


def _measure_chunk(model: PlanModel, layout: Layout, params: Any, chunk: int, n_stages: int, virtual: int,
                   rows: int, seq_len: int, offload: bool, comm_micro: CommMeter, comm_once: CommMeter
                   ) -> tuple[int, int, int, int, int]:
    """One (virtual) stage's forward, backward, gradient reduction and optimizer step on meta
    tensors: (bytes saved for backward, the step's high-water mark of bytes allocated on top of
    parameters and optimizer state, gradient bytes, gradient bucket bytes, optimizer-state bytes). Collectives of one micro-batch go to `comm_micro`, of the step to
    `comm_once`."""
    total_stages = n_stages * virtual
    loss = (model.stage_loss(layout, chunk, total_stages) if n_stages > 1 else model.loss(layout))
    inputs = map_with_path(lambda p, x: x.detach().requires_grad_(True)
                           if isinstance(x, torch.Tensor) and x.is_floating_point() else x, params)
    diff = [x for x in leaves(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    batch = model.batch(rows, seq_len)
    # meta tensors hold no values: data-dependent sizes (the fused loss's counted rows) are
    # taken at their largest
    opt = distributed_optimizer(model.optimizer(), layout, max_grad_norm=1.0, offload=offload)
    with layout.activate(), torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True):
        state = opt.init(params)  # exists before the step: not part of its high-water mark
        with LiveMeter() as live:  # everything the step allocates on top of parameters and state
            with comm_micro:
                value = loss(inputs, batch)
                saved = live.live  # what the forward left alive for backward
                grads = torch.autograd.grad(value, diff, allow_unused=True)
            del value
            grads = [torch.zeros_like(x) if g is None else g for x, g in zip(diff, grads)]
            grad_tree = _like(inputs, diff, grads)
            del grads
            with comm_once:
                grad_tree = GradReducer(layout, overlap=False).finish(grad_tree)
            grad_bytes = tree_local_bytes(grad_tree)
            with comm_once, torch.no_grad():
                opt.apply_(params, grad_tree, state)
        bucket_bytes = GradReducer(layout).buffer_bytes(inputs)
        if n_stages > 1 and model.shared is not None:
            _count_shared(comm_once, grad_tree, model.shared(chunk, total_stages))
        opt_bytes = tree_local_bytes(state)
    return saved, live.peak, grad_bytes, bucket_bytes, opt_bytes


def _count_boundary_sends(meter: CommMeter, per: int, chunks: list[int], total_stages: int,
                          micro_batches: int) -> None:
    """Point-to-point: each micro-batch's activation forward, its gradient backward, per chunk
    (`per` bytes each)."""
    sends = sum((c < total_stages - 1) + (c > 0) for c in chunks) * micro_batches
    rec = meter.records[("send", 2)]
    rec.calls += sends
    rec.payload_bytes += sends * per
    rec.sent_bytes += sends * per


def _count_shared(meter: CommMeter, grads: Any, paths: tuple) -> None:
    """The all-reduce of shared leaves' gradients between the two stages holding a copy
    (pipeline.SharedLeaves: a group of 2, which the fake process group cannot form)."""
    from parallel.meter import local_bytes
    from parallel.tree import named_leaves

    for path, g in named_leaves(grads):
        if path in paths:
            rec = meter.records[("all_reduce", 2)]
            rec.calls += 1
            rec.payload_bytes += local_bytes(g)
            rec.sent_bytes += local_bytes(g)  # ring all-reduce over 2: 2 * (2 - 1) / 2 of the payload


def _like(tree, diff, grads):
    """A tree shaped like `tree` with each differentiable leaf replaced by its gradient."""
    by_id = {id(x): g for x, g in zip(diff, grads)}
    return map_with_path(lambda p, x: by_id.get(id(x), x), tree)


def _merge(per_micro: CommMeter, micro_batches: int, once: CommMeter) -> dict:
    out: dict[str, dict] = {}
    for meter, times in ((per_micro, micro_batches), (once, 1)):
        for key, rec in meter.summary().items():
            acc = out.setdefault(key, {"calls": 0, "payload_bytes": 0, "sent_bytes": 0.0})
            acc["calls"] += rec["calls"] * times
            acc["payload_bytes"] += rec["payload_bytes"] * times
            acc["sent_bytes"] += rec["sent_bytes"] * times
    return out


def plan(model: PlanModel, mesh_spec: str | dict, *, world_size: int | None = None, zero: int = 0,
         sequence_parallel: bool = False, batch_size: int, micro_batch_size: int | None = None,
         seq_len: int, offload: bool = False, virtual_stages: int = 1, schedule: str = "1f1b") -> dict:
    """The plan as a dict (see `report` for the printed form)."""
    axes = parse_mesh(mesh_spec, world_size or _world_of(mesh_spec))
    mesh = fake_mesh(axes)
    try:
        data = mesh.size(("dp", "fsdp"))
        pp = mesh.size("pp")
        if batch_size % data:
            raise MeshError(f"--batch-size {batch_size} does not split over {data} data-parallel ranks")
        per_rank = batch_size // data
        mbs = micro_batch_size or per_rank
        if per_rank % mbs:
            raise MeshError(f"{per_rank} rows per data rank do not split into micro-batches of {mbs}")
        micro = per_rank // mbs
        if pp > 1 and model.stage_params is None:
            raise ValueError(f"{model.name}: the model plugin does not describe pipeline stages")
        stages = [plan_stage(model, mesh, zero=zero, sequence_parallel=sequence_parallel, rows=mbs,
                             seq_len=seq_len, micro_batches=micro, offload=offload, stage=s, n_stages=pp,
                             virtual=virtual_stages, schedule=schedule) for s in range(pp)]
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()
    return {"model": model.name, "num_params": model.num_params, "mesh": axes, "world_size": mesh.world_size,
            "zero": zero, "sequence_parallel": sequence_parallel, "batch_size": batch_size,
            "micro_batch_size": mbs, "micro_batches": micro, "seq_len": seq_len, "offload": offload,
            "virtual_stages": virtual_stages, "schedule": schedule if pp > 1 else None, "stages": stages}


def _world_of(spec) -> int:
    sizes = mesh_axes(spec).values()
    if -1 in sizes:
        raise MeshError("give --world-size when the mesh has a -1 axis")
    return math.prod(sizes)


def _gib(x: float) -> str:
    return f"{x / GiB:9.3f} GiB"


def report(result: dict, out=sys.stdout) -> None:
    mesh = ",".join(f"{a}={n}" for a, n in result["mesh"].items()) or "single process"
    print(f"{result['model']} ({result['num_params'] / 1e9:.2f}B parameters) on {mesh} "
          f"({result['world_size']} ranks), ZeRO {result['zero']}"
          f"{', sequence parallel' if result['sequence_parallel'] else ''}"
          f"{', optimizer offloaded' if result['offload'] else ''}", file=out)
    print(f"global batch {result['batch_size']} x {result['seq_len']} tokens; micro-batch "
          f"{result['micro_batch_size']} x {result['micro_batches']} per data rank"
          + (f"; schedule {result['schedule']} with {result['virtual_stages']} virtual stage(s)"
             if result["schedule"] else ""), file=out)
    for s in result["stages"]:
        head = f"per rank (pp stage {s['stage']})" if result["schedule"] else "per rank"
        print(f"\n{head}:", file=out)
        print(f"  parameters        {_gib(s['params_bytes'])}", file=out)
        print(f"  gradients         {_gib(s['grads_bytes'])}", file=out)
        print(f"  gradient buckets  {_gib(s['grad_bucket_bytes'])}   (reduced during backward)", file=out)
        print(f"  optimizer state   {_gib(s['optimizer_bytes'])}"
              + (f"   (+{_gib(s['host_optimizer_bytes']).strip()} in host memory)" if s["host_optimizer_bytes"] else ""),
              file=out)
        print(f"  activations       {_gib(s['activation_bytes'])}   "
              f"({_gib(s['activation_bytes_per_micro_batch']).strip()} per micro-batch x "
              f"{s['micro_batches_in_flight']} in flight)", file=out)
        print(f"  total             {_gib(s['total_bytes'])}", file=out)
        print(f"  peak              {_gib(s['peak_bytes'])}   (forward, backward, reduction, optimizer)",
              file=out)
        print(f"  communication     {_gib(s['comm_sent_bytes'])} sent per step", file=out)
        for key, rec in s["comm"].items():
            kind, n = key.split("@")
            print(f"    {kind:<15} group {n:>3}: {rec['calls']:6d} calls, {_gib(rec['sent_bytes']).strip()} sent",
                  file=out)


def load_model(spec: str, config: str, overrides: dict, precision: str, recompute: str) -> PlanModel:
    """`module` or `module:function`; the function defaults to `plan_model`."""
    module, _, fn = spec.partition(":")
    try:
        plugin = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # the plugin itself imports something missing: its bug, with its traceback
        raise cli.UserError(f"--model {spec}: no module named {e.name!r} (give an importable "
                            f"module[:function], e.g. aquila_fn.training.parallel_setup)") from None
    if not hasattr(plugin, fn or "plan_model"):
        raise cli.UserError(f"--model {spec}: module {module} has no function {fn or 'plan_model'!r}")
    return getattr(plugin, fn or "plan_model")(config, overrides, precision, recompute)


def _overrides(text: str) -> dict:
    """--model-overrides "n_layers=4,dim=512" -> {"n_layers": 4, "dim": 512}."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, eq, value = item.partition("=")
        low = value.lower()
        try:
            if not eq:
                raise ValueError
            out[key] = (low == "true") if low in ("true", "false") else (
                int(value) if value.lstrip("-").isdigit() else float(value))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not key=value with a number or "
                                             f"true/false value") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="aquila_fn.training.parallel_setup", help="plugin module[:function]")
    p.add_argument("--config", required=True, help="model preset, e.g. aquila2-34b")
    p.add_argument("--model-overrides", type=_overrides, default={}, help="e.g. n_layers=4,dim=512")
    p.add_argument("--mesh", required=True, type=mesh_spec, help="e.g. dp=8,tp=8,pp=2")
    p.add_argument("--world-size", type=cli.positive_int, default=None, help="only needed with a -1 mesh axis")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--batch-size", type=cli.positive_int, required=True, help="global batch (sequences)")
    p.add_argument("--micro-batch-size", type=cli.positive_int, default=None, help="per data rank (default: all)")
    p.add_argument("--seq-len", type=cli.positive_int, required=True)
    p.add_argument("--recompute", default="none", choices=("none", "full", "selective"))
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--virtual-stages", type=cli.positive_int, default=1)
    p.add_argument("--schedule", default="1f1b", choices=("gpipe", "1f1b", "interleaved"))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli.user_errors(parser.prog):
        result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        report(result)
    return 0


def run(args) -> dict:
    model = load_model(args.model, args.config, args.model_overrides, args.precision, args.recompute)
    schedule = "interleaved" if args.virtual_stages > 1 else args.schedule
    result = plan(model, args.mesh, world_size=args.world_size, zero=args.zero,
                  sequence_parallel=args.sequence_parallel, batch_size=args.batch_size,
                  micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                  offload=args.offload_optimizer, virtual_stages=args.virtual_stages, schedule=schedule)
    result["recompute"], result["precision"] = args.recompute, args.precision
    return result


if __name__ == "__main__":
    sys.exit(main())
