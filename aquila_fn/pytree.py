"""Pytree helpers on optree: a leaf's dotted path string (`layers.3.attn.wq`) is its identity."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import optree
import torch

# None is a leaf here: it marks an absent tensor without changing the tree's structure.
_NONE_IS_LEAF = False


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def named_leaves(tree: Any) -> Iterator[tuple[str, Any]]:
    """(path string, leaf) pairs in the tree's canonical order."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=_NONE_IS_LEAF)
    for path, leaf in zip(paths, leaves):
        yield path_str(path), leaf


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


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
    """Map `fn(path, leaf, *other_leaves)` over the tree, keeping its structure."""
    return optree.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest,
                                     none_is_leaf=_NONE_IS_LEAF)


def tree_map(fn: Callable, tree: Any, *rest: Any) -> Any:
    return optree.tree_map(fn, tree, *rest, none_is_leaf=_NONE_IS_LEAF)


def leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, none_is_leaf=_NONE_IS_LEAF)


def structure(tree: Any):
    return optree.tree_structure(tree, none_is_leaf=_NONE_IS_LEAF)


def unflatten(treespec, leaves_: list) -> Any:
    return optree.tree_unflatten(treespec, leaves_)


def param_count(tree: Any) -> int:
    return sum(x.numel() for x in leaves(tree) if isinstance(x, torch.Tensor))


def tree_bytes(tree: Any) -> int:
    return sum(x.numel() * x.element_size() for x in leaves(tree) if isinstance(x, torch.Tensor))
