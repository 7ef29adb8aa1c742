"""How scripts/pretrain.py runs on a mesh: its parallelism flags, `ParallelSetup` (the layout,
sharded init, optimizer wrapper, train step, evaluation and failure handling behind calls that
are the identity on one process, with pipeline stages when the mesh has a pp axis), and the
`parallel.plan` plugin for Aquila (`python -m parallel.plan --model aquila_fn.training.parallel_setup`,
the default)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import parallel
from aquila_fn.core import model
from aquila_fn.core.config import ModelConfig, get_config
from aquila_fn.training import optim, pipeline_stages, train
from aquila_fn.training.sharding import (init_params, local_batch, make_layout, make_loss_sum_fn,
                                         make_train_step, ops_impl)
from parallel import cli
from parallel.layout import Layout, shard_batch
from parallel.mesh import MeshError
from parallel.zero import compute_view


# ----------------------------------------------------------------------------- planning


def plan_model(config_name: str, overrides: dict | None = None, precision: str = "bf16",
               recompute: str = "none"):
    """The `parallel.plan` plugin: Aquila's parameters, layout, loss and optimizer."""
    from unittest import mock

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
    a("--mesh", default=None, type=parallel.mesh.mesh_spec, help="named mesh over the torchrun processes, e.g. dp=2,tp=2 "
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
            setup.pipeline = pipeline_stages.PipelineOptions.from_args(args, mesh, micro)
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
        # pipeline stages hold different leaves: the norm sums over pp, counting tied copies once
        mesh = self.pipeline.mesh if self.pipeline else None
        return parallel.distributed_optimizer(optimizer, self.layout, max_grad_norm=max_grad_norm,
                                              offload=self.offload, norm_group=mesh.group("pp") if mesh else None,
                                              norm_skip=pipeline_stages.copied_paths(mesh) if mesh else ())

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
        return pipeline_stages.full_params(params, self.pipeline.mesh)

    def checkpoint_view(self, state, config: ModelConfig | None = None):
        """The state as checkpoints store it: the one-process tree (under pipeline parallelism
        see pipeline_stages.checkpoint_view)."""
        if self.pipeline is None:
            return state
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
