"""Gradient reduction: bucketed, asynchronous, started while backward is still running.

A replicated parameter's gradient comes out of backward as a DTensor that is Partial over the
data axes (each rank holds its own micro-batch's contribution). `GradReducer` hooks every leaf;
as gradients arrive they are packed into buckets of about `bucket_bytes`, and a full bucket is
reduced with one asynchronous collective (all-reduce for data parallelism and ZeRO-1,
reduce-scatter for ZeRO-2) while backward computes the earlier layers. `finish` waits for the
buckets, rebuilds each gradient in the layout's gradient placement and settles anything left
(partial sums over the tensor-parallel axis, unused leaves) with plain redistributions.

Without hooks (`overlap=False`) `finish` reduces everything after backward; the result is the
same, only later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel.layout import Layout, is_dtensor
from parallel.tree import map_with_path, named_leaves

DEFAULT_BUCKET_BYTES = 25 << 20  # DDP's default


@dataclass
class _Bucket:
    mesh_dim: int
    scatter_dim: int | None  # None: all-reduce; else reduce-scatter along this tensor dim
    dtype: torch.dtype
    items: list = field(default_factory=list)  # (path, grad DTensor)
    nbytes: int = 0
    work: Any = None
    output: torch.Tensor | None = None


class GradReducer:
    """Reduce gradients to `layout`'s gradient placements, overlapping with backward."""

    def __init__(self, layout: Layout, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True):
        self.layout = layout
        self.bucket_bytes = bucket_bytes
        self.overlap = overlap and not layout.trivial
        self._open: dict[tuple, _Bucket] = {}
        self._launched: list[_Bucket] = []
        self._reduced: dict[str, Any] = {}

    # ------------------------------------------------------------------ during backward

    def watch(self, params: Any) -> Any:
        """Hook every DTensor leaf that requires grad (call inside the loss, on its inputs)."""
        if not self.overlap:
            return params
        self._reset()
        for path, x in named_leaves(params):
            if is_dtensor(x) and x.requires_grad:
                x.register_hook(functools.partial(self._on_grad, path))
        return params

    def _on_grad(self, path: str, grad):
        target = self._target(path, grad)
        step = _first_reduction(grad.placements, target)
        if step is None:
            return None
        mesh_dim, scatter_dim = step
        if scatter_dim is not None and grad.to_local().shape[scatter_dim] % self._size(mesh_dim):
            return None  # uneven shards: settled by redistribute in finish
        key = (mesh_dim, scatter_dim, grad.dtype)
        bucket = self._open.setdefault(key, _Bucket(mesh_dim, scatter_dim, grad.dtype))
        bucket.items.append((path, grad))
        bucket.nbytes += grad.to_local().numel() * grad.element_size()
        if bucket.nbytes >= self.bucket_bytes:
            self._launch(self._open.pop(key))
        return None

    def _launch(self, bucket: _Bucket) -> None:
        group = self.layout.device_mesh.get_group(bucket.mesh_dim)
        locals_ = [g.to_local() for _, g in bucket.items]
        if bucket.scatter_dim is None:
            buf = torch.cat([t.reshape(-1) for t in locals_])
            bucket.work = dist.all_reduce(buf, group=group, async_op=True)
            bucket.output = buf
        else:
            n = self._size(bucket.mesh_dim)
            # rank-major packing: rank j's slice of the buffer holds its chunk of every tensor
            pieces = [[c.reshape(-1) for c in t.chunk(n, dim=bucket.scatter_dim)] for t in locals_]
            buf = torch.cat([p[j] for j in range(n) for p in pieces])
            out = torch.empty(buf.numel() // n, dtype=buf.dtype, device=buf.device)
            bucket.work = _reduce_scatter(out, buf, group)
            bucket.output = out
        self._launched.append(bucket)

    # ------------------------------------------------------------------ after backward

    def finish(self, grads: Any) -> Any:
        """Gradients in the layout's gradient placements (waits for the buckets)."""
        if self.layout.trivial:
            return grads
        for bucket in list(self._open.values()):
            self._launch(bucket)
        self._open.clear()
        for bucket in self._launched:
            bucket.work.wait()
            self._unpack(bucket)
        self._launched.clear()

        def settle(path, g):
            if not is_dtensor(g):
                return g
            g = self._reduced.pop(path, g)
            target = self._target(path, g)
            return g if tuple(g.placements) == target else g.redistribute(g.device_mesh, target)

        out = map_with_path(settle, grads)
        self._reset()
        return out

    def _unpack(self, bucket: _Bucket) -> None:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        offset = 0
        for path, g in bucket.items:
            local_shape = list(g.to_local().shape)
            if bucket.scatter_dim is not None:
                local_shape[bucket.scatter_dim] //= self._size(bucket.mesh_dim)
            numel = _numel(local_shape)
            local = bucket.output[offset:offset + numel].view(local_shape)
            offset += numel
            placements = list(g.placements)
            placements[bucket.mesh_dim] = (Replicate() if bucket.scatter_dim is None
                                           else Shard(bucket.scatter_dim))
            self._reduced[path] = DTensor.from_local(local, g.device_mesh, placements,
                                                     shape=g.shape, stride=g.stride(), run_check=False)

    # ------------------------------------------------------------------ helpers

    def _target(self, path: str, grad) -> tuple:
        return self.layout.leaf_placements(path, grad.dim(), "grads")

    def _size(self, mesh_dim: int) -> int:
        return self.layout.device_mesh.size(mesh_dim)

    def _reset(self) -> None:
        self._open.clear()
        self._launched.clear()
        self._reduced.clear()


def _first_reduction(current: tuple, target: tuple) -> tuple[int, int | None] | None:
    """(mesh dim, scatter tensor dim or None) of the first partial sum to settle, if any."""
    for i, (p, t) in enumerate(zip(current, target)):
        if p.is_partial() and getattr(p, "reduce_op", "sum") == "sum":
            if t.is_replicate():
                return i, None
            if t.is_shard() and not any(q.is_shard(t.dim) for q in current):
                return i, t.dim
            return None
    return None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _reduce_scatter(out: torch.Tensor, buf: torch.Tensor, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, buf, group=group, async_op=True)


def reduce_gradients(grads: Any, layout: Layout) -> Any:
    """Settle every gradient into the layout's gradient placements, after backward."""
    return GradReducer(layout, overlap=False).finish(grads)
