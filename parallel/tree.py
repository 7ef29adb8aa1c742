"""Pytree helpers (optree): a leaf's identity is its dotted path, e.g. `layers.3.attn.wq`.

The primitives for the whole project: parallel/ imports nothing from aquila_fn, and
aquila_fn.core.pytree builds its dict helpers on these. None is not a leaf (an empty subtree).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import optree


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def named_leaves(tree: Any) -> Iterator[tuple[str, Any]]:
    """(path string, leaf) pairs in the tree's canonical order."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    for path, leaf in zip(paths, leaves):
        yield path_str(path), leaf


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Map `fn(path, leaf, *other_leaves)` over the tree, keeping its structure."""
    return optree.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest,
                                     none_is_leaf=False)


def leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, none_is_leaf=False)


def structure(tree: Any):
    return optree.tree_structure(tree, none_is_leaf=False)


def unflatten(spec, leaves_: list) -> Any:
    return optree.tree_unflatten(spec, leaves_)
