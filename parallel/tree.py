"""Pytree helpers (optree): a leaf's identity is its dotted path, e.g. `layers.3.attn.wq`.

The same convention as aquila_fn.pytree, restated here because parallel/ imports nothing
from aquila_fn.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import optree


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def named_leaves(tree: Any) -> Iterator[tuple[str, Any]]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False)
    for path, leaf in zip(paths, leaves):
        yield path_str(path), leaf


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    return optree.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest,
                                     none_is_leaf=False)


def leaves(tree: Any) -> list:
    return optree.tree_leaves(tree, none_is_leaf=False)


def structure(tree: Any):
    return optree.tree_structure(tree, none_is_leaf=False)


def unflatten(spec, leaves_: list) -> Any:
    return optree.tree_unflatten(spec, leaves_)
