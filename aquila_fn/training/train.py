"""The train step, composed from transforms.

    optimizer = optim.adamw(optim.warmup_cosine(3e-4, 100, 1000, 3e-5), weight_decay=0.1)
    state = init_train_state(params, optimizer, precision="bf16")
    train_step = make_train_step(config, optimizer, micro_batches=4, precision="bf16",
                                 recompute="selective", compile=True)
    state, metrics = train_step(state, batch)   # metrics: loss, grad_norm, lr, n_tokens, skipped

One step is: split the batch into micro-batches -> `value_and_grad(compile(loss_sum))` on each,
weighted by 1/total tokens (and the fp16 loss scale) -> sum -> unscale -> `grad_transform`
(the hook where data parallelism reduces gradients) -> global norm -> skip on overflow or
optimizer step -> loss-scale update. Each stage is a small function here.

The state is a pytree `{"params", "opt_state", "step", "loss_scale": {"scale", "good_steps"}}`
of tensors (so checkpoints save it as they save parameters). Parameters are fp32 master
weights in every precision; `compute_dtype` sets the matmul dtype. The step updates parameters
and optimizer moments in place: a state passed to `train_step` is donated (as JAX's
donate_argnums), so clone it first (`clone_state`) to keep the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from aquila_fn.core import model, pytree
from aquila_fn.training import optim
from aquila_fn.core.config import ModelConfig
from aquila_fn.core.transforms import value_and_grad
from ops import _dispatch as ops_dispatch

State = dict[str, Any]
Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    name: str
    compute_dtype: torch.dtype
    loss_scaling: bool  # dynamic loss scaling (fp16 only)


PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, False),
    "bf16": Precision("bf16", torch.bfloat16, False),
    "fp16": Precision("fp16", torch.float16, True),
}


def get_precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; expected one of {sorted(PRECISIONS)}") from None


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls run natively (so bf16 mixed precision pays) on `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.bfloat16 in ops_dispatch.NATIVE_CPU_MATMUL_DTYPES
    return kind == "npu"  # Ascend 910B computes bf16 natively


def default_precision(device: str | torch.device = "cpu") -> str:
    return "bf16" if bf16_supported(device) else "fp32"


@dataclass(frozen=True)
class LossScaleConfig:
    """DeepSpeed's dynamic loss scaling: start at init_scale; on overflow skip the step and
    divide by factor (not below min_scale); after growth_interval good steps multiply by factor."""
    init_scale: float = 2.0 ** 16
    growth_interval: int = 1000
    factor: float = 2.0
    min_scale: float = 1.0


# ----------------------------------------------------------------------------- state


def init_train_state(params: Any, optimizer: optim.GradientTransformation, *,
                     precision: str = "bf16", loss_scale: LossScaleConfig = LossScaleConfig()) -> State:
    """A fresh training state. Parameters become fp32 master weights (no copy when they already
    are: the state owns them from here on). The loss scale is 1 and fixed unless precision is fp16."""
    policy = get_precision(precision)
    params = pytree.tree_map(lambda p: p.to(torch.float32) if p.is_floating_point() else p, params)
    scale = loss_scale.init_scale if policy.loss_scaling else 1.0
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": torch.zeros((), dtype=torch.int64),
        "loss_scale": {"scale": torch.tensor(scale, dtype=torch.float32),
                       "good_steps": torch.zeros((), dtype=torch.int64)},
    }


def clone_state(state: State) -> State:
    """A deep copy (train_step updates its input state in place)."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)


# ----------------------------------------------------------------------------- compilation


def compile_fn(fn: Callable, *, fullgraph: bool = True, backend: str = "auto") -> Callable:
    """The project's compile entry (aquila_fn.core.compile) when present, else torch.compile."""
    try:
        from aquila_fn.core.compile import compile as project_compile
    except ImportError:
        return torch.compile(fn, fullgraph=fullgraph, backend="inductor" if backend == "auto" else backend)
    return project_compile(fn, backend=backend, fullgraph=fullgraph)


def _backend(compile: bool | str) -> str | None:
    if compile is True:
        return "auto"
    return compile or None


# ----------------------------------------------------------------------------- pieces of a step


def split_batch(batch: Batch, micro_batches: int) -> list[Batch]:
    """Split every [B, ...] tensor of the batch into `micro_batches` equal pieces."""
    size = batch["input_ids"].shape[0]
    if micro_batches < 1 or size % micro_batches:
        raise ValueError(f"batch of {size} sequences does not split into {micro_batches} equal "
                         f"micro-batches")
    if micro_batches == 1:
        return [batch]
    chunks = {k: v.chunk(micro_batches) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(micro_batches)]


def count_tokens(batch: Batch) -> torch.Tensor:
    """Tokens the loss counts (labels not equal to -100): the denominator of the mean."""
    return (batch["labels"] != IGNORE_INDEX).sum()


# Top-level leaves handed out in the compute dtype besides the layers' matrices (not `embed`:
# an embedding lookup in 16 bits would accumulate its gradient in 16 bits).
RECAST = ("lm_head",)


def recasts(compute_dtype: torch.dtype | None) -> bool:
    """Whether the forward casts fp32 master weights to a narrower compute dtype."""
    return compute_dtype is not None and compute_dtype.itemsize < 4


def recast_weights(loss_sum_fn: Callable) -> Callable:
    """`loss_sum_fn` whose backward casts each fp32 master weight to the compute dtype again
    (the same bits) instead of keeping the 16-bit copy the matmul saved: 2 bytes per parameter
    less from forward to backward. The layers' weights are cast as the model reads them, and
    autograd keeps a recipe in place of the cast (parallel.zero.ReshardAfterForward, which
    keeps ZeRO-3's re-gathers the same way). Inside torch.compile the wrapper steps aside: the
    compiled graph's partitioner decides what is saved (a cast of a graph input is cheap to
    recompute, and it recomputes it)."""
    from parallel.zero import ReshardAfterForward, compute_view

    def loss_sum(params, batch, config, **kw):
        dtype = kw.get("compute_dtype")
        if not recasts(dtype) or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return loss_sum_fn(params, batch, config, **kw)
        with ReshardAfterForward() as recipes:
            p = compute_view(params, None, stream="layers", reshard=recipes, dtype=dtype, cast=RECAST)
            return loss_sum_fn(p, batch, config, **kw)

    return loss_sum


def make_loss(config: ModelConfig, *, compute_dtype: torch.dtype | None = None, recompute: str = "none",
              impl: str = "auto", loss_sum_fn: Callable | None = None) -> Callable:
    """`loss(params, batch) -> (loss_sum fp32, n_tokens)` with the policies bound."""
    if recompute not in model.RECOMPUTE_POLICIES:
        raise ValueError(f"recompute={recompute!r}; expected one of {model.RECOMPUTE_POLICIES}")
    base = loss_sum_fn or recast_weights(model.loss_sum_fn)

    def loss(params, batch):
        return base(params, batch, config, compute_dtype=compute_dtype, impl=impl, recompute=recompute)

    return loss


def weighted_value_and_grad(loss: Callable) -> Callable:
    """`vg(params, batch, weight) -> ((weight·loss_sum, (loss_sum, n_tokens)), grads)`.

    The weight (loss scale / total tokens of the whole batch) is applied outside the loss, so
    the compiled graph does not change with it and micro-batch gradients simply add up.
    """

    def weighted(params, batch, weight):
        total, n = loss(params, batch)
        return total * weight, (total.detach(), n)

    return value_and_grad(weighted, has_aux=True)


def accumulate_gradients(vg: Callable, params: Any, micro: Sequence[Batch], weight: torch.Tensor):
    """Sum the weighted gradients (and the raw loss sums) over micro-batches, in place into the
    first micro-batch's gradient tensors: a gradient hook that kept those tensors sees the
    running sum (parallel.GradReducer reduces it during the last micro-batch's backward)."""
    grads, loss_sum = None, torch.zeros(())
    for batch in micro:
        (_, (total, _)), g = vg(params, batch, weight)
        if grads is None:
            grads = g
        else:
            torch._foreach_add_(_float_leaves(grads), _float_leaves(g))
        loss_sum = loss_sum + total.float()
    return grads, loss_sum


def _float_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def unscale(grads: Any, scale: torch.Tensor) -> Any:
    """Divide gradients by the loss scale, in place (a no-op for scale 1)."""
    if float(scale) != 1.0:
        torch._foreach_mul_(_float_leaves(grads), 1.0 / float(scale))
    return grads


def update_loss_scale(loss_scale: dict, finite: bool, config: LossScaleConfig | None) -> dict:
    """Halve on overflow (floored at min_scale); grow after growth_interval good steps."""
    if config is None:
        return loss_scale
    scale, good = float(loss_scale["scale"]), int(loss_scale["good_steps"])
    if not finite:
        scale, good = max(scale / config.factor, config.min_scale), 0
    else:
        good += 1
        if good >= config.growth_interval:
            scale, good = scale * config.factor, 0
    return {"scale": torch.tensor(scale, dtype=torch.float32),
            "good_steps": torch.tensor(good, dtype=torch.int64)}


def apply_gradients(state: State, grads: Any, optimizer: optim.GradientTransformation, finite: bool,
                    scaler: LossScaleConfig | None) -> State:
    """The next state: the optimizer step, or for an overflowed (or diverged) step nothing but
    the loss-scale update. `finite` must be the same on every rank of a distributed run."""
    params, opt_state = state["params"], state["opt_state"]
    if finite:
        params, opt_state = optim.step(optimizer, params, grads, opt_state)
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1,
            "loss_scale": update_loss_scale(state["loss_scale"], finite, scaler)}


def identity_grad_transform(grads, loss_sum, n_tokens):
    return grads, loss_sum, n_tokens


# ----------------------------------------------------------------------------- the step


def make_train_step(config: ModelConfig, optimizer: optim.GradientTransformation, *,
                    micro_batches: int = 1, precision: str = "bf16", recompute: str = "none",
                    compile: bool | str = False, impl: str = "auto",
                    loss_scale: LossScaleConfig = LossScaleConfig(),
                    loss_sum_fn: Callable | None = None,
                    grad_transform: Callable | None = None) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`.

    micro_batches: the batch is split into this many equal micro-batches; gradients are
      token-weighted (sum of loss sums / total tokens), so the result equals one big batch.
    precision: "bf16" | "fp16" (dynamic loss scaling, overflowed steps skipped) | "fp32".
    recompute: "none" | "full" (each layer) | "selective" (attention core only).
    compile: False, True (the default backend) or a backend name; the loss is compiled with
      fullgraph=True inside value_and_grad, so forward and backward are compiled graphs.
    loss_sum_fn: replaces model.loss_sum_fn (same signature).
    grad_transform(grads, loss_sum, n_tokens) -> (grads, loss_sum, n_tokens): called on the
      accumulated, unscaled gradients of the local token-weighted mean; a data-parallel wrapper
      returns the global ones (e.g. grads·n_local summed over ranks / n_global).
    """
    policy = get_precision(precision)
    scaler = loss_scale if policy.loss_scaling else None
    loss = make_loss(config, compute_dtype=policy.compute_dtype, recompute=recompute, impl=impl,
                     loss_sum_fn=loss_sum_fn)
    backend = _backend(compile)
    if backend is not None:
        loss = compile_fn(loss, fullgraph=True, backend=backend)
    vg = weighted_value_and_grad(loss)
    reduce = grad_transform or identity_grad_transform

    def train_step(state: State, batch: Batch) -> tuple[State, dict]:
        micro = split_batch(batch, micro_batches)
        n_tokens = count_tokens(batch)
        scale = state["loss_scale"]["scale"]
        weight = scale / n_tokens.clamp(min=1).float()
        grads, loss_sum = accumulate_gradients(vg, state["params"], micro, weight)
        grads = unscale(grads, scale)
        grads, loss_sum, n_tokens = reduce(grads, loss_sum, n_tokens)
        grad_norm = optim.global_norm(grads)
        finite = bool(torch.isfinite(grad_norm))
        lr = optim.learning_rate(optimizer, state["opt_state"])
        new_state = apply_gradients(state, grads, optimizer, finite, scaler)
        metrics = {"loss": float(loss_sum) / max(int(n_tokens), 1), "grad_norm": float(grad_norm),
                   "lr": lr, "n_tokens": int(n_tokens), "skipped": int(not finite),
                   "loss_scale": float(scale)}
        return new_state, metrics

    return train_step


# ----------------------------------------------------------------------------- evaluation


def make_eval_loss(config: ModelConfig, *, precision: str = "bf16", impl: str = "auto") -> Callable:
    """`eval_loss(params, batches) -> token-weighted mean loss` over an iterable of batches."""
    loss = make_loss(config, compute_dtype=get_precision(precision).compute_dtype, impl=impl)

    @torch.no_grad()
    def eval_loss(params, batches) -> float:
        total, count = 0.0, 0
        for batch in batches:
            s, n = loss(params, batch)
            total, count = total + float(s), count + int(n)
        return total / max(count, 1)

    return eval_loss
