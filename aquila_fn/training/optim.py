"""Optimizers in the optax shape: a `GradientTransformation` is a pair `(init, update)`.

    opt = adamw(warmup_cosine(3e-4, warmup_steps=100, total_steps=1000, min_lr=3e-5),
                weight_decay=0.1, max_grad_norm=1.0)
    opt_state = opt.init(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = apply_updates(params, updates)

`adamw` is literally `chain(clip_by_global_norm, scale_by_adam, add_decayed_weights,
scale_by_learning_rate)`, so its state is that chain's state. It also carries a fused in-place
path (`apply_`), used by `step`, that does the same arithmetic with `ops.adamw_`'s foreach
kernels on the same state: the hot loop never builds an `updates` tree.

States are pytrees of tensors (counts are 0-d int64 tensors), so checkpoints hold them as they
hold parameters. Moments are fp32 whatever the parameter dtype: parameters are fp32 master
weights in every precision policy of `aquila_fn.training.train`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

import ops
from aquila_fn.core import pytree

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[int], float]


class GradientTransformation(NamedTuple):
    """`init(params) -> state`; `update(updates, state, params=None) -> (updates, state)`.

    `apply_`, when present, is a fused equivalent of `update` followed by `apply_updates`:
    `apply_(params, grads, state) -> state`, updating the parameter leaves in place (the
    parameters are donated, as with JAX's donate_argnums). `grads` may be overwritten too.
    """
    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]
    apply_: Callable[[Params, Updates, OptState], OptState] | None = None
    # The learning-rate schedule, for reporting (`learning_rate`); None when not known.
    schedule: Schedule | None = None


# ----------------------------------------------------------------------------- tree helpers


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.leaves(tree) if isinstance(x, torch.Tensor)]


def _count() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def global_norm(tree: Any) -> torch.Tensor:
    """The L2 norm of all leaves together, in fp32 (inf or nan if any leaf has one)."""
    xs = _tensors(tree)
    if not xs:
        return torch.zeros(())
    norms = torch._foreach_norm([x.float() if x.dtype != torch.float32 else x for x in xs])
    return torch.linalg.vector_norm(torch.stack(norms))


def apply_updates(params: Params, updates: Updates) -> Params:
    """`params + updates`, leaf by leaf, keeping each parameter's dtype (a new tree)."""
    return pytree.tree_map(lambda p, u: p + u.to(p.dtype), params, updates)


def step(optimizer: GradientTransformation, params: Params, grads: Updates,
         state: OptState) -> tuple[Params, OptState]:
    """One optimizer step: the fused in-place path when the transformation has one, else
    `update` + `apply_updates`. Returns (params, state)."""
    if optimizer.apply_ is not None:
        with torch.no_grad():
            return params, optimizer.apply_(params, grads, state)
    with torch.no_grad():
        updates, state = optimizer.update(grads, state, params)
        return apply_updates(params, updates), state


# ----------------------------------------------------------------------------- schedules


def constant(lr: float) -> Schedule:
    return lambda count: lr


def _check_schedule(peak_lr, warmup_steps, total_steps, min_lr):
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"schedule steps must be >= 0, got warmup={warmup_steps}, total={total_steps}")
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps={total_steps} is shorter than warmup_steps={warmup_steps}")
    if min_lr > peak_lr:
        raise ValueError(f"min_lr={min_lr} exceeds the peak lr={peak_lr}")


def _warmup_decay(peak_lr, warmup_steps, total_steps, min_lr, decay: Callable[[float], float]) -> Schedule:
    """Megatron's OptimizerParamScheduler: the update numbered n = count + 1 uses
    peak·n/warmup while n <= warmup, then min + decay(ratio)·(peak - min) with
    ratio = (n - warmup)/(total - warmup), and min_lr after total_steps."""
    _check_schedule(peak_lr, warmup_steps, total_steps, min_lr)

    def schedule(count: int) -> float:
        n = int(count) + 1
        if warmup_steps > 0 and n <= warmup_steps:
            return peak_lr * n / warmup_steps
        if n > total_steps or total_steps == warmup_steps:
            return min_lr
        ratio = (n - warmup_steps) / (total_steps - warmup_steps)
        return min_lr + decay(ratio) * (peak_lr - min_lr)

    return schedule


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warmup to peak_lr, then half a cosine down to min_lr at total_steps."""
    return _warmup_decay(peak_lr, warmup_steps, total_steps, min_lr,
                         lambda r: 0.5 * (math.cos(math.pi * r) + 1.0))


def warmup_linear(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warmup to peak_lr, then a straight line down to min_lr at total_steps."""
    return _warmup_decay(peak_lr, warmup_steps, total_steps, min_lr, lambda r: 1.0 - r)


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


def make_schedule(decay: str, peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> Schedule:
    """`decay` is "cosine" or "linear" (ModelLink's --lr-decay-style)."""
    if decay not in SCHEDULES:
        raise ValueError(f"unknown lr decay style {decay!r}; expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[decay](peak_lr, warmup_steps, total_steps, min_lr)


def _as_schedule(lr: float | Schedule) -> Schedule:
    return lr if callable(lr) else constant(float(lr))


# ----------------------------------------------------------------------------- weight-decay mask


def decay_mask(params: Params, *, decay_embeddings: bool = True) -> Any:
    """A tree of bools: True where weight decay applies. Matrices decay; norms, biases and
    other 1-D leaves do not (Megatron, FlagAI); the input embedding is configurable."""

    def decays(path: str, x) -> bool:
        name = path.rsplit(".", 1)[-1]
        if x.dim() < 2 or name.endswith("bias") or name.endswith("norm"):
            return False
        if name == "embed":
            return decay_embeddings
        return True

    return pytree.map_with_path(decays, params)


def _resolve_mask(mask, params) -> list[bool]:
    """Per-leaf flags from a bool tree, a callable(params) -> bool tree, or None (all True)."""
    if mask is None:
        return [True] * len(pytree.leaves(params))
    tree = mask(params) if callable(mask) else mask
    flags = pytree.leaves(tree)
    if len(flags) != len(pytree.leaves(params)):
        raise ValueError(f"weight-decay mask has {len(flags)} leaves, params have "
                         f"{len(pytree.leaves(params))}")
    return [bool(f) for f in flags]


# ----------------------------------------------------------------------------- transforms


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transforms in order; the state is the list of their states."""

    def init(params):
        return [t.init(params) for t in transforms]

    def update(updates, state, params=None):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, new_state

    return GradientTransformation(init, update)


def _map_updates(updates, fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]):
    leaves, spec = pytree.leaves(updates), pytree.structure(updates)
    return pytree.unflatten(spec, fn(leaves))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the whole update so its global L2 norm is at most max_norm."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")

    def update(updates, state, params=None):
        factor = max_norm / torch.clamp(global_norm(updates), min=max_norm)
        return _map_updates(updates, lambda xs: torch._foreach_mul(xs, factor)), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction m̂ / (sqrt(v̂) + eps), with fp32 moments."""

    def init(params):
        zeros = pytree.tree_map(lambda p: torch.zeros_like(p, dtype=torch.float32), params)
        return {"count": _count(), "mu": zeros, "nu": pytree.tree_map(torch.clone, zeros)}

    def update(updates, state, params=None):
        count = state["count"] + 1
        n = int(count)
        g = [x.float() for x in pytree.leaves(updates)]
        mu = torch._foreach_lerp(pytree.leaves(state["mu"]), g, 1 - b1)
        nu = torch._foreach_mul(pytree.leaves(state["nu"]), b2)
        torch._foreach_addcmul_(nu, g, g, value=1 - b2)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(nu), math.sqrt(1 - b2 ** n)), eps)
        direction = torch._foreach_div(torch._foreach_div(mu, denom), 1 - b1 ** n)
        spec = pytree.structure(updates)
        return (pytree.unflatten(spec, direction),
                {"count": count, "mu": pytree.unflatten(spec, mu), "nu": pytree.unflatten(spec, nu)})

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float, mask=None) -> GradientTransformation:
    """Decoupled weight decay: update + weight_decay * param where the mask is True."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        flags = _resolve_mask(mask, params)
        ps = pytree.leaves(params)
        out = [u + weight_decay * p.to(u.dtype) if f and weight_decay else u
               for u, p, f in zip(pytree.leaves(updates), ps, flags)]
        return pytree.unflatten(pytree.structure(updates), out), state

    return GradientTransformation(lambda params: {}, update)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply by schedule(count); count is the number of updates made before this one."""

    def update(updates, state, params=None):
        factor = schedule(int(state["count"]))
        return (_map_updates(updates, lambda xs: torch._foreach_mul(xs, factor)),
                {"count": state["count"] + 1})

    return GradientTransformation(lambda params: {"count": _count()}, update)


def scale_by_learning_rate(lr: float | Schedule) -> GradientTransformation:
    """Scale by -lr (descent)."""
    schedule = _as_schedule(lr)
    return scale_by_schedule(lambda count: -schedule(count))


# ----------------------------------------------------------------------------- AdamW


def adamw(learning_rate: float | Schedule, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, mask=decay_mask, max_grad_norm: float | None = 1.0,
          impl: str = "auto") -> GradientTransformation:
    """AdamW as ModelLink/FlagAI configure it (betas 0.9/0.95, decay 0.1, clip 1.0).

    `mask`: bool tree, callable(params) -> bool tree, or None (decay everything); the default
    excludes norms and biases. `update` is the chain; `apply_` is the same step with
    `ops.adamw_` over lists, in place, on the same state.
    """
    schedule = _as_schedule(learning_rate)
    parts = ([clip_by_global_norm(max_grad_norm)] if max_grad_norm else []) + [
        scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(schedule)]
    chained = chain(*parts)
    adam_index = 1 if max_grad_norm else 0

    def apply_(params, grads, state):
        ps, gs = pytree.leaves(params), [g.float() for g in pytree.leaves(grads)]
        if max_grad_norm:
            factor = max_grad_norm / torch.clamp(global_norm(gs), min=max_grad_norm)
            torch._foreach_mul_(gs, factor)
        adam = state[adam_index]
        count = int(adam["count"])
        flags = _resolve_mask(mask, params)
        ops.adamw_(ps, gs, pytree.leaves(adam["mu"]), pytree.leaves(adam["nu"]), step=count + 1,
                   lr=schedule(count), beta1=b1, beta2=b2, eps=eps,
                   weight_decay=[weight_decay if f else 0.0 for f in flags], impl=impl)
        new_state = list(state)
        new_state[adam_index] = {**adam, "count": adam["count"] + 1}
        new_state[-1] = {"count": state[-1]["count"] + 1}
        return new_state

    return GradientTransformation(chained.init, chained.update, apply_, schedule)


def learning_rate(optimizer: GradientTransformation, optimizer_state: OptState) -> float:
    """The lr the next update will use (nan when the optimizer does not expose its schedule)."""
    if optimizer.schedule is None:
        return float("nan")
    return float(optimizer.schedule(update_count(optimizer_state)))


def update_count(optimizer_state: OptState) -> int:
    """Number of updates applied so far (skipped fp16 steps do not count)."""
    return int(optimizer_state[-1]["count"])
