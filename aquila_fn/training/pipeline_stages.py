"""Aquila split into pipeline stages along the mesh's `pp` axis (Megatron's pipeline
parallelism), on parallel.pipeline's schedules (GPipe, 1F1B, interleaved 1F1B).

    staged = pipeline_stages.make_pipeline(config, seed, mesh, micro_batches=4, precision="fp16")
    opt = parallel.distributed_optimizer(adamw(...), staged.layout, norm_group=mesh.group("pp"),
                                         norm_skip=copied_paths(mesh))
    state = train.init_train_state(staged.params, opt, precision="fp16")
    step = pipeline_stages.make_train_step(staged, opt)       # step(state, local batch)
    eval_loss = pipeline_stages.make_eval_loss(staged)        # eval_loss(params, global batches)

- The first stage holds the embedding, the last the final norm and the output layer, the layers
  are split evenly; a leaf keeps its one-process path (`layers.3.attn.wq`).
- Tied embeddings as in Megatron: the last stage's output layer is a copy of the first stage's
  `embed` (same path, same initial values). After backward the two copies' gradients are
  summed over the first and last pp ranks (parallel.pipeline.SharedLeaves), so one optimizer
  step keeps them identical; the gradient norm and checkpoints count the first stage's copy
  only, so a checkpoint holds one matrix and loads into any mesh, with or without pp.
- Stages run the model's own layer code on DTensors over the rest of the mesh (data, ZeRO,
  tensor and sequence parallelism within a stage) and hand plain tensors to each other.
- fp16 trains with dynamic loss scaling: the loss scale is folded into the loss weight, and the
  overflow verdict is agreed by every rank, so all skip the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

import parallel
from aquila_fn.core import model
from aquila_fn.training import train
from aquila_fn.core.config import ModelConfig
from aquila_fn.training.sharding import make_layout, ops_impl
from parallel.mesh import MeshError
from parallel.grads import GradReducer
from parallel.layout import Layout, local_rows, local_value
from parallel.pipeline import SharedLeaves
from parallel.zero import compute_view

# The leaf the first and last stages both hold under tied embeddings.
TIED = ("embed",)


def stage_parts(config: ModelConfig, stage: int, n_stages: int) -> tuple[bool, bool, range]:
    """(is first, is last, its layers) of stage `stage`."""
    from parallel.pipeline import stage_bounds

    lo, hi = stage_bounds(config.n_layers, n_stages)[stage]
    return stage == 0, stage == n_stages - 1, range(lo, hi)


def stage_shapes(config: ModelConfig, stage: int, n_stages: int) -> dict:
    """The parameter shapes stage `stage` holds, keyed by their one-process paths
    (`layers` becomes a dict {"3": layer} so a leaf's path stays `layers.3.attn.wq`). Under
    tied embeddings the last stage's output layer is `embed` too."""
    full = model.param_shapes(config)
    first, last, layers = stage_parts(config, stage, n_stages)
    out: dict = {}
    if first:
        out["embed"] = full["embed"]
    out["layers"] = {str(i): full["layers"][i] for i in layers}
    if last:
        out["norm"] = full["norm"]
        out["embed" if config.tie_embeddings else "lm_head"] = full["embed" if config.tie_embeddings else "lm_head"]
    return out


def copied_paths(mesh: parallel.Mesh) -> tuple[str, ...]:
    """Leaves this rank holds as a copy of another pp rank's (the first stage's embedding, on
    every later rank that holds one): left out of the gradient norm and of checkpoints."""
    return TIED if mesh.rank_in("pp") > 0 else ()


def merge_stages(trees: list[dict]) -> dict:
    """One tree from several stages' trees (a shared leaf's copies are equal: either will do)."""
    out: dict = {}
    for t in trees:
        for k, v in t.items():
            if k == "layers":
                out.setdefault("layers", {}).update(v)
            else:
                out[k] = v
    return out


def stage_fn(config: ModelConfig, layout: Layout, stage: int, n_stages: int, *, compute_dtype,
             impl: str, recompute: str, reducer: GradReducer | None = None) -> Callable:
    """fn(params, x) of one pipeline stage: token ids (first stage) or the hidden state in, the
    hidden state out (after the final norm on the last stage), as plain local tensors; inside, the
    model's own layer code runs on DTensors over the stage's mesh (ZeRO-3 weights' gradients
    reduce-scattered in `reducer`'s buckets during backward)."""
    from parallel.layout import constrain

    first, last, layers = stage_parts(config, stage, n_stages)
    impl = ops_impl(layout, impl)

    def to_mesh(x, spec):
        if layout.trivial:
            return x
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(x, layout.device_mesh, layout.placements(spec, x.dim(), "act"), run_check=False)

    def fn(params, x):
        with layout.activate():
            # the output layer (lm_head, or the last stage's copy of embed) is the loss's
            used = {k: v for k, v in params.items() if k != "lm_head" and (first or k != "embed")}
            p = compute_view(used, layout, reducer=reducer if reducer is not None and reducer.overlap else None)
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


def head_loss_sum(layout: Layout, impl: str, reducer: GradReducer | None = None) -> Callable:
    """loss_sum(last stage params, hidden, labels) -> (this rank's loss sum, its token count),
    as plain tensors: the output projection and cross-entropy of the last stage."""
    import ops

    impl = ops_impl(layout, impl)

    def loss_sum(params, hidden, labels):
        key = "lm_head" if "lm_head" in params else "embed"
        with layout.activate():
            if not layout.trivial:
                from torch.distributed.tensor import DTensor

                mesh = layout.device_mesh
                hidden = DTensor.from_local(hidden, mesh, layout.placements(model.FULL_SEQ, 3, "act"), run_check=False)
                labels = DTensor.from_local(labels, mesh, layout.placements(("batch", None), 2, "act"), run_check=False)
            w = compute_view({key: params[key]}, layout,
                             reducer=reducer if reducer is not None and reducer.overlap else None)[key]
            total, n = ops.cross_entropy(hidden.reshape(-1, hidden.shape[-1]), w.to(hidden.dtype),
                                         labels.reshape(-1), impl=impl)
            return local_value(total), local_value(n)

    return loss_sum


@dataclass
class StagedModel:
    """This rank's part of a pipelined model, and what its steps need."""

    config: ModelConfig
    mesh: parallel.Mesh
    layout: Layout                 # the stage's mesh (the mesh without pp)
    pipe: Any                      # parallel.pipeline.Pipeline over this rank's stages
    shared: SharedLeaves | None    # tied embedding copies (first and last pp rank only)
    reducer: GradReducer           # data-parallel gradient reduction within the stage mesh
    precision: str
    impl: str
    micro_batches: int
    weight: float = 1.0            # the loss weight of the current step: loss scale / global tokens

    @property
    def params(self) -> dict:
        """This rank's leaves: the stage modules' own tensors (the schedule runs these)."""
        return merge_stages(self.pipe.params())

    def head(self) -> dict:
        """The last stage's parameters (on the rank that holds it)."""
        return self.pipe.modules[-1].tree()


def make_pipeline(config: ModelConfig, seed: int, mesh: parallel.Mesh, *, zero: int = 0,
                  sequence_parallel: bool = False, virtual_stages: int = 1, schedule: str = "1f1b",
                  micro_batches: int = 1, precision: str = "fp32", recompute: str = "none",
                  impl: str = "auto", overlap: bool = True, bucket_bytes: int = 25 << 20) -> StagedModel:
    """This rank's stages (parameters sharded over the stage's mesh, initialised as one process
    would) and the schedule over them. A collective: every rank calls it. `overlap`: reduce
    gradients over the stage's data axes during backward (see parallel.grads)."""
    from parallel.pipeline import Pipeline, rank_stages

    pp = mesh.size("pp")
    layout = make_layout(mesh.without("pp"), zero=zero, sequence_parallel=sequence_parallel)
    reducer = GradReducer(layout, bucket_bytes=bucket_bytes, overlap=overlap)
    n_stages = pp * virtual_stages
    compute_dtype = train.get_precision(precision).compute_dtype
    stages = []
    for s in rank_stages(mesh.rank_in("pp"), pp, virtual_stages):
        init = lambda path, meta: model.init_leaf(path, meta.shape, config, seed, device=mesh.device)
        params = parallel.materialize(stage_shapes(config, s, n_stages), init, layout)
        stages.append((s, params, stage_fn(config, layout, s, n_stages, compute_dtype=compute_dtype,
                                           impl=impl, recompute=recompute, reducer=reducer)))
    shared = SharedLeaves.end_stages(TIED if config.tie_embeddings else (), mesh)
    head = head_loss_sum(layout, impl, reducer)
    staged: StagedModel

    def loss_fn(hidden, labels):  # the schedule's: this rank's share of the global weighted loss
        return head(staged.head(), hidden, labels)[0] * staged.weight

    pipe = Pipeline(stages, n_stages, mesh.group("pp"), "interleaved" if virtual_stages > 1 else schedule,
                    micro_batches, loss_fn, device=mesh.device)
    staged = StagedModel(config, mesh, layout, pipe, shared, reducer, precision, impl, micro_batches)
    reducer.watch_accumulated(staged.params)
    return staged


def _sum_over(values: list[float], groups: list) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    for group in groups:
        dist.all_reduce(t, group=group)
    return t.tolist()


def _data_groups(layout: Layout) -> list:
    return [layout.mesh.group(axis) for axis in layout.data_axes]


def all_ranks_finite(norm: torch.Tensor) -> bool:
    """Whether the gradients are finite, as one verdict of every rank (so every rank skips the
    same fp16 overflow steps, whatever its own stage's gradients hold)."""
    bad = torch.tensor(0.0 if bool(torch.isfinite(norm)) else 1.0)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bad.item()


def make_train_step(staged: StagedModel, optimizer,
                    loss_scale: train.LossScaleConfig = train.LossScaleConfig()) -> Callable:
    """`step(state, local_batch) -> (state, metrics)` through the pipeline schedule: one
    forward/backward over the micro-batches (gradients in the parameters' .grad), data-parallel
    reduction within the stage mesh (each stage's buckets sent during its last micro-batch's
    backward, ZeRO-3's during each), tied copies' gradients summed, unscaling, one overflow
    verdict, and one optimizer step (or a skipped one) on this rank's leaves."""
    from aquila_fn.training import optim

    scaler = loss_scale if train.get_precision(staged.precision).loss_scaling else None
    layout, pipe, pp_group, reducer = staged.layout, staged.pipe, staged.mesh.group("pp"), staged.reducer
    skip = staged.shared.norm_skip if staged.shared else ()

    def gradients(params, scale):
        grads = parallel.tree.map_with_path(
            lambda p, x: x.grad if x.grad is not None else torch.zeros_like(x), params)
        # as train.py: unscaled in place (the buckets, all sent by now, unscale their copies), reduced
        grads = reducer.finish(train.unscale(grads, scale))
        return staged.shared.all_reduce(grads) if staged.shared else grads

    def step(state, batch):
        n_global, = _sum_over([float(train.count_tokens(batch))], _data_groups(layout))
        scale = state["loss_scale"]["scale"]
        staged.weight = float(scale) / max(n_global, 1.0)
        pipe.zero_grad()
        reducer.begin_step(staged.micro_batches, scale=float(scale))
        with layout.activate():
            losses = pipe.step(batch["input_ids"], batch["labels"])
            grads = gradients(state["params"], scale)
            grad_norm = parallel.global_grad_norm(grads, pp_group, skip)
            finite = all_ranks_finite(grad_norm)
            lr = optim.learning_rate(optimizer, state["opt_state"])
            new_state = train.apply_gradients(state, grads, optimizer, finite, scaler)
        local = sum(float(l.detach()) for l in losses) / staged.weight  # loss sum (last stage only)
        loss_sum, = _sum_over([local], _data_groups(layout) + [pp_group])
        metrics = {"loss": loss_sum / max(n_global, 1.0), "grad_norm": float(grad_norm), "lr": lr,
                   "n_tokens": int(n_global), "skipped": int(not finite), "loss_scale": float(scale)}
        return new_state, metrics

    return step


def make_eval_loss(staged: StagedModel, on_batch: Callable[[], None] = lambda: None) -> Callable:
    """`eval_loss(params, batches) -> token-weighted mean loss` over global batches (the same on
    every rank), by a forward-only pass through the stages; every rank gets the value."""
    head = head_loss_sum(staged.layout, staged.impl)
    layout, pp_group = staged.layout, staged.mesh.group("pp")

    def loss(hidden, labels):
        on_batch()
        return head(staged.head(), hidden, labels)

    @torch.no_grad()
    def eval_loss(params, batches) -> float:
        adopt(staged, params)
        local = [local_rows(b, layout) for b in batches]
        sums = staged.pipe.forward([(b["input_ids"], b["labels"]) for b in local], loss)
        total, count = _sum_over([sum(float(s) for s, _ in sums), sum(float(n) for _, n in sums)],
                                 _data_groups(layout) + [pp_group])
        return total / max(count, 1.0)

    return eval_loss


def adopt(staged: StagedModel, params: dict) -> dict:
    """The stage modules' parameters, holding the values of `params` (a state restored from a
    checkpoint brings new tensors; the schedule runs the modules' own)."""
    own = staged.params
    with torch.no_grad():
        def copy(path, mine, given):
            if mine is not given:
                mine.copy_(given)
            return mine

        return parallel.tree.map_with_path(copy, own, params)


@dataclass
class PipelineOptions:
    """The pipeline flags of scripts/pretrain.py."""

    mesh: parallel.Mesh
    virtual_stages: int
    schedule: str
    micro_batches: int
    precision: str
    recompute: str
    impl: str

    @classmethod
    def from_args(cls, args, mesh: parallel.Mesh, micro_batches: int) -> "PipelineOptions":
        precision = train.default_precision(mesh.device) if args.precision == "auto" else args.precision
        if not mesh.has("pp"):
            raise MeshError("--virtual-stages needs a pp axis in --mesh (e.g. --mesh pp=2)")
        schedule = "interleaved" if args.virtual_stages > 1 else args.pp_schedule
        pp = mesh.size("pp")
        if schedule != "gpipe" and micro_batches < pp:  # torch's 1F1B schedules fill the pipeline first
            raise MeshError(f"the {schedule} pipeline schedule over {pp} stages needs at least {pp} "
                            f"micro-batches per step, got {micro_batches}: lower --micro-batch-size "
                            f"(--batch-size / --micro-batch-size micro-batches) or use --pp-schedule gpipe")
        return cls(mesh, args.virtual_stages, schedule, micro_batches, precision, args.recompute,
                   getattr(args, "impl", "auto"))

    def build(self, config: ModelConfig, seed: int, layout: Layout) -> StagedModel:
        return make_pipeline(config, seed, self.mesh, zero=layout.zero, sequence_parallel=layout.sequence_parallel,
                             virtual_stages=self.virtual_stages, schedule=self.schedule,
                             micro_batches=self.micro_batches, precision=self.precision,
                             recompute=self.recompute, impl=self.impl)


def full_params(params: dict, mesh: parallel.Mesh) -> dict:
    """The whole model's parameters on every rank (a collective over pp)."""
    full = parallel.gather(params)
    parts = [None] * mesh.size("pp")  # each stage holds different leaves
    dist.all_gather_object(parts, full, group=mesh.group("pp"))
    merged = merge_stages(parts)
    merged["layers"] = [merged["layers"][str(i)] for i in range(len(merged["layers"]))]
    return merged


def checkpoint_view(state: Any, config: ModelConfig, mesh: parallel.Mesh) -> Any:
    """The state as checkpoints store it. Each rank holds only its stages' leaves; the view has
    the whole tree's structure, with this rank's leaves as blocks of the full tensors and the
    others (and the copies of tied leaves, see copied_paths) as empty blocks, so every rank
    file describes the same one-process tree and loading merges them."""
    from aquila_fn.training.checkpoint import LocalShard

    full, copies = model.param_shapes(config), copied_paths(mesh)

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
                out[key] = owned(tree[key]) if key in tree and key not in copies else empty(meta)
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


# ----------------------------------------------------------------------------- planning


def plan_stage_params(config: ModelConfig) -> Callable:
    """PlanModel.stage_params: a stage's subtree of the whole (meta) parameter tree."""

    def stage_params(params, stage, n_stages):
        keys = stage_shapes(config, stage, n_stages)
        out = {k: params[k] for k in keys if k != "layers"}
        out["layers"] = {i: params["layers"][int(i)] for i in keys["layers"]}
        return {k: out[k] for k in keys}

    return stage_params


def plan_stage_loss(config: ModelConfig, compute_dtype, recompute: str) -> Callable:
    """PlanModel.stage_loss: one micro-batch's forward of a stage on meta tensors, ending in a
    scalar (the loss on the last stage; elsewhere a stand-in for the gradient sent back)."""

    def stage_loss(layout, stage, n_stages):
        first, last, _ = stage_parts(config, stage, n_stages)
        fn = stage_fn(config, layout, stage, n_stages, compute_dtype=compute_dtype, impl="auto",
                      recompute=recompute)
        head = head_loss_sum(layout, "auto")

        def run(params, batch):
            ids = batch["input_ids"]
            if first:
                x = ids
            else:  # the activation received from the previous stage (its gradient is sent back)
                x = torch.zeros((*ids.shape, config.dim), dtype=compute_dtype or torch.float32,
                                device=ids.device, requires_grad=True)
            out = fn(params, x)
            return head(params, out, batch["labels"])[0] if last else out.float().sum()

        return run

    return stage_loss


def plan_shared(config: ModelConfig) -> Callable:
    """PlanModel.shared: the leaves of a stage whose gradients are summed with another stage's
    copy (the tied embedding on the first and last stage)."""

    def shared(stage, n_stages):
        first, last, _ = stage_parts(config, stage, n_stages)
        return TIED if config.tie_embeddings and (first or last) and n_stages > 1 else ()

    return shared
