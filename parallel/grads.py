"""Gradient reduction: bucketed, asynchronous, started while backward is still running.

A replicated parameter's gradient comes out of backward as a DTensor that is Partial over the
data axes (each rank holds its own micro-batch's contribution). `GradReducer` hooks every leaf;
as gradients arrive they are packed into buckets of about `bucket_bytes` (the first one of a
backward smaller, as in DDP, so communication starts early), and a full bucket is reduced with
one asynchronous collective (all-reduce for data parallelism and ZeRO-1,
reduce-scatter for ZeRO-2) while backward computes the earlier layers. A parameter split over
a data axis (ZeRO-3 / fsdp) is all-gathered for the forward by `parallel.zero.compute_view`,
whose backward hands the gathered weight's partial gradient to the same buckets (an
asynchronous reduce-scatter) instead of reduce-scattering it on the spot. At the end of each
backward pass the last, partly filled buckets are sent too, so every collective is issued
before backward returns. `finish` waits for the buckets, rebuilds each gradient in the
layout's gradient placement and settles anything left (partial sums over the
tensor-parallel axis, unused leaves, uneven splits) with plain redistributions.

Gradient accumulation (`begin_step(micro_batches)`): replicated leaves are reduced once, during
the last micro-batch's backward, as DDP's no_sync does: the hook adds that micro-batch's
gradient to the running sum of the earlier ones, which `aquila_fn.training.train.accumulate_gradients`
keeps in place in the first micro-batch's gradient tensors. Split leaves (ZeRO-3) are
reduce-scattered in every micro-batch, so no rank ever holds a whole gradient, and the shards
are summed. A loss scale (fp16) is divided out of the reduced buckets in `finish`.

All collectives are c10d operations with async work handles on the data axis' process group,
issued in the same order on every rank (the autograd order) and waited in that order.

Pipeline stages accumulate gradients in the parameters' `.grad` instead (`watch_accumulated`):
each is bucketed after the stage's last micro-batch has added to it.

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
FIRST_BUCKET_BYTES = 1 << 20  # DDP's too: the first bucket of a backward is sent early
# Reduce-scatter buckets in flight at once: each holds a packed copy of whole gradients until it
# completes (ZeRO-3 keeps no whole gradient otherwise), so older ones are waited for first.
MAX_SCATTERS_IN_FLIGHT = 2


@dataclass
class _Bucket:
    mesh_dim: int
    scatter_dim: int | None  # None: all-reduce; else reduce-scatter along this tensor dim
    dtype: torch.dtype
    items: list = field(default_factory=list)  # (path, local tensors to add up, _Meta of the gradient)
    nbytes: int = 0
    work: Any = None
    output: torch.Tensor | None = None


@dataclass(frozen=True)
class _Meta:
    """What rebuilding a reduced gradient needs of the one backward produced (not its data)."""

    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple
    local_shape: tuple

    @classmethod
    def of(cls, g) -> "_Meta":
        return cls(g.device_mesh, tuple(g.placements), g.shape, g.stride(), tuple(g.to_local().shape))


class GradReducer:
    """Reduce gradients to `layout`'s gradient placements, overlapping with backward."""

    def __init__(self, layout: Layout, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True):
        self.layout = layout
        self.bucket_bytes = bucket_bytes
        self.overlap = overlap and not layout.trivial
        self.micro_batches, self.scale = 1, 1.0
        self._micro = 0                             # backward passes watched in this step
        self._open: dict[tuple, _Bucket] = {}
        self._launched: list[_Bucket] = []
        self._reduced: dict[str, Any] = {}          # path -> [local sum, (_Meta, placements)]
        self._first: dict[str, Any] = {}           # path -> first micro-batch's gradient
        self._accumulated: dict[str, int] = {}     # path -> backward passes accumulated in .grad
        self._flush_queued = False

    def begin_step(self, micro_batches: int = 1, scale: float = 1.0) -> None:
        """Before a step of `micro_batches` backward passes whose gradients carry the loss
        scale `scale` (fp16; divided out by finish)."""
        self._reset()
        self.micro_batches, self.scale = micro_batches, float(scale)

    # ------------------------------------------------------------------ during backward

    def watch(self, params: Any) -> Any:
        """Hook every DTensor leaf that requires grad (call inside the loss, on its inputs,
        once per micro-batch)."""
        if not self.overlap:
            return params
        self._drain()  # the previous micro-batch's reduce-scatters (ZeRO-3), summed
        micro, self._micro = self._micro, self._micro + 1
        last = micro >= self.micro_batches - 1
        for path, x in named_leaves(params):
            if is_dtensor(x) and x.requires_grad:
                x.register_hook(functools.partial(self._on_grad, path, micro, last))
        return params

    def watch_accumulated(self, params: Any) -> None:
        """Hook parameters whose gradients accumulate in `.grad` over the step's backward passes
        (a pipeline schedule's micro-batches; call once, the hooks stay): each is bucketed
        after its last accumulation, while the rest of backward runs."""
        if not self.overlap:
            return
        for path, x in named_leaves(params):
            if is_dtensor(x) and x.requires_grad:
                x.register_post_accumulate_grad_hook(functools.partial(self._on_accumulated, path))

    def _on_accumulated(self, path: str, param) -> None:
        count = self._accumulated[path] = self._accumulated.get(path, 0) + 1
        grad = param.grad
        if count < self.micro_batches or grad is None:
            return
        step = _first_reduction(grad.placements, self._target(path, grad))
        if step is not None and not self._uneven(grad, *step):
            self._add(path, [grad.to_local()], grad, *step)

    def _on_grad(self, path: str, micro: int, last: bool, grad):
        """A replicated leaf's gradient of one micro-batch: bucketed on the last one (with the
        running sum of the earlier ones), else left for the train step to accumulate."""
        if grad is None:  # a split leaf: its gathered weight's gradient went to reduce_split
            return None
        step = _first_reduction(grad.placements, self._target(path, grad))
        if step is None or self._uneven(grad, *step):
            return None  # settled by redistribute in finish
        if not last:
            if micro == 0:
                self._first[path] = grad  # the train step sums later micro-batches into it
            return None
        parts = [grad.to_local()]
        if micro > 0:
            if path not in self._first:
                return None  # no gradient in the first micro-batch: settled in finish
            parts.insert(0, self._first[path].to_local())
        self._add(path, parts, grad, *step)
        return None

    def reduce_split(self, path: str, grad, placements: tuple):
        """The gradient of a weight all-gathered from `placements` (ZeRO-3): bucketed for an
        asynchronous reduction towards its gradient placement (returns None: the result comes
        from finish), or, where buckets cannot take it, redistributed to `placements` now."""
        step = _first_reduction(grad.placements, self._target(path, grad))
        if step is None or self._uneven(grad, *step):
            return grad.redistribute(grad.device_mesh, placements)
        self._add(path, [grad.to_local()], grad, *step)
        return None

    def _add(self, path: str, parts: list, grad, mesh_dim: int, scatter_dim: int | None) -> None:
        if not self._flush_queued:  # send the last, partly filled buckets when backward ends
            self._flush_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
        key = (mesh_dim, scatter_dim, grad.dtype)
        bucket = self._open.setdefault(key, _Bucket(mesh_dim, scatter_dim, grad.dtype))
        bucket.items.append((path, parts, _Meta.of(grad)))
        bucket.nbytes += parts[0].numel() * parts[0].element_size()
        cap = self.bucket_bytes if self._launched else min(self.bucket_bytes, FIRST_BUCKET_BYTES)
        if bucket.nbytes >= cap:
            self._launch(self._open.pop(key))

    def _flush(self) -> None:
        self._flush_queued = False
        for bucket in list(self._open.values()):
            self._launch(bucket)
        self._open.clear()

    def _launch(self, bucket: _Bucket) -> None:
        group = self.layout.device_mesh.get_group(bucket.mesh_dim)
        n = self._size(bucket.mesh_dim)
        buf = _pack(bucket, n)
        if bucket.scatter_dim is None:
            bucket.work = dist.all_reduce(buf, group=group, async_op=True)
            bucket.output = buf
        else:
            out = torch.empty(buf.numel() // n, dtype=buf.dtype, device=buf.device)
            bucket.work = _reduce_scatter(out, buf, group)
            bucket.output = out
        bucket.items = [(path, None, meta) for path, _, meta in bucket.items]  # the packed copy suffices
        self._launched.append(bucket)
        while sum(b.scatter_dim is not None for b in self._launched) > MAX_SCATTERS_IN_FLIGHT:
            self._retire(self._launched.pop(0))  # oldest first: the order they were issued in

    # ------------------------------------------------------------------ after backward

    def finish(self, grads: Any) -> Any:
        """Gradients in the layout's gradient placements (waits for the buckets)."""
        if self.layout.trivial:
            return grads
        self._flush()
        self._drain()
        self._check_accumulated_in_place(grads)
        reduced = {path: _as_dtensor(local, g) for path, (local, g) in self._reduced.items()}

        def settle(path, g):
            if not is_dtensor(g):
                return g
            g = reduced.get(path, g)
            target = self._target(path, g)
            return g if tuple(g.placements) == target else g.redistribute(g.device_mesh, target)

        out = map_with_path(settle, grads)
        self._reset()
        return out

    def _drain(self) -> None:
        """Wait for the launched buckets (in issue order) and add their results up per leaf."""
        for bucket in self._launched:
            self._retire(bucket)
        self._launched.clear()

    def _retire(self, bucket: _Bucket) -> None:
        bucket.work.wait()
        bucket.work = None  # (drops the packed input of a reduce-scatter)
        if self.scale != 1.0:
            bucket.output.mul_(1.0 / self.scale)
        self._unpack(bucket)

    def _unpack(self, bucket: _Bucket) -> None:
        offset = 0
        for path, _, g in bucket.items:
            local_shape = list(g.local_shape)
            if bucket.scatter_dim is not None:
                local_shape[bucket.scatter_dim] //= self._size(bucket.mesh_dim)
            numel = _numel(local_shape)
            local = bucket.output[offset:offset + numel].view(local_shape)
            offset += numel
            placements = list(g.placements)
            placements[bucket.mesh_dim] = (_replicate() if bucket.scatter_dim is None
                                           else _shard(bucket.scatter_dim))
            if path in self._reduced:  # another micro-batch's (or use's) shard of the same leaf
                self._reduced[path][0].add_(local)
            else:
                self._reduced[path] = [local, (g, tuple(placements))]

    def _check_accumulated_in_place(self, grads: Any) -> None:
        """The no_sync reduction summed the running sum kept in the first micro-batch's
        gradients: the gradients handed to finish must be those very tensors."""
        if not self._first:
            return
        for path, g in named_leaves(grads):
            if path in self._first and path in self._reduced and g is not self._first[path]:
                raise RuntimeError(f"gradient of {path!r} was not accumulated in place into the first "
                                   "micro-batch's gradient (see aquila_fn.training.train.accumulate_gradients)")

    # ------------------------------------------------------------------ helpers

    def _target(self, path: str, grad) -> tuple:
        return self.layout.leaf_placements(path, grad.dim(), "grads")

    def _size(self, mesh_dim: int) -> int:
        return self.layout.device_mesh.size(mesh_dim)

    def _uneven(self, grad, mesh_dim: int, scatter_dim: int | None) -> bool:
        return scatter_dim is not None and grad.to_local().shape[scatter_dim] % self._size(mesh_dim) != 0

    def _reset(self) -> None:
        self._micro, self._flush_queued = 0, False
        self._accumulated.clear()
        self._open.clear()
        self._launched.clear()
        self._reduced.clear()
        self._first.clear()

    def buffer_bytes(self, params: Any) -> int:
        """Most bytes of bucket buffers a step with overlap holds besides the gradients backward
        produces: all-reduced gradients live in their buckets until finish (a second copy of
        them), reduce-scattered ones pass through at most MAX_SCATTERS_IN_FLIGHT buckets."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        reduced, scattered = 0, 0
        for path, x in named_leaves(params):
            if not is_dtensor(x) or not x.requires_grad:
                continue
            # backward's gradient: placed as the forward computed with the weight, partial over
            # the data axes
            placements = tuple(_partial() if i in self._data_dims() else p for i, p in
                               enumerate(self.layout.leaf_placements(path, x.dim(), "compute")))
            step = _first_reduction(placements, self._target(path, x))
            shape, _ = compute_local_shape_and_global_offset(x.shape, x.device_mesh, placements)
            if step is None or (step[1] is not None and shape[step[1]] % self._size(step[0])):
                continue
            nbytes = _numel(shape) * x.element_size()
            if step[1] is None:
                reduced += nbytes
            else:
                scattered += nbytes
        return reduced + min(scattered, MAX_SCATTERS_IN_FLIGHT * self.bucket_bytes)

    def _data_dims(self) -> set[int]:
        names = self.layout.device_mesh.mesh_dim_names
        return {names.index(a) for a in self.layout.data_axes}


def _pack(bucket: _Bucket, n: int) -> torch.Tensor:
    """One flat buffer of the bucket's gradients (each the sum of its parts). For a
    reduce-scatter, rank-major: rank j's slice holds its chunk of every tensor."""
    sums = []
    for _, parts, _ in bucket.items:
        total = parts[0] if len(parts) == 1 else functools.reduce(torch.add, parts)
        sums.append(total)
    if bucket.scatter_dim is None:
        return torch.cat([t.reshape(-1) for t in sums])
    pieces = [[c.reshape(-1) for c in t.chunk(n, dim=bucket.scatter_dim)] for t in sums]
    return torch.cat([p[j] for j in range(n) for p in pieces])


def _as_dtensor(local: torch.Tensor, meta) -> Any:
    from torch.distributed.tensor import DTensor

    g, placements = meta
    return DTensor.from_local(local, g.mesh, placements, shape=g.shape, stride=g.stride, run_check=False)


def _partial():
    from torch.distributed.tensor import Partial

    return Partial()


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()


def _shard(dim: int):
    from torch.distributed.tensor import Shard

    return Shard(dim)


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
