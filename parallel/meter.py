"""Measuring what a rank holds and sends, by observing the real code path.

`CommMeter` is a dispatch mode that records every collective (functional and c10d) with its
payload and group size; `SavedMeter` counts the bytes autograd saves for backward (the
activation memory of a micro-batch). Both work on real tensors and on meta tensors under a
fake process group, which is how `parallel.plan` sizes a run it cannot allocate.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.layout import is_dtensor
from parallel.tree import leaves


def local_bytes(x: Any) -> int:
    """Bytes of this rank's block of a tensor (its local tensor for a DTensor)."""
    if not isinstance(x, torch.Tensor):
        return 0
    t = x.to_local() if is_dtensor(x) else x
    return t.numel() * t.element_size()


def tree_local_bytes(tree: Any) -> int:
    return sum(local_bytes(x) for x in leaves(tree))


# ---------------------------------------------------------------------- communication

# (kind, index of the payload tensor argument) per collective op name (functional and c10d).
_KINDS = {
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce", "allreduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "_allgather_base_": "all_gather", "allgather_": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "all_to_all_single": "all_to_all", "alltoall_base_": "all_to_all", "alltoall_": "all_to_all",
    "broadcast": "broadcast", "broadcast_": "broadcast",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv",
}


def _route(types) -> str:
    """"count" plain-tensor ops; "defer" to tensor subclasses (DTensor, async collective
    results) so the plain ops and collectives they run inside, implicit redistributions
    included, come back through the meter (a mode that ran a DTensor op itself would see none
    of them); "skip" the fake tensors DTensor's sharding propagation computes shapes with."""
    if any(t.__name__ == "FakeTensor" for t in types):
        return "skip"
    return "defer" if any(t not in (torch.Tensor, torch.nn.Parameter) for t in types) else "count"


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _group_size(func, args) -> int:
    import torch.distributed as dist

    for a in args:
        if type(a).__name__ == "ScriptObject":
            try:
                return dist.ProcessGroup.unbox(a).size()
            except Exception:  # noqa: BLE001 - a ReduceOp, not a group
                continue
    for a in reversed(args):
        if isinstance(a, str):  # functional collectives name their group
            try:
                return dist.distributed_c10d._resolve_process_group(a).size()
            except Exception:  # noqa: BLE001
                pass
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    return ints[0] if ints else 1


def _sent_bytes(kind: str, payload: int, n: int, func_name: str) -> float:
    """Bytes one rank sends with ring algorithms. payload = the op's input bytes on this rank."""
    if n <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n * payload
    if kind == "all_gather":
        return float((n - 1) * payload) if "base" in func_name or "into_tensor" in func_name \
            else (n - 1) / n * payload
    if kind in ("reduce_scatter", "all_to_all"):
        return (n - 1) / n * payload
    if kind in ("broadcast", "send"):
        return float(payload)
    return 0.0


@dataclass
class CommRecord:
    calls: int = 0
    payload_bytes: int = 0
    sent_bytes: float = 0.0


class CommMeter(TorchDispatchMode):
    """Record collectives as (kind, group size) -> calls, payload bytes, bytes sent per rank."""

    def __init__(self):
        super().__init__()
        self.records: dict[tuple[str, int], CommRecord] = defaultdict(CommRecord)
        self.enabled = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        route = _route(types)
        if route == "defer":
            return NotImplemented
        kwargs = kwargs or {}
        if route == "count" and self.enabled and func.namespace in ("_c10d_functional", "c10d"):
            name = func._schema.name.split("::")[-1]
            kind = _KINDS.get(name)
            if kind is not None:
                n = _group_size(func, list(args) + list(kwargs.values()))
                payload = self._payload(kind, name, args)
                rec = self.records[(kind, n)]
                rec.calls += 1
                rec.payload_bytes += payload
                rec.sent_bytes += _sent_bytes(kind, payload, n, name)
        return func(*args, **kwargs)

    @staticmethod
    def _payload(kind: str, name: str, args) -> int:
        ts = _tensors(args[0]) if args else []
        if name in ("_allgather_base_", "_reduce_scatter_base_") and len(args) > 1:
            ts = _tensors(args[1])  # (output, input, ...): the input is what this rank owns
        elif name in ("allgather_", "reduce_scatter_") and len(args) > 1:
            ts = _tensors(args[1])
        return sum(t.numel() * t.element_size() for t in ts)

    def total_sent(self) -> float:
        return sum(r.sent_bytes for r in self.records.values())

    def summary(self) -> dict:
        return {f"{kind}@{n}": {"calls": r.calls, "payload_bytes": r.payload_bytes,
                                "sent_bytes": r.sent_bytes}
                for (kind, n), r in sorted(self.records.items())}


# ---------------------------------------------------------------------- activations


def _storage(t: torch.Tensor):
    """(identity, bytes) of the storage behind a tensor (a DTensor's local block). Views share
    it, also views made below autograd (inside DTensor ops) and on meta tensors."""
    local = t.to_local() if is_dtensor(t) else t
    st = local.untyped_storage()
    return st._cdata, st.nbytes()


@dataclass
class SavedMeter:
    """Bytes saved for backward while active, each storage once, excluding the storages of
    `exclude` (the parameters, counted as parameters). Saved-tensor hooks opened inside it
    (checkpoint's, ZeRO-3's ReshardAfterForward) take precedence: what they save is not seen."""

    exclude: list = field(default_factory=list)
    bytes: int = 0

    def __post_init__(self):
        self._seen: dict[int, torch.Tensor] = {}
        self._excluded = {_storage(x)[0] for x in self.exclude if isinstance(x, torch.Tensor)}

    def _pack(self, t):
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage(t)
            if key not in self._seen and key not in self._excluded:
                self._seen[key] = t  # holds the storage, so its identity stays unique
                self.bytes += nbytes
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._seen.clear()


def graph_saved_bytes(output: torch.Tensor, exclude: list = ()) -> int:
    """Bytes of the distinct storages the autograd graph behind `output` has saved (read off
    the graph's nodes, so independent of `SavedMeter`'s hooks), excluding those of `exclude`.
    Reading a saved tensor runs its unpack hook: under ZeRO-3 that re-gathers the weight (a
    collective, so every rank must call this), and the re-gathered bytes count."""
    excluded = {_storage(x)[0] for x in exclude if isinstance(x, torch.Tensor)}
    seen: dict[int, int] = {}
    visited, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except Exception:  # noqa: BLE001 - freed or non-tensor fields
                continue
            for t in _tensors(value):
                key, nbytes = _storage(t)
                if key not in excluded:
                    seen[key] = nbytes
        stack.extend(n for n, _ in node.next_functions)
    return sum(seen.values())


def _storage_id(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - tensors without storage (sparse, ...)
        return None


class LiveMeter(TorchDispatchMode):
    """Bytes of the storages created while active that are still alive, and their peak: the
    memory a forward leaves for backward (saved activations, inputs kept for recomputation,
    gathered parameters) and what backward adds on top. Counts by storage identity through
    weak references, so it works on meta tensors, where nothing is allocated."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage id -> [nbytes, live tensor count]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        route = _route(types)
        if route == "defer":
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if route == "skip":
            return out
        # a view or an in-place result shares an input's storage: not a new allocation
        inputs = {_storage_id(t) for t in _tensors(list(args) + list(kwargs.values()))}
        for t in _tensors(out):
            self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set) -> None:
        import weakref

        key = _storage_id(t)
        if key is None:
            return
        entry = self._refs.get(key)
        if entry is None:
            if key in inputs:
                return  # a view of memory that existed before the meter started
            st = t.untyped_storage()
            entry = self._refs[key] = [st.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key, entry)

    def _release(self, key: int, entry: list) -> None:
        entry[1] -= 1
        if entry[1] == 0 and self._refs.get(key) is entry:
            del self._refs[key]
            self.live -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.live
