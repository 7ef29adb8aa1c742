"""Aquila's parallel layouts: the sharding table, and the glue that runs the one-process train
step (aquila_fn.train) on a mesh. The mechanism lives in `parallel/`; this file is the data
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
from aquila_fn import model, train
from aquila_fn.config import ModelConfig
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


def init_params(config: ModelConfig, seed: int, layout: Layout, *, dtype: torch.dtype = torch.float32) -> Any:
    """Sharded initialisation, equal to `shard(model.init_params(config, seed), layout)`: each
    leaf is generated from (seed, path) as one process would, sliced, and dropped."""
    shapes = model.param_shapes(config, dtype)
    return parallel.materialize(
        shapes, lambda path, meta: model.init_leaf(path, meta.shape, config, seed, dtype), layout)


def local_batch(batch: dict, layout: Layout) -> dict:
    """This rank's rows of a global batch (every rank of a tp group gets the same rows)."""
    return local_rows(batch, layout)


def ops_impl(layout: Layout, impl: str = "auto") -> str:
    """Kernel choice under a mesh: the reference ops. They are plain torch ops, which DTensor
    propagates, and the reference cross-entropy under a tp axis is the vocabulary-parallel one;
    the fast paths are not DTensor-aware (no sharding rule for the CPU flash-attention kernel,
    the chunked fused cross-entropy is a custom autograd function over plain tensors).
    Attention split over batch and heads runs its reference math on each rank's local blocks
    (ops.attention); parallel.plan's dry run on meta tensors then counts the same memory."""
    if layout.trivial or impl != "auto":
        return impl
    return "reference"


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
                     context: _StepContext | None = None) -> Callable:
    """`loss_sum(params, local_batch, config, **kw) -> (local loss sum, local tokens)` computed
    on the mesh: parameters gathered for computation (ZeRO-3 with prefetch, resharded after
    forward: backward gathers each saved weight again, see ReshardAfterForward), the batch split
    over the data axes, the model run on DTensors. Returns this rank's partial sums as plain
    tensors (the gradient flows back into the DTensor parameters)."""

    def loss_sum(params, batch, config, **kw):
        kw["impl"] = ops_impl(layout, kw.get("impl", "auto"))
        with layout.activate():
            if reducer is not None:
                reducer.watch(params)
            with ReshardAfterForward() if needs_gather(layout) else contextlib.nullcontext() as reshard:
                p = compute_view(params, layout, stream=LAYERS, reshard=reshard, dtype=kw.get("compute_dtype"))
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
    n_local / n_global), gradients are reduced during backward in buckets when there is one
    micro-batch (`overlap`), and the metrics are global. On one process it is exactly
    `train.make_train_step`.
    """
    if layout.trivial:
        return train.make_train_step(config, optimizer, micro_batches=micro_batches, precision=precision,
                                     recompute=recompute, compile=compile, impl=impl, **kwargs)
    # Hooks would see each micro-batch's gradient before train.py adds them up, and an fp16
    # loss scale is divided out after backward: in those cases reduce after backward instead.
    reducer = GradReducer(layout, bucket_bytes=bucket_bytes,
                          overlap=overlap and micro_batches == 1 and precision != "fp16")
    context = _StepContext()

    def grad_transform(grads, loss_sum, n_tokens):
        grads = reducer.finish(grads)
        raw = sum(float(s) for s in context.raw_sums)
        return grads, torch.tensor(_all_reduce(raw, layout)), torch.tensor(context.n_global)

    inner = train.make_train_step(
        config, optimizer, micro_batches=micro_batches, precision=precision, recompute=recompute,
        # DTensor programs are run eagerly here: the loss registers hooks and gathers layers
        # lazily, which a fullgraph compile cannot trace.
        compile=False, impl=impl,
        loss_sum_fn=make_loss_sum_fn(layout, reducer=reducer, context=context),
        grad_transform=grad_transform, **kwargs)

    def step(state, batch):
        n_local = int(train.count_tokens(batch))
        context.n_global = int(_all_reduce(n_local, layout))
        context.factor = n_local / max(context.n_global, 1)
        context.raw_sums.clear()
        with layout.activate():
            return inner(state, batch)

    return step


# ----------------------------------------------------------------------------- planning


def plan_model(config_name: str, overrides: dict | None = None, precision: str = "bf16",
               recompute: str = "none"):
    """The `parallel.plan` plugin: Aquila's parameters, layout, loss and optimizer."""
    from unittest import mock

    from aquila_fn import optim
    from aquila_fn.config import get_config
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

    def stage_params(params, stage, n_stages):
        keys = _stage_shapes(config, stage, n_stages)
        out = {k: params[k] for k in keys if k != "layers"}
        out["layers"] = {i: params["layers"][int(i)] for i in keys["layers"]}
        return {k: out[k] for k in keys}

    def stage_loss(layout, stage, n_stages):
        first, last, _ = _stage_parts(config, stage, n_stages)
        fn = _stage_fn(config, layout, stage, n_stages, compute_dtype=compute_dtype, impl="auto",
                       recompute=recompute)
        head_loss = _pipeline_loss(config, layout, lambda: holder["params"]["lm_head"], _PipeContext(), "auto")
        holder: dict = {}

        def run(params, batch):
            ids = batch["input_ids"]
            if first:
                x = ids
            else:  # the activation received from the previous stage (its gradient is sent back)
                x = torch.zeros((*ids.shape, config.dim), dtype=compute_dtype or torch.float32,
                                device=ids.device, requires_grad=True)
            out = fn(params, x)
            if last:
                holder["params"] = params
                return head_loss(out, batch["labels"])
            return out.float().sum()

        return run

    def boundary_bytes(rows, seq_len):
        return rows * seq_len * config.dim * (compute_dtype or torch.float32).itemsize

    return PlanModel(name=config_name, make_layout=make_layout, init_params=init, loss=loss, batch=batch,
                     optimizer=lambda: optim.adamw(1e-4, max_grad_norm=1.0), stage_params=stage_params,
                     stage_loss=stage_loss, boundary_bytes=boundary_bytes, num_params=config.num_params())


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

    def __init__(self, layout: Layout, *, offload: bool = False, timeout_s: float = 300.0):
        self.layout, self.offload, self.timeout_s = layout, offload, timeout_s
        self.watchdog = None  # set by guard(); train steps and evaluations pet it
        self.pipeline: _PipelineOptions | None = None  # set when the mesh has a pp axis
        self._pipe = None  # (pipeline, context) once built by init_params

    def _pet(self) -> None:
        if self.watchdog is not None:
            self.watchdog.pet()

    @classmethod
    def from_args(cls, args) -> "ParallelSetup":
        mesh = parallel.make_mesh(getattr(args, "mesh", None), timeout_s=getattr(args, "dist_timeout", 300.0))
        layout = make_layout(mesh.without("pp"), zero=getattr(args, "zero", 0),
                             sequence_parallel=getattr(args, "sequence_parallel", False))
        setup = cls(layout, offload=getattr(args, "offload_optimizer", False),
                    timeout_s=getattr(args, "dist_timeout", 300.0))
        micro = args.batch_size // (args.micro_batch_size or args.batch_size)
        if mesh.has("pp") or getattr(args, "virtual_stages", 1) > 1:
            setup.pipeline = _PipelineOptions.from_args(args, mesh, micro)
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
        group = self.pipeline.mesh.group("pp") if self.pipeline else None
        return parallel.distributed_optimizer(optimizer, self.layout, max_grad_norm=max_grad_norm,
                                              offload=self.offload, norm_group=group)

    def init_params(self, config: ModelConfig, seed: int):
        if self.pipeline is None:
            return init_params(config, seed, self.layout)
        o, self._config = self.pipeline, config
        params, pipe, _, context = make_pipeline(
            config, seed, o.mesh, zero=self.layout.zero, sequence_parallel=self.layout.sequence_parallel,
            virtual_stages=o.virtual_stages, schedule=o.schedule, micro_batches=o.micro_batches,
            precision=o.precision, recompute=o.recompute, impl=o.impl)
        self._pipe = (pipe, context)
        return params

    def make_train_step(self, config: ModelConfig, optimizer, **kwargs):
        if self.pipeline is not None:
            if self._pipe is None:
                raise RuntimeError("init_params builds the pipeline: call it before make_train_step")
            pipe, context = self._pipe
            pipeline_step = make_pipeline_train_step(config, optimizer, self.pipeline.mesh, pipe,
                                                     self.layout, context)

            def inner(state, batch):  # a resumed state brings its own tensors: adopt their values
                return pipeline_step({**state, "params": adopt(pipe, state["params"])}, batch)
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
            return lambda params, batches: None  # validation through the pipeline: not yet
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
        full = parallel.gather(params)
        if self.pipeline is None:
            return full
        parts = [None] * self.pipeline.mesh.size("pp")  # each stage holds different leaves
        dist.all_gather_object(parts, full, group=self.pipeline.mesh.group("pp"))
        merged = _merge(parts)
        merged["layers"] = [merged["layers"][str(i)] for i in range(len(merged["layers"]))]
        return merged

    def checkpoint_view(self, state, config: ModelConfig | None = None):
        """The state as checkpoints store it. Under pipeline parallelism each rank holds only its
        stages' leaves; the view has the whole tree's structure, with this rank's leaves as blocks
        of the full tensors and the others as empty blocks, so every rank file describes the
        same tree and loading merges them."""
        if self.pipeline is None:
            return state
        return _pipeline_checkpoint_view(state, self._config)

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
    """A full tensor from a checkpoint placed like `template` (resharding on resume)."""
    return parallel.shard_like(loaded, template)


# ----------------------------------------------------------------------------- pipeline parallelism


def _stage_parts(config: ModelConfig, stage: int, n_stages: int) -> tuple[bool, bool, range]:
    from parallel.pipeline import stage_bounds

    lo, hi = stage_bounds(config.n_layers, n_stages)[stage]
    return stage == 0, stage == n_stages - 1, range(lo, hi)


def _stage_shapes(config: ModelConfig, stage: int, n_stages: int) -> dict:
    """The parameter shapes stage `stage` holds, keyed by their one-process paths
    (`layers` becomes a dict {"3": layer} so a leaf's path stays `layers.3.attn.wq`)."""
    full = model.param_shapes(config)
    first, last, layers = _stage_parts(config, stage, n_stages)
    out: dict = {}
    if first:
        out["embed"] = full["embed"]
    out["layers"] = {str(i): full["layers"][i] for i in layers}
    if last:
        out["norm"] = full["norm"]
        out["lm_head"] = full["lm_head"]
    return out


def _merge(trees: list[dict]) -> dict:
    out: dict = {}
    for t in trees:
        for k, v in t.items():
            if k == "layers":
                out.setdefault("layers", {}).update(v)
            else:
                out[k] = v
    return out


@dataclass
class _PipeContext:
    weight: float = 1.0  # 1 / global tokens


def _stage_fn(config: ModelConfig, layout: Layout, stage: int, n_stages: int, *, compute_dtype,
              impl: str, recompute: str) -> Callable:
    """fn(params, x) of one pipeline stage: token ids (first stage) or the hidden state in, the
    hidden state out (after the final norm on the last stage), as plain local tensors; inside, the
    model's own layer code runs on DTensors over the stage's mesh."""
    from parallel.layout import constrain

    first, last, layers = _stage_parts(config, stage, n_stages)
    impl = ops_impl(layout, impl)

    def to_mesh(x, spec):
        if layout.trivial:
            return x
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(x, layout.device_mesh, layout.placements(spec, x.dim(), "act"), run_check=False)

    def fn(params, x):
        with layout.activate():
            p = compute_view(params, layout)
            if first:
                dtype = compute_dtype or p["embed"].dtype
                h = model.embed(p, to_mesh(x, ("batch", None)), dtype)
            else:
                h = constrain(to_mesh(x, model.FULL_SEQ), model.RESIDUAL)
                dtype = h.dtype
            cos, sin = model.rotary_tables(config, torch.arange(h.shape[1], device=x.device), dtype)
            h = model.run_layers([p["layers"][str(i)] for i in layers], h, cos, sin, config, impl=impl,
                                 recompute=recompute)
            h = model.final_norm(p, h, config, impl) if last else constrain(h, model.FULL_SEQ)
            return h.to_local() if hasattr(h, "to_local") else h

    return fn


def _pipeline_loss(config: ModelConfig, layout: Layout, head: Callable, context: _PipeContext, impl: str):
    """loss_fn(hidden, labels) of the last stage: this rank's share of the token-weighted mean."""
    import ops

    impl = ops_impl(layout, impl)

    def loss_fn(hidden, labels):
        with layout.activate():
            if not layout.trivial:
                from torch.distributed.tensor import DTensor

                mesh = layout.device_mesh
                hidden = DTensor.from_local(hidden, mesh, layout.placements(model.FULL_SEQ, 3, "act"), run_check=False)
                labels = DTensor.from_local(labels, mesh, layout.placements(("batch", None), 2, "act"), run_check=False)
            w = head()
            w = compute_view({"w": w}, layout)["w"] if not layout.trivial else w
            total, _ = ops.cross_entropy(hidden.reshape(-1, hidden.shape[-1]), w.to(hidden.dtype),
                                         labels.reshape(-1), impl=impl)
            return local_value(total) * context.weight

    return loss_fn


def make_pipeline(config: ModelConfig, seed: int, mesh: parallel.Mesh, *, zero: int = 0,
                  sequence_parallel: bool = False, virtual_stages: int = 1, schedule: str = "1f1b",
                  micro_batches: int = 1, precision: str = "fp32", recompute: str = "none",
                  impl: str = "auto"):
    """(params, pipeline, layout, context) for this rank: the parameters of its stages (sharded
    over the stage's mesh, initialised as one process would), and the schedule over them."""
    from parallel.pipeline import Pipeline, rank_stages

    if config.tie_embeddings:
        raise MeshError("pipeline parallelism needs untied embeddings (tie_embeddings=False): the "
                        "first and last stages would share one matrix")
    pp = mesh.size("pp")
    layout = make_layout(mesh.without("pp"), zero=zero, sequence_parallel=sequence_parallel)
    n_stages = pp * virtual_stages
    mine = rank_stages(mesh.rank_in("pp"), pp, virtual_stages)
    compute_dtype = train.get_precision(precision).compute_dtype
    context = _PipeContext()
    stages = []
    for s in mine:
        shapes = _stage_shapes(config, s, n_stages)
        params = parallel.materialize(
            shapes, lambda path, meta: model.init_leaf(path, meta.shape, config, seed), layout)
        stages.append((s, params, _stage_fn(config, layout, s, n_stages, compute_dtype=compute_dtype,
                                            impl=impl, recompute=recompute)))
    holder: dict = {}
    loss_fn = _pipeline_loss(config, layout, lambda: holder["pipe"].modules[-1].tree()["lm_head"],
                             context, impl)
    pipe = Pipeline(stages, n_stages, mesh.group("pp"), "interleaved" if virtual_stages > 1 else schedule,
                    micro_batches, loss_fn, device=mesh.device)
    holder["pipe"] = pipe
    params = _merge(pipe.params())
    return params, pipe, layout, context


def make_pipeline_train_step(config: ModelConfig, optimizer, mesh: parallel.Mesh, pipe, layout: Layout,
                             context: _PipeContext) -> Callable:
    """`step(state, local_batch) -> (state, metrics)` through the pipeline schedule: one
    forward/backward over the micro-batches (gradients in the parameters' .grad), data-parallel
    reduction within the stage mesh, one optimizer step on this rank's leaves."""
    from aquila_fn import optim

    pp_group = mesh.group("pp")

    def data_sum(value: float, group_pp: bool = False) -> float:
        t = torch.tensor(value, dtype=torch.float64)
        for axis in layout.data_axes:
            dist.all_reduce(t, group=layout.mesh.group(axis))
        if group_pp:
            dist.all_reduce(t, group=pp_group)
        return t.item()

    def step(state, batch):
        n_global = data_sum(float(train.count_tokens(batch)))
        context.weight = 1.0 / max(n_global, 1.0)
        pipe.zero_grad()
        with layout.activate():
            losses = pipe.step(batch["input_ids"], batch["labels"])
            params = state["params"]
            grads = parallel.tree.map_with_path(
                lambda p, x: x.grad if x.grad is not None else torch.zeros_like(x), params)
            grads = parallel.reduce_gradients(grads, layout)
            grad_norm = float(parallel.global_grad_norm(grads, pp_group))
            lr = optim.learning_rate(optimizer, state["opt_state"])
            params, opt_state = optim.step(optimizer, params, grads, state["opt_state"])
        local = sum(float(l.detach()) for l in losses) * n_global  # this rank's loss sum (last stage only)
        loss_sum = data_sum(local, group_pp=True)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss_sum / max(n_global, 1.0), "grad_norm": grad_norm, "lr": lr,
                   "n_tokens": int(n_global), "skipped": 0, "loss_scale": 1.0}
        return new_state, metrics

    return step


@dataclass
class _PipelineOptions:
    mesh: parallel.Mesh
    virtual_stages: int
    schedule: str
    micro_batches: int
    precision: str
    recompute: str
    impl: str

    @classmethod
    def from_args(cls, args, mesh: parallel.Mesh, micro_batches: int) -> "_PipelineOptions":
        precision = train.default_precision("cpu") if args.precision == "auto" else args.precision
        if precision == "fp16":
            raise MeshError("pipeline parallelism runs bf16 or fp32 (fp16 loss scaling is not wired "
                            "through the pipeline schedules)")
        if not mesh.has("pp"):
            raise MeshError("--virtual-stages needs a pp axis in --mesh (e.g. --mesh pp=2)")
        schedule = "interleaved" if args.virtual_stages > 1 else args.pp_schedule
        return cls(mesh, args.virtual_stages, schedule, micro_batches, precision, args.recompute,
                   getattr(args, "impl", "auto"))


def adopt(pipe, params: dict) -> dict:
    """The pipeline modules' parameters, holding the values of `params` (a state restored from a
    checkpoint brings new tensors; the schedule runs the modules' own)."""
    own = _merge(pipe.params())
    with torch.no_grad():
        def copy(path, mine, given):
            if mine is not given:
                mine.copy_(given)
            return mine

        return parallel.tree.map_with_path(copy, own, params)


def _pipeline_checkpoint_view(state: Any, config: ModelConfig) -> Any:
    """See ParallelSetup.checkpoint_view."""
    from aquila_fn.checkpoint import LocalShard

    full = model.param_shapes(config)

    def empty(meta) -> LocalShard:
        shape = tuple(meta.shape)
        return LocalShard(torch.empty((0,) + shape[1:], dtype=meta.dtype), shape, (0,) * len(shape))

    def owned(x):
        if isinstance(x, torch.Tensor) and not hasattr(x, "placements"):
            return LocalShard(x.detach(), tuple(x.shape), (0,) * x.dim())  # written by its owner
        return x

    def mirror(tree: dict) -> dict:
        """A params-shaped dict (params, Adam moments) completed to the whole model."""
        out = {}
        for key, meta in full.items():
            if key == "layers":
                mine = tree.get("layers", {})
                out["layers"] = [parallel.tree.map_with_path(lambda p, x: owned(x), mine[str(i)]) if str(i) in mine
                                 else parallel.tree.map_with_path(lambda p, m: empty(m), meta[i])
                                 for i in range(len(meta))]
            else:
                out[key] = owned(tree[key]) if key in tree else empty(meta)
        return out

    def walk(node):
        if isinstance(node, dict):
            if "layers" in node and isinstance(node["layers"], dict):
                return mirror(node)
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node

    return walk(state)
