"""LoRA as a pytree transform (Hu et al. 2021), composed with the pure model functions.

    adapters = lora_init(params, rank=8, alpha=16, targets=r"attn\\.(wq|wv)$", seed=0)
    loss = lora_loss(model.loss_fn, params, alpha=16)          # loss(adapters, batch, config)
    (value, n), grads = value_and_grad(loss, has_aux=True)(adapters, batch, config)
    merged = lora_merge(params, adapters, alpha=16)           # plain params again

An adapter pair for a weight W [out, in] is A [rank, in] (small random, PEFT's
kaiming-uniform bound 1/sqrt(in)) and B [out, rank] (zeros), so training starts exactly at the
base model. `lora_apply` builds effective weights W + (alpha/rank)·B@A *inside* the
differentiated function: the adapters are the only inputs gradients are taken for, and the base
tensors are read, never written (they stay bitwise equal). The adapter tree mirrors the
parameter tree (`{"layers": [{"attn": {"wq": {"a": A, "b": B}}}, ...]}`), so a leaf's path is
`<param path>.a` / `.b` and checkpoints, optimizers and weight-decay masks treat it like any
other tree. Full fine-tuning is the same loop with `params` itself as the trainable tree.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import torch

from aquila_fn.core import pytree
from aquila_fn.core.model import leaf_seed
from parallel.cli import UserError

Params = dict
Adapters = dict
DEFAULT_TARGETS = r"attn\.(wq|wv)$"


class LoraError(UserError, ValueError):
    """A LoRA request that does not fit the parameters (no target matched, a non-matrix target)."""


def _pattern(targets: str | Sequence[str]) -> re.Pattern:
    text = targets if isinstance(targets, str) else "|".join(f"(?:{t})" for t in targets)
    try:
        return re.compile(text)
    except re.error as e:
        raise LoraError(f"LoRA targets {text!r} are not a regular expression ({e})") from None


def target_paths(params: Params, targets: str | Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Paths of the parameters the `targets` regex (re.search on the path) selects."""
    pattern = _pattern(targets)
    found = [path for path, leaf in pytree.named_leaves(params) if pattern.search(path)]
    if not found:
        sample = [p for p, _ in pytree.named_leaves(params)][:8]
        raise LoraError(f"LoRA targets {pattern.pattern!r} match no parameter; paths look like {sample}")
    for path, leaf in pytree.named_leaves(params):
        if path in found and leaf.dim() != 2:
            raise LoraError(f"LoRA target {path} has shape {tuple(leaf.shape)}; only matrices can be adapted")
    return found


def _init_pair(path: str, weight: torch.Tensor, rank: int, seed: int, dtype: torch.dtype) -> dict:
    out_dim, in_dim = weight.shape
    gen = torch.Generator().manual_seed(leaf_seed(seed, path + ".lora"))
    bound = 1.0 / math.sqrt(in_dim)  # PEFT: kaiming_uniform_(a=sqrt(5)) on A
    a = (torch.rand((rank, in_dim), generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return {"a": a.to(dtype=dtype, device=weight.device),
            "b": torch.zeros((out_dim, rank), dtype=dtype, device=weight.device)}


def _empty(x: Any) -> bool:
    return isinstance(x, (dict, list)) and not x


def _prune(tree: Any) -> Any:
    """Drop untargeted (None) entries from dicts; list items become {} so layer indices stay put."""
    if isinstance(tree, dict):
        kept = {k: _prune(v) for k, v in tree.items() if v is not None}
        return {k: v for k, v in kept.items() if not _empty(v)}
    if isinstance(tree, list):
        items = [{} if v is None else _prune(v) for v in tree]
        return items if not all(_empty(v) for v in items) else []
    return tree


def lora_init(params: Params, rank: int, alpha: float | None = None,
              targets: str | Sequence[str] = DEFAULT_TARGETS, seed: int = 0, *,
              dtype: torch.dtype = torch.float32) -> Adapters:
    """Adapters for every matrix whose path matches `targets`. `alpha` is not stored in the tree
    (it holds trainable tensors only); pass the same alpha to lora_apply / lora_merge / lora_loss.
    Each pair's random stream depends only on (seed, path)."""
    if not isinstance(rank, int) or rank < 1:
        raise LoraError(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and not alpha > 0:
        raise LoraError(f"LoRA alpha must be positive, got {alpha!r}")
    chosen = set(target_paths(params, targets))
    tree = pytree.map_with_path(
        lambda p, w: _init_pair(p, w, rank, seed, dtype) if p in chosen else None, params)
    return _prune(tree)


def adapter_pairs(adapters: Adapters) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{param path: (A, B)} from an adapter tree."""
    flat = pytree.flatten_dict(adapters)
    pairs = {}
    for path in flat:
        base, _, role = path.rpartition(".")
        if role not in ("a", "b"):
            raise LoraError(f"adapter leaf {path} is neither an 'a' nor a 'b' matrix")
        if f"{base}.a" not in flat or f"{base}.b" not in flat:
            raise LoraError(f"adapter for {base} lacks its {'b' if role == 'a' else 'a'} matrix")
        pairs[base] = (flat[f"{base}.a"], flat[f"{base}.b"])
    return pairs


def lora_rank(adapters: Adapters) -> int:
    ranks = {a.shape[0] for a, _ in adapter_pairs(adapters).values()}
    if len(ranks) != 1:
        raise LoraError(f"adapters have mixed ranks {sorted(ranks)}")
    return ranks.pop()


def lora_apply(params: Params, adapters: Adapters, alpha: float) -> Params:
    """Effective parameters: W + (alpha/rank)·B@A on adapted paths, the base tensors elsewhere.
    Differentiable in `adapters`; `params` is only read."""
    pairs = adapter_pairs(adapters)
    missing = set(pairs) - {p for p, _ in pytree.named_leaves(params)}
    if missing:
        raise LoraError(f"adapters for {sorted(missing)[:5]} have no matching parameter")

    def effective(path: str, w: torch.Tensor) -> torch.Tensor:
        if path not in pairs:
            return w
        a, b = pairs[path]
        if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
            raise LoraError(f"adapter for {path}: B@A is {b.shape[0]}x{a.shape[1]}, weight is "
                            f"{tuple(w.shape)}")
        delta = (alpha / a.shape[0]) * (b @ a)
        return w + delta.to(w.dtype)

    return pytree.map_with_path(effective, params)


def lora_merge(params: Params, adapters: Adapters, alpha: float) -> Params:
    """Plain parameters with the adapters folded in (a new tree; `params` is unchanged)."""
    with torch.no_grad():
        merged = lora_apply(params, adapters, alpha)
    return pytree.tree_map(lambda x: x.detach(), merged)


def lora_loss(loss_fn: Callable, params: Params, alpha: float) -> Callable:
    """`loss(adapters, *args, **kw) = loss_fn(lora_apply(params, adapters, alpha), *args, **kw)`:
    the base is closed over, so value_and_grad of it differentiates the adapters only."""

    def loss(adapters, *args, **kwargs):
        return loss_fn(lora_apply(params, adapters, alpha), *args, **kwargs)

    return loss


# ----------------------------------------------------------------------------- save / load


def save_adapters(directory, adapters: Adapters, *, alpha: float, targets: str | Sequence[str] = "",
                  step: int = 0, metadata: dict | None = None, keep: int | None = None) -> str:
    """Write the adapters alone (a msgpack checkpoint `<directory>/step_<step>`); rank, alpha and
    targets go in its metadata. Returns the checkpoint path."""
    from aquila_fn.training.checkpoint import save_checkpoint
    info = {"rank": lora_rank(adapters), "alpha": float(alpha),
            "targets": targets if isinstance(targets, str) else list(targets),
            "paths": sorted(adapter_pairs(adapters))}
    return save_checkpoint(directory, {"adapters": adapters}, step=step,
                           metadata={**(metadata or {}), "lora": info}, keep=keep)


def load_adapters(path, *, map_location="cpu") -> tuple[Adapters, dict]:
    """(adapters, info) from a checkpoint written by save_adapters (a step dir or a run dir, whose
    latest is used); info has rank, alpha, targets, paths and step."""
    from aquila_fn.training.checkpoint import CheckpointError, load_checkpoint
    state, meta = load_checkpoint(path, map_location=map_location)
    if "adapters" not in state or "lora" not in meta:
        raise CheckpointError(f"{path} is not a LoRA adapter checkpoint (no 'adapters' state / 'lora' metadata)")
    return state["adapters"], {**meta["lora"], "step": meta["step"]}
