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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

import parallel
from aquila_fn import model, train
from aquila_fn.config import ModelConfig
from parallel.grads import GradReducer
from parallel.layout import Layout, data_rank, local_rows, local_value, shard_batch
from parallel.zero import compute_view

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
    """Kernel choice under a mesh: DTensor has no sharding rule for the CPU flash-attention
    kernel, and the chunked fused cross-entropy is a custom autograd function over plain
    tensors; the reference ops are plain torch ops, which DTensor propagates (and the reference
    cross-entropy under a tp axis is the vocabulary-parallel one)."""
    if layout.trivial or impl != "auto":
        return impl
    return "reference" if layout.mesh.device == "cpu" else impl


@dataclass
class _StepContext:
    """What the loss needs to know about the whole step (set before train.py's step runs)."""

    factor: float = 1.0           # n_local / n_global: turns train.py's local weights global
    raw_sums: list = field(default_factory=list)


def _all_reduce(value: float, layout: Layout, dtype=torch.float64) -> float:
    t = torch.tensor(value, dtype=dtype)
    for axis in layout.data_axes:
        dist.all_reduce(t, group=layout.mesh.group(axis))
    return t.item()


def make_loss_sum_fn(layout: Layout, *, reducer: GradReducer | None = None,
                     context: _StepContext | None = None) -> Callable:
    """`loss_sum(params, local_batch, config, **kw) -> (local loss sum, local tokens)` computed
    on the mesh: parameters gathered for computation (ZeRO-3 with prefetch), the batch split
    over the data axes, the model run on DTensors. Returns this rank's partial sums as plain
    tensors (the gradient flows back into the DTensor parameters)."""

    def loss_sum(params, batch, config, **kw):
        kw["impl"] = ops_impl(layout, kw.get("impl", "auto"))
        with layout.activate():
            if reducer is not None:
                reducer.watch(params)
            p = compute_view(params, layout, stream=LAYERS)
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


def rank_of_data(layout: Layout) -> int:
    return data_rank(layout)


# ----------------------------------------------------------------------------- planning


def plan_model(config_name: str, overrides: dict | None = None, precision: str = "bf16",
               recompute: str = "none"):
    """The `parallel.plan` plugin: Aquila's parameters, layout, loss and optimizer."""
    import contextlib
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

    return PlanModel(name=config_name, make_layout=make_layout, init_params=init, loss=loss, batch=batch,
                     optimizer=lambda: optim.adamw(1e-4, max_grad_norm=1.0), num_params=config.num_params())
