"""ZeRO over the data axis: parameter gathering for computation (stage 3 / FSDP) and the
optimizer wrapper that keeps optimizer state sharded (stages 1-3) and, optionally, in host
memory (ZeRO-Offload).

    with ReshardAfterForward() as reshard:                         # inside the loss
        params = compute_view(params, layout, stream="layers", reshard=reshard)
        ...                                                        # the forward
    opt = distributed_optimizer(adamw(...), layout, max_grad_norm=1.0, offload=False)

The wrapped optimizer keeps the optax shape (init, update, apply_, schedule) so a train step
written for one process uses it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

from parallel.layout import Layout, is_dtensor, place
from parallel.mesh import overlapping_gathers_safe
from parallel.tree import leaves, map_with_path, named_leaves

# ---------------------------------------------------------------------- stage 3: gather to compute


def _compute_placements(layout: Layout, path: str, x) -> tuple:
    return layout.leaf_placements(path, x.dim(), "compute")


def needs_gather(layout: Layout) -> bool:
    """Whether parameters are split over a data axis (ZeRO-3 or an fsdp axis)."""
    return not layout.trivial and (layout.mesh.has("fsdp") or (layout.zero >= 3 and layout.mesh.has("dp")))


def _gather_leaf(layout: Layout, path: str, x, async_op: bool):
    if not is_dtensor(x):
        return x
    target = _compute_placements(layout, path, x)
    if tuple(x.placements) == target:
        return x
    # Differentiable: the backward of this all-gather is the gradient's reduce-scatter.
    return x.redistribute(x.device_mesh, target, async_op=async_op)


class _GatherReduceLater(torch.autograd.Function):
    """The ZeRO-3 all-gather of one leaf, whose backward hands the gathered weight's partial
    gradient to a GradReducer bucket (an asynchronous reduce-scatter issued during backward)
    instead of reduce-scattering it on the spot; the leaf's gradient then comes from the
    reducer's finish (autograd gives it none, or the synchronous result where buckets cannot
    take it)."""

    @staticmethod
    def forward(ctx, x, gather: Callable[[], Any], reducer, path: str):
        ctx.reducer, ctx.path, ctx.placements = reducer, path, tuple(x.placements)
        return gather()

    @staticmethod
    def backward(ctx, grad):
        return ctx.reducer.reduce_split(ctx.path, grad, ctx.placements), None, None, None


def _plain_local(t, wait: bool = False):
    """The plain tensor holding a DTensor's (or tensor's) data on this rank; of a gather still in
    flight, its output buffer (waited for first with `wait`)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    x = t._local_tensor if is_dtensor(t) else t
    if isinstance(x, AsyncCollectiveTensor):
        return x.wait() if wait else x.elem
    return x


class _SavedGather:
    """What autograd keeps, under ReshardAfterForward, in place of a saved view of a gathered
    weight: how to gather it again and which view of it was saved."""

    def __init__(self, regather: Callable[[], Any], saved, local: torch.Tensor):
        self.regather = regather
        self.view = (local.size(), local.stride(), local.storage_offset())
        self.nbytes = local.untyped_storage().nbytes()
        self.spec = (saved.device_mesh, saved.placements, saved.shape, saved.stride()) \
            if is_dtensor(saved) else None

    def rebuild(self):
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            local = _plain_local(self.regather(), wait=True)
        if local.untyped_storage().nbytes() != self.nbytes:  # the view below would read garbage
            raise RuntimeError(f"re-gathered weight has {local.untyped_storage().nbytes()} bytes, "
                               f"the saved one had {self.nbytes}")
        view = local.as_strided(*self.view)
        if self.spec is None:
            return view
        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(view, mesh, placements, run_check=False, shape=shape, stride=stride)


class ReshardAfterForward:
    """Saved-tensor hooks for ZeRO-3 without recomputation: when autograd saves a gathered
    weight (or a view of one) for backward, it keeps how to gather it again instead, and
    backward re-gathers it when it reads it. So no gathered weight outlives its layer's forward
    (FSDP's reshard after forward) for any recomputation policy, at the price of one more
    all-gather per saved use in backward. Inside recomputed regions (recompute="full")
    checkpoint's own hooks apply: there the whole layer, gathers included, is recomputed."""

    def __init__(self):
        self._gathered: dict[int, tuple] = {}  # storage id -> (weak ref to it, regather)

    def track(self, gathered, regather: Callable[[], Any]):
        """Note that `gathered` can be rebuilt by calling `regather()`; returns `gathered`."""
        from torch.multiprocessing.reductions import StorageWeakRef

        ref = StorageWeakRef(_plain_local(gathered).untyped_storage())
        self._gathered[ref.cdata] = (ref, regather)
        return gathered

    def _pack(self, t):
        from torch.multiprocessing.reductions import StorageWeakRef

        local = _plain_local(t)
        # (a weak ref keeps its storage's address from being reused, so cdata is unambiguous)
        entry = self._gathered.get(StorageWeakRef(local.untyped_storage()).cdata)
        if entry is None or entry[0].expired():
            return t
        return _SavedGather(entry[1], t, local)

    @staticmethod
    def _unpack(x):
        return x.rebuild() if isinstance(x, _SavedGather) else x

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class GatherOnAccess(Mapping):
    """A read-only view of one item's sharded subtree whose leaves are all-gathered when read.

    Holding this view holds only the shards, so when the model's full recomputation keeps a
    layer's parameters for backward it keeps the view, not the gathered weights: those are
    freed after the layer's forward and gathered again when backward recomputes the layer
    (ZeRO-3's reshard after forward). A leaf gathered ahead of time is used once, then dropped."""

    def __init__(self, tree: dict, prefix: str, gather: Callable[[str, Any], Any], ready: dict,
                 finish: Callable[[str, Any, Any], Any] | None = None):
        self._tree, self._prefix, self._gather, self._ready = tree, prefix, gather, ready
        self._finish = finish or (lambda path, leaf, out: out)

    def __getitem__(self, key):
        child, path = self._tree[key], f"{self._prefix}.{key}"
        if isinstance(child, dict):
            return GatherOnAccess(child, path, self._gather, self._ready, self._finish)
        out = self._ready.pop(path) if path in self._ready else self._gather(path, child)
        return self._finish(path, child, out)

    def __contains__(self, key) -> bool:  # Mapping's default would gather the leaf to find out
        return key in self._tree

    def __iter__(self):
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)


class Prefetched(Sequence):
    """The items of a list (the layers) as GatherOnAccess views; reading item i also starts the
    all-gather of the next `ahead` items, asynchronously where `overlap` (so layer i+1's gather
    runs while layer i computes). Later reads (recomputation in backward) gather synchronously."""

    def __init__(self, items: list, prefix: str, gather: Callable[..., Any], ahead: int = 1,
                 overlap: bool = True, finish: Callable[[str, Any, Any], Any] | None = None):
        self._items, self._prefix, self._gather, self._ahead = items, prefix, gather, ahead
        self._overlap, self._finish = overlap, finish
        self._started: set[int] = set()
        self._ready: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        for j in range(i + 1, min(i + self._ahead + 1, len(self))):
            if j not in self._started:
                self._started.add(j)
                for path, x in named_leaves(self._items[j]):
                    self._ready[f"{self._prefix}.{j}.{path}"] = self._gather(f"{self._prefix}.{j}.{path}", x,
                                                                             self._overlap)
        return GatherOnAccess(self._items[i], f"{self._prefix}.{i}",
                              lambda path, x: self._gather(path, x, False), self._ready, self._finish)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def compute_view(params: Any, layout: Layout | None, *, stream: str | None = None, ahead: int = 1,
                 reshard: ReshardAfterForward | None = None, dtype: torch.dtype | None = None,
                 reducer=None, cast: tuple[str, ...] = ()) -> Any:
    """Parameters placed for computation: ZeRO-3 / FSDP shards all-gathered (their gradients are
    reduce-scattered by backward). `stream` names a top-level list (e.g. "layers") whose items
    are gathered leaf by leaf as the model reads them, `ahead` items in advance (see Prefetched;
    synchronously on gloo, see overlapping_gathers_safe); everything else is gathered now.
    With `reshard` (active while the forward runs), every gathered leaf is tracked so that
    autograd keeps it as a re-gather, not as the gathered tensor. `dtype` (the compute dtype)
    hands the stream's matrices, and the top-level leaves named in `cast`, out already cast, so
    that with `reshard` the cast copy, which the matmul saves, is tracked too and backward casts
    the master weight again (same bits) instead of keeping 2 bytes per parameter from forward to
    backward; this also holds without any mesh. (The model's own cast is then a no-op.)
    With `reducer` (a GradReducer watching this backward) each gathered weight's gradient is
    reduce-scattered asynchronously in its buckets (see _GatherReduceLater).
    The identity when nothing is split over a data axis and nothing is to be recast; `layout`
    None: one process."""
    gathering = layout is not None and needs_gather(layout)
    if not gathering and (reshard is None or dtype is None):
        return params

    def gather(path, x, async_op=False):
        if not gathering:
            return x
        if reducer is not None and is_dtensor(x) and x.requires_grad \
                and tuple(x.placements) != _compute_placements(layout, path, x):
            out = _GatherReduceLater.apply(x, lambda: _gather_leaf(layout, path, x, async_op), reducer, path)
        else:
            out = _gather_leaf(layout, path, x, async_op)
        if reshard is not None and out is not x:
            reshard.track(out, lambda: _gather_leaf(layout, path, x, False))
        return out

    def in_compute_dtype(path, x, out):
        if dtype is None or (out is x and reshard is None) or out.dim() != 2 or out.dtype == dtype \
                or not out.is_floating_point():
            return out
        cast_ = out.to(dtype)
        if reshard is not None:
            reshard.track(cast_, lambda: _gather_leaf(layout, path, x, False).to(dtype)
                          if gathering else x.detach().to(dtype))
        return cast_

    if not isinstance(params, dict):
        return map_with_path(gather, params)
    rest = {k: v for k, v in params.items() if k != stream}
    out = map_with_path(gather, rest)
    for k in cast:
        if k in out and isinstance(out[k], torch.Tensor):
            out[k] = in_compute_dtype(k, rest[k], out[k])
    if stream in params:
        out[stream] = Prefetched(list(params[stream]), stream, gather, ahead,
                                 overlap=gathering and overlapping_gathers_safe(layout.mesh),
                                 finish=in_compute_dtype)
    return {k: out[k] for k in params}  # keep the key order


# ---------------------------------------------------------------------- optimizer state sharding


def _to_opt(tree: Any, layout: Layout) -> Any:
    def one(path, x):
        if not is_dtensor(x):
            return x
        return place(x, layout, layout.leaf_placements(path, x.dim(), "opt"))

    return map_with_path(one, tree)


def _local(tree: Any, device: str | None) -> Any:
    def one(path, x):
        t = x.to_local() if is_dtensor(x) else x
        return t.to(device) if device and isinstance(t, torch.Tensor) else t

    return map_with_path(one, tree)


def global_grad_norm(grads: Any, extra_group=None, skip: tuple[str, ...] = ()) -> torch.Tensor:
    """The L2 norm of all gradients together, over the whole mesh (a plain fp32 scalar).

    Local sums of squares are added per placement (a DTensor scalar is partial over the axes
    its tensor is split along), so there is one all-reduce per distinct placement, not per leaf.
    `skip`: paths of leaves that are copies of another rank's (pipeline.SharedLeaves.norm_skip),
    counted by that rank only.
    """
    from torch.distributed.tensor import DTensor

    plain = torch.zeros((), dtype=torch.float32)
    groups: dict[tuple, list] = {}
    for path, g in named_leaves(grads):
        if not isinstance(g, torch.Tensor) or path in skip:
            continue
        sq = g.float().pow(2).sum()
        if is_dtensor(sq):
            entry = groups.setdefault((sq.device_mesh, tuple(sq.placements)), [])
            entry.append(sq.to_local())
        else:
            plain = plain.to(sq.device) + sq
    for (mesh, placements), parts in groups.items():
        local = torch.stack(parts).sum()
        plain = plain.to(local.device) + DTensor.from_local(local, mesh, placements, run_check=False).full_tensor()
    if extra_group is not None:  # e.g. the pipeline group: each stage holds different leaves
        import torch.distributed as dist

        dist.all_reduce(plain, group=extra_group)
    return plain.sqrt()


def _param_index(params: Any) -> list[tuple[str, Any]]:
    """(path, placed leaf) pairs, longest path first, to recognise state leaves that mirror a
    parameter (e.g. `1.mu.layers.0.attn.wq` mirrors `layers.0.attn.wq`)."""
    pairs = [(p, x) for p, x in named_leaves(params) if is_dtensor(x)]
    return sorted(pairs, key=lambda px: -len(px[0]))


def _rewrap(state: Any, index: list[tuple[str, Any]]) -> Any:
    """Local state leaves back into DTensors placed like the parameter they mirror, so the state
    checkpoints with global offsets and can be resharded."""
    from torch.distributed.tensor import DTensor

    def one(path, x):
        if not isinstance(x, torch.Tensor) or is_dtensor(x):
            return x
        for ppath, p in index:
            if (path == ppath or path.endswith("." + ppath)) and tuple(x.shape) == tuple(p.to_local().shape):
                return DTensor.from_local(x, p.device_mesh, p.placements, shape=p.shape,
                                          stride=p.stride(), run_check=False)
        return x

    return map_with_path(one, state)


def _clip_by_global_norm(grads: Any, max_grad_norm: float | None, norm_group,
                         norm_skip: tuple[str, ...]) -> Any:
    """Gradients scaled so their norm over the whole mesh is at most `max_grad_norm` (falsy: off)."""
    if not max_grad_norm:
        return grads
    norm = global_grad_norm(grads, norm_group, norm_skip)
    factor = max_grad_norm / torch.clamp(norm, min=max_grad_norm)
    return map_with_path(lambda p, g: g * factor.to(g.device) if isinstance(g, torch.Tensor) else g, grads)


def _write_back_blocks(params: Any, new_local: Any, opt_params: Any) -> Any:
    """Copy updated local blocks into the parameters (gathering where they are wider)."""
    from torch.distributed.tensor import DTensor

    def one(path, p, new, op):
        if not isinstance(p, torch.Tensor):
            return p
        if not is_dtensor(p):
            if new is not p:
                p.copy_(new.to(p.device))
            return p
        new = new.to(op.to_local().device)
        block = DTensor.from_local(new, op.device_mesh, op.placements, shape=op.shape,
                                   stride=op.stride(), run_check=False)
        if tuple(op.placements) != tuple(p.placements):
            block = block.redistribute(p.device_mesh, p.placements)
        if block.to_local().data_ptr() != p.to_local().data_ptr():
            p.to_local().copy_(block.to_local())
        return p

    return map_with_path(one, params, new_local, opt_params)


def distributed_optimizer(inner, layout: Layout, *, max_grad_norm: float | None = None,
                          offload: bool = False, norm_group=None, norm_skip: tuple[str, ...] = ()):
    """`inner` (an optax-shaped GradientTransformation) applied shard by shard.

    The optimizer works on each rank's local block of the layout's optimizer-state placement
    ("opt": split over dp from ZeRO stage 1, plus any fsdp / tp split of the parameters), so its
    state is never replicated beyond that. Elementwise optimizers are exact on blocks; the one
    global quantity, the gradient norm for clipping, is computed over the mesh here when
    `max_grad_norm` is given (the inner optimizer's own clipping then sees a norm already within
    bounds and does nothing). New parameter blocks are all-gathered back into the parameter
    placement. offload=True keeps the state on the host and runs the update there. `norm_group`:
    a process group over which the squared norm is also summed (pipeline stages); `norm_skip`:
    paths of leaves another rank of that group holds the counted copy of (tied embeddings).
    """
    if layout.trivial and not offload and norm_group is None:
        return inner
    host = "cpu" if offload else None

    def init(params):
        opt_params = _to_opt(params, layout)
        state = inner.init(_local(opt_params, host))
        return _rewrap(state, _param_index(opt_params))

    def _clip(grads):
        return _clip_by_global_norm(grads, max_grad_norm, norm_group, norm_skip)

    def apply_(params, grads, state):
        grads = _clip(_to_opt(grads, layout))
        opt_params = _to_opt(params, layout)
        local_params = _local(opt_params, host)
        local_state = _local(state, None)
        if inner.apply_ is not None:
            new_state = inner.apply_(local_params, _local(grads, host), local_state)
        else:
            updates, new_state = inner.update(_local(grads, host), local_state, local_params)
            for p, u in zip(leaves(local_params), leaves(updates)):
                p.add_(u.to(p.dtype))
        _write_back_blocks(params, local_params, opt_params)
        return _rewrap(new_state, _param_index(opt_params))

    def update(grads, state, params=None):
        grads = _clip(_to_opt(grads, layout))
        opt_params = _to_opt(params, layout) if params is not None else None
        local_params = _local(opt_params, host) if params is not None else None
        updates, new_state = inner.update(_local(grads, host), _local(state, None), local_params)
        index = _param_index(opt_params if opt_params is not None else grads)
        updates = _rewrap(updates, index)
        # back to the parameter placement (an all-gather where the state is narrower)
        updates = map_with_path(
            lambda p, u, ref: u.redistribute(ref.device_mesh, ref.placements)
            if is_dtensor(u) and is_dtensor(ref) else u, updates, params if params is not None else grads)
        return updates, _rewrap(new_state, index)

    return inner._replace(init=init, update=update, apply_=apply_)
