"""Pytree helpers on optree: a leaf's dotted path string (`layers.3.attn.wq`) is its identity."""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

# The leaf-path primitives live in parallel.tree (parallel/ imports nothing from aquila_fn);
# None is not a leaf in either: an absent tensor is an empty subtree.
from parallel.tree import leaves, map_with_path, named_leaves, path_str, structure, unflatten

__all__ = ["flatten_dict", "leaves", "map_with_path", "named_leaves", "param_count", "path_str", "structure",
           "tree_bytes", "tree_map", "unflatten", "unflatten_dict"]


def flatten_dict(tree: Any) -> dict[str, Any]:
    """The tree as an ordered `{path: leaf}` dict."""
    return dict(named_leaves(tree))


def unflatten_dict(flat: dict[str, Any]) -> Any:
    """Inverse of `flatten_dict` for trees of dicts and lists (integer keys become list items)."""
    root: dict = {}
    for path, leaf in flat.items():
        node = root
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return _lists_from_int_keys(root)


def _lists_from_int_keys(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _lists_from_int_keys(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        indices = sorted(int(k) for k in items)
        if indices == list(range(len(indices))):
            return [items[str(i)] for i in indices]
    return items


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    return optree.tree_map(fn, tree, *rest, none_is_leaf=False)


def param_count(tree: Any) -> int:
    return sum(x.numel() for x in leaves(tree) if isinstance(x, torch.Tensor))


def tree_bytes(tree: Any) -> int:
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))
