"""Function transforms over parameter pytrees.

`value_and_grad` is the one gradient transform of the project. It is built on
`torch.autograd.grad` over the tree's leaves rather than `torch.func.grad_and_value`,
because inside torch.func transforms the DTensor API (`redistribute`, `placements`) is
invisible, and sharded training needs it. Compilation composes from the inside:
`value_and_grad(compile(loss_fn))` compiles forward and backward (AOTAutograd) as one graph
each, with the same signature as the eager version.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from aquila_fn.core import pytree


def _is_differentiable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def value_and_grad(fn: Callable, *, has_aux: bool = False) -> Callable:
    """`value_and_grad(fn)(params, *args)` -> `(value, grads)`; with has_aux `((value, aux), grads)`.

    `fn(params, *args)` must return a scalar tensor (or `(scalar, aux)` with has_aux). Gradients
    have the structure of `params`; leaves that do not influence the value get zeros, and
    non-floating leaves get None.
    """

    def wrapped(params: Any, *args, **kwargs):
        flat, spec = pytree.leaves(params), pytree.structure(params)
        inputs = [x.detach().requires_grad_(True) if _is_differentiable(x) else x for x in flat]
        out = fn(pytree.unflatten(spec, inputs), *args, **kwargs)
        value, aux = out if has_aux else (out, None)
        if value.dim() != 0:
            raise ValueError(f"value_and_grad needs a scalar value, got shape {tuple(value.shape)}")
        diff = [x for x in inputs if _is_differentiable(x)]
        grads = iter(torch.autograd.grad(value, diff, allow_unused=True))
        out_grads = []
        for x in inputs:
            if not _is_differentiable(x):
                out_grads.append(None)
                continue
            g = next(grads)
            out_grads.append(torch.zeros_like(x) if g is None else g)
        grad_tree = pytree.unflatten(spec, out_grads)
        value = value.detach()
        return ((value, aux) if has_aux else value), grad_tree

    return wrapped


def grad(fn: Callable, *, has_aux: bool = False) -> Callable:
    """Gradients only (with has_aux: `(grads, aux)`)."""
    vg = value_and_grad(fn, has_aux=has_aux)

    def wrapped(params, *args, **kwargs):
        out, grads = vg(params, *args, **kwargs)
        return (grads, out[1]) if has_aux else grads

    return wrapped
