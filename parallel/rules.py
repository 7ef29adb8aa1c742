"""Sharding rules: an ordered table of (regex on a leaf's path, spec over mesh axes).

    RULES = [
        (r"attn\\.w[qkv]$", ("tp", "fsdp")),   # dim 0 split over tp, dim 1 over the data axis
        (r"norm$",          (None,)),           # replicated
        (r".*",             ()),                # catch-all: replicated
    ]

A spec has one entry per tensor dimension (shorter specs are padded with None): None
(replicated), an axis name, or a tuple of axis names (split over their product). The first
rule whose regex `re.search`es the path wins; a leaf no rule matches is an error that names it.
Names are resolved by the caller (see `layout.Layout.axes_for`), so one table serves every mesh:
an axis the mesh does not have simply means "not split".
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

Spec = tuple  # entries: None | str | tuple[str, ...]
Rules = Sequence[tuple[str, Spec]]


class RuleError(ValueError):
    """A sharding table that does not fit the tree: an unmatched leaf, a bad spec."""


def check_rules(rules: Rules) -> list[tuple[re.Pattern, Spec]]:
    """Compile the table, rejecting malformed entries up front."""
    compiled = []
    for i, entry in enumerate(rules):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise RuleError(f"rule {i} must be (regex, spec), got {entry!r}")
        pattern, spec = entry
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise RuleError(f"rule {i}: bad regex {pattern!r}: {e}") from None
        compiled.append((regex, normalize_spec(spec, f"rule {i} ({pattern!r})")))
    return compiled


def normalize_spec(spec: Any, where: str = "spec") -> Spec:
    """A spec as a tuple whose entries are None or tuples of axis names."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        spec = (spec,)
    if not isinstance(spec, (tuple, list)):
        raise RuleError(f"{where}: spec {spec!r} must be a tuple with one entry per tensor dim")
    out = []
    for entry in spec:
        if entry is None:
            out.append(None)
        elif isinstance(entry, str):
            out.append((entry,))
        elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
            out.append(tuple(entry) or None)
        else:
            raise RuleError(f"{where}: spec entry {entry!r} must be None, an axis name or a tuple of names")
    return tuple(out)


def match(rules: Rules, path: str) -> Spec:
    """The spec of the first rule whose regex matches `path`."""
    for regex, spec in _compiled(rules):
        if regex.search(path):
            return spec
    raise RuleError(f"no sharding rule matches leaf {path!r}; add a (regex, spec) entry for it "
                    f"(or a catch-all (r'.*', ()) to replicate everything else)")


def leaf_spec(rules: Rules, path: str, ndim: int) -> Spec:
    """The matched spec, padded to `ndim` entries; too many entries is an error naming the leaf."""
    spec = match(rules, path)
    if len(spec) > ndim:
        raise RuleError(f"leaf {path!r} has {ndim} dims but its rule gives a {len(spec)}-entry spec {spec}")
    return spec + (None,) * (ndim - len(spec))


def spec_axes(spec: Spec) -> Iterable[str]:
    for entry in spec:
        yield from entry or ()


_CACHE: dict[int, tuple[Rules, list]] = {}


def _compiled(rules: Rules) -> list[tuple[re.Pattern, Spec]]:
    # The table is data handed around by value; compile each distinct table object once.
    key = id(rules)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not rules:
        hit = (rules, check_rules(rules))
        _CACHE[key] = hit
    return hit[1]
