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
    In 16-bit compute, backward casts the fp32 weights again rather than keeping their casts
    (train.recast_weights' mechanism, shared with ZeRO-3's re-gathers).
    Returns this rank's partial sums as plain tensors (the gradient flows back into the DTensor
    parameters). With `reducer`, gradients are reduced in its buckets while backward runs
    (ZeRO-3's reduce-scatters included)."""

    def loss_sum(params, batch, config, **kw):
        kw["impl"] = ops_impl(layout, kw.get("impl", "auto"))
        kw.setdefault("compile_layers", compile_layers)
        with layout.activate():
            if reducer is not None:
                reducer.watch(params)
            dtype = kw.get("compute_dtype")
            keep_recipes = needs_gather(layout) or train.recasts(dtype)
            with ReshardAfterForward() if keep_recipes else contextlib.nullcontext() as reshard:
                p = compute_view(params, layout, stream=LAYERS, reshard=reshard, dtype=dtype, cast=train.RECAST,
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
