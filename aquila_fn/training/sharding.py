"""Aquila's parallel layouts: the sharding table, and the glue that runs the one-process train
step (aquila_fn.training.train) on a mesh. The mechanism lives in `parallel/`; this file is the data
(which weight splits how) plus a few lines of wiring.

    mesh = parallel.make_mesh("dp=2,tp=2")
    layout = sharding.make_layout(mesh, zero=1, sequence_parallel=True)
    params = sharding.init_params(config, seed, layout)           # == shard(init_params(...))
    opt = parallel.distributed_optimizer(optim.adamw(...), layout, max_grad_norm=1.0)
    state = train.init_train_state(params, opt, precision="fp32")
    step = sharding.make_train_step(config, opt, layout, micro_batches=1, precision="fp32")
    state, metrics = step(state, sharding.local_batch(global_batch, layout))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

import parallel
from aquila_fn.core import model
from aquila_fn.training import train
from aquila_fn.core.config import ModelConfig
from parallel import cli
from parallel.grads import GradReducer
from parallel.layout import Layout, local_rows, local_value, shard_batch
from parallel.mesh import MeshError
from parallel.zero import ReshardAfterForward, compute_view, needs_gather

# Megatron tensor parallelism: column-split q/k/v and gate/up (dim 0 = output features over
# tp), row-split o and down (dim 1 = input features over tp), vocabulary-parallel embedding and
# output projection (dim 0 = vocabulary over tp). `fsdp` marks the other dim, the one the data
# axis splits under ZeRO / FSDP. Merged projections (wqkv, w_gate_up) split like their parts
# would only if the split fell on part boundaries, so they stay column-split as one matrix:
# correct (DTensor moves what it must), but use unmerged weights for tensor parallelism.
RULES = (
    (r"^(embed|lm_head)$", ("tp", "fsdp")),
    (r"\.attn\.(wq|wk|wv|wqkv)$", ("tp", "fsdp")),
    (r"\.attn\.wo$", ("fsdp", "tp")),
    (r"\.mlp\.(w_gate|w_up|w_gate_up)$", ("tp", "fsdp")),
    (r"\.mlp\.w_down$", ("fsdp", "tp")),
    (r"(^|\.)(attn_norm|mlp_norm|norm)$", ("fsdp",)),
)

# The list of per-layer trees: gathered layer by layer (ZeRO-3 prefetch), split across stages (pp).
LAYERS = "layers"


def make_layout(mesh: parallel.Mesh, *, zero: int = 0, sequence_parallel: bool = False,
                rules=RULES) -> Layout:
    """The Aquila layout on `mesh` (an fsdp axis is ZeRO stage 3 over that axis by definition)."""
    return Layout(mesh, rules, zero=zero, sequence_parallel=sequence_parallel)


def init_params(config: ModelConfig, seed: int, layout: Layout, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None) -> Any:
    """Sharded initialisation, equal to `shard(model.init_params(config, seed), layout)`: each
    leaf is generated from (seed, path) as one process would, sliced, and dropped. Leaves are
    materialised on `device` (default: the mesh's device type)."""
    shapes = model.param_shapes(config, dtype)
    device = layout.mesh.device if device is None else device
    return parallel.materialize(
        shapes, lambda path, meta: model.init_leaf(path, meta.shape, config, seed, dtype, device), layout)


def local_batch(batch: dict, layout: Layout) -> dict:
    """This rank's rows of a global batch (every rank of a tp group gets the same rows)."""
    return local_rows(batch, layout)


def ops_impl(layout: Layout, impl: str = "auto") -> str:
    """Kernel choice under a mesh: the one-process choice. The ops run their kernels on each
    rank's local blocks where the placements allow (attention over batch and heads, norms,
    rotary and swiglu over rows, the fused cross-entropy over rows and, under tp,
    vocabulary-parallel) and the reference math on DTensors elsewhere."""
    return impl


@dataclass
class _StepContext:
    """What the loss needs to know about the whole step (set before train.py's step runs)."""

    factor: float = 1.0           # n_local / n_global: turns train.py's local weights global
    n_global: int = 0             # tokens the loss counts in the whole (global) batch
    raw_sums: list = field(default_factory=list)


def _all_reduce(value: float, layout: Layout, dtype=torch.float64) -> float:
    t = torch.tensor(value, dtype=dtype)
    for axis in layout.data_axes:
        dist.all_reduce(t, group=layout.mesh.group(axis))
    return t.item()


def make_loss_sum_fn(layout: Layout, *, reducer: GradReducer | None = None,
                     context: _StepContext | None = None, compile_layers: bool | str = False) -> Callable:
    """`loss_sum(params, local_batch, config, **kw) -> (local loss sum, local tokens)` computed
    on the mesh: parameters gathered for computation (ZeRO-3 with prefetch, resharded after
    forward: backward gathers each saved weight again, see ReshardAfterForward), the batch split
    over the data axes, the model run on DTensors (each layer compiled with `compile_layers`).
    Returns this rank's partial sums as plain tensors (the gradient flows back into the DTensor
    parameters). With `reducer`, gradients are reduced in its buckets while backward runs
    (ZeRO-3's reduce-scatters included)."""

    def loss_sum(params, batch, config, **kw):
        kw["impl"] = ops_impl(layout, kw.get("impl", "auto"))
        kw.setdefault("compile_layers", compile_layers)
        with layout.activate():
            if reducer is not None:
                reducer.watch(params)
            with ReshardAfterForward() if needs_gather(layout) else contextlib.nullcontext() as reshard:
                p = compute_view(params, layout, stream=LAYERS, reshard=reshard, dtype=kw.get("compute_dtype"),
                                 reducer=reducer if reducer is not None and reducer.overlap else None)
                total, n = model.loss_sum_fn(p, shard_batch(batch, layout), config, **kw)
            total, n = local_value(total), local_value(n)
        if context is not None:
            context.raw_sums.append(total.detach())
            total = total * context.factor
        return total, n

    return loss_sum


def make_train_step(config: ModelConfig, optimizer, layout: Layout, *, micro_batches: int = 1,
                    precision: str = "fp32", recompute: str = "none", compile: bool | str = False,
                    impl: str = "auto", overlap: bool = True,
                    bucket_bytes: int = 25 << 20, **kwargs) -> Callable:
    """`train.make_train_step` on a mesh; `step(state, local_batch) -> (state, metrics)`.

    The loss is token-weighted over the *global* batch (every rank's share scaled by
    n_local / n_global), gradients are reduced in buckets during backward (`overlap`; with
    micro-batches, during the last one's backward, ZeRO-3's reduce-scatters during each; see
    parallel.grads), and the metrics are global. On one process it is exactly
    `train.make_train_step`.
    """
    if layout.trivial:
        return train.make_train_step(config, optimizer, micro_batches=micro_batches, precision=precision,
                                     recompute=recompute, compile=compile, impl=impl, **kwargs)
    if compile and recompute == "selective":
        # torch 2.13's AOTAutograd fails on the checkpointed attention core of a compiled layer
        # over DTensors (the recomputed region's saved values include a DeviceMesh)
        raise MeshError("compile on a mesh compiles each layer, which does not work with recompute="
                         "'selective' there; use recompute 'full' or 'none' with it")
    reducer = GradReducer(layout, bucket_bytes=bucket_bytes, overlap=overlap)
    context = _StepContext()

    def grad_transform(grads, loss_sum, n_tokens):
        grads = reducer.finish(grads)
        raw = sum(float(s) for s in context.raw_sums)
        return grads, torch.tensor(_all_reduce(raw, layout)), torch.tensor(context.n_global)

    inner = train.make_train_step(
        config, optimizer, micro_batches=micro_batches, precision=precision, recompute=recompute,
        # The step is not one graph here (the loss registers gradient hooks and gathers layers
        # lazily): `compile` compiles each layer instead (regional compilation).
        compile=False, impl=impl,
        loss_sum_fn=make_loss_sum_fn(layout, reducer=reducer, context=context, compile_layers=compile),
        grad_transform=grad_transform, **kwargs)

    def step(state, batch):
        n_local = int(train.count_tokens(batch))
        context.n_global = int(_all_reduce(n_local, layout))
        context.factor = n_local / max(context.n_global, 1)
        context.raw_sums.clear()
        reducer.begin_step(micro_batches, scale=float(state["loss_scale"]["scale"]))
        with layout.activate():
            return inner(state, batch)

    return step


# ----------------------------------------------------------------------------- planning


def plan_model(config_name: str, overrides: dict | None = None, precision: str = "bf16",
               recompute: str = "none"):
    """The `parallel.plan` plugin: Aquila's parameters, layout, loss and optimizer."""
    from unittest import mock

    from aquila_fn.training import optim, pipeline_stages
    from aquila_fn.core.config import get_config
    from parallel.plan import PlanModel

    config = get_config(config_name, **(overrides or {}))
    compute_dtype = train.get_precision(precision).compute_dtype

    def init(layout):
        shapes = model.param_shapes(config, torch.float32)  # fp32 master weights
        return parallel.materialize(shapes, lambda path, meta: meta, layout)

    def loss(layout):
        loss_sum = make_loss_sum_fn(layout)

        def fn(params, batch):
            # Token ids on meta cannot be range-checked (no values): skip that one check.
            with mock.patch.object(model, "check_tokens", lambda *a, **k: None):
                total, n = loss_sum(params, batch, config, compute_dtype=compute_dtype, recompute=recompute)
            return total

        return fn

    def batch(rows, seq_len):
        ids = torch.zeros((rows, seq_len), dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": ids.clone()}

    def boundary_bytes(rows, seq_len):
        return rows * seq_len * config.dim * (compute_dtype or torch.float32).itemsize

    return PlanModel(name=config_name, make_layout=make_layout, init_params=init, loss=loss, batch=batch,
                     optimizer=lambda: optim.adamw(1e-4, max_grad_norm=1.0),
                     stage_params=pipeline_stages.plan_stage_params(config),
                     stage_loss=pipeline_stages.plan_stage_loss(config, compute_dtype, recompute),
                     shared=pipeline_stages.plan_shared(config),
                     boundary_bytes=boundary_bytes, num_params=config.num_params())


# ----------------------------------------------------------------------------- scripts/pretrain.py


def add_arguments(parser) -> None:
    """The parallelism flags of scripts/pretrain.py."""
    a = parser.add_argument
    a("--mesh", default=None, type=cli.mesh_spec, help="named mesh over the torchrun processes, e.g. dp=2,tp=2 "
      "(axes pp, dp, fsdp, tp; fsdp = ZeRO-3; one axis may be -1). Default: data parallel over all")
    a("--zero", type=int, choices=(0, 1, 2, 3), default=0,
      help="ZeRO stage over dp: 1 shards optimizer state, 2 also gradients, 3 also parameters")
    a("--sequence-parallel", action="store_true", help="split the norm regions' sequence over tp")
    a("--virtual-stages", type=cli.positive_int, default=1, help="pipeline stages per pp rank (interleaved 1F1B)")
    a("--pp-schedule", choices=("gpipe", "1f1b", "interleaved"), default="1f1b",
      help="pipeline schedule (interleaved when --virtual-stages > 1)")
    a("--offload-optimizer", action="store_true",
      help="keep optimizer state and its update in host memory (ZeRO-Offload)")
    a("--dist-timeout", type=cli.positive_float, default=parallel.mesh.DEFAULT_TIMEOUT_S,
      help="seconds before a stalled collective (dead or stuck peer) ends every process")


class ParallelSetup:
    """Everything pretrain.py needs to run on a mesh, behind a few calls that are the identity
    on one process: the layout, sharded init, the optimizer wrapper, the train step, batch
    rows, evaluation, gathering for samples, and failing loudly instead of hanging."""

    def __init__(self, layout: Layout, *, offload: bool = False, timeout_s: float = 300.0,
                 device: str | torch.device | None = None):
        self.layout, self.offload, self.timeout_s = layout, offload, timeout_s
        # where this process's parameters and batches live (default: the mesh type's current device)
        self.device = torch.device(device) if device is not None else _current(layout.mesh.device)
        self.watchdog = None  # set by guard(); train steps and evaluations pet it
        self.pipeline = None  # pipeline_stages.PipelineOptions, when the mesh has a pp axis
        self._staged = None  # pipeline_stages.StagedModel, once built by init_params

    def _pet(self) -> None:
        if self.watchdog is not None:
            self.watchdog.pet()

    @classmethod
    def from_args(cls, args) -> "ParallelSetup":
        mesh = parallel.make_mesh(getattr(args, "mesh", None), timeout_s=getattr(args, "dist_timeout", 300.0),
                                  device=getattr(args, "device", None))
        layout = make_layout(mesh.without("pp"), zero=getattr(args, "zero", 0),
                             sequence_parallel=getattr(args, "sequence_parallel", False))
        setup = cls(layout, offload=getattr(args, "offload_optimizer", False),
                    timeout_s=getattr(args, "dist_timeout", 300.0), device=getattr(args, "device", None))
        micro = args.batch_size // (args.micro_batch_size or args.batch_size)
        if mesh.has("pp") or getattr(args, "virtual_stages", 1) > 1:
            from aquila_fn.training.pipeline_stages import PipelineOptions

            setup.pipeline = PipelineOptions.from_args(args, mesh, micro)
        if args.batch_size % (layout.data_size * micro):
            raise MeshError(f"--batch-size {args.batch_size} does not split into {micro} micro-batches "
                            f"on each of {layout.data_size} data-parallel ranks")
        return setup

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, plots and prints; every rank writes its checkpoint shards."""
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.layout.mesh.world_size * (self.pipeline.mesh.size("pp") if self.pipeline else 1)

    @property
    def rank(self) -> int:
        return self.pipeline.mesh.rank if self.pipeline else self.layout.mesh.rank

    def wrap_optimizer(self, optimizer, max_grad_norm: float | None):
        from aquila_fn.training.pipeline_stages import copied_paths

        # pipeline stages hold different leaves: the norm sums over pp, counting tied copies once
        mesh = self.pipeline.mesh if self.pipeline else None
        return parallel.distributed_optimizer(optimizer, self.layout, max_grad_norm=max_grad_norm,
                                              offload=self.offload, norm_group=mesh.group("pp") if mesh else None,
                                              norm_skip=copied_paths(mesh) if mesh else ())

    def init_params(self, config: ModelConfig, seed: int):
        if self.pipeline is None:
            return init_params(config, seed, self.layout, device=self.device)
        self._staged = self.pipeline.build(config, seed, self.layout)  # a collective
        return self._staged.params

    def _pipeline_part(self):
        if self._staged is None:
            raise RuntimeError("init_params builds the pipeline: call it before make_train_step")
        return self._staged

    def make_train_step(self, config: ModelConfig, optimizer, **kwargs):
        if self.pipeline is not None:
            from aquila_fn.training import pipeline_stages

            staged = self._pipeline_part()
            pipeline_step = pipeline_stages.make_train_step(staged, optimizer)

            def inner(state, batch):  # a resumed state brings its own tensors: adopt their values
                return pipeline_step({**state, "params": pipeline_stages.adopt(staged, state["params"])}, batch)
        else:
            inner = make_train_step(config, optimizer, self.layout, **kwargs)

        def step(state, batch):
            out = inner(state, batch)
            self._pet()
            return out

        return step

    def local_batch(self, batch: dict) -> dict:
        return local_batch(batch, self.layout)

    def make_eval_loss(self, config: ModelConfig, *, precision: str = "bf16", impl: str = "auto"):
        if self.pipeline is not None:
            from aquila_fn.training import pipeline_stages

            return pipeline_stages.make_eval_loss(self._pipeline_part(), self._pet)
        if self.layout.trivial:
            return train.make_eval_loss(config, precision=precision, impl=impl)
        dtype = train.get_precision(precision).compute_dtype
        layout = self.layout

        @torch.no_grad()
        def eval_loss(params, batches) -> float:
            total, count = 0.0, 0
            with layout.activate():
                p = compute_view(params, layout)
                for batch in batches:  # the same global batches on every rank; each takes its rows
                    s, n = model.loss_sum_fn(p, shard_batch(batch, layout, local=False), config,
                                             compute_dtype=dtype, impl=ops_impl(layout, impl))
                    total += float(s.full_tensor() if hasattr(s, "full_tensor") else s)
                    count += int(n.full_tensor() if hasattr(n, "full_tensor") else n)
                    self._pet()
            return total / max(count, 1)

        return eval_loss

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on any (e.g. a stop signal seen by one rank)."""
        if self.layout.trivial:
            return bool(flag)
        t = torch.tensor(int(bool(flag)))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def full_params(self, params):
        """Unsharded parameters on every rank (a collective: call it on all ranks)."""
        if self.pipeline is None:
            return parallel.gather(params)
        from aquila_fn.training import pipeline_stages

        return pipeline_stages.full_params(params, self.pipeline.mesh)

    def checkpoint_view(self, state, config: ModelConfig | None = None):
        """The state as checkpoints store it: the one-process tree (under pipeline parallelism
        see pipeline_stages.checkpoint_view)."""
        if self.pipeline is None:
            return state
        from aquila_fn.training import pipeline_stages

        return pipeline_stages.checkpoint_view(state, self._pipeline_part().config, self.pipeline.mesh)

    def guard(self):
        """A failed collective or a stalled step ends this process with one clear line."""
        import contextlib

        from parallel.faults import Watchdog, guard

        if self.layout.trivial:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(guard("pretraining"))
        self.watchdog = stack.enter_context(Watchdog(max(3 * self.timeout_s, 60.0), "train step"))
        stack.callback(setattr, self, "watchdog", None)
        return stack


def place_like(loaded: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """A full tensor from a checkpoint placed like `template` (resharding on resume), on the
    template's device whichever device it was saved from."""
    placed = parallel.shard_like(loaded, template)
    if type(placed) is torch.Tensor and placed.device != template.device:
        placed = placed.to(template.device)
    return placed


def _current(kind: str) -> torch.device:
    """`kind` with the index of the current device of that type ('cuda' -> cuda:N)."""
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, getattr(torch, kind).current_device())
