"""A layout = a mesh + a sharding table + ZeRO stage + sequence parallelism; and the pytree
transforms over it: `shard`, `gather`, `constrain`, `shard_batch`.

Every leaf becomes a DTensor on the mesh, so the model's own code runs unchanged (DTensor
propagates shardings through each op) and the few places that must move data are explicit
(`constrain` calls in the forward, `redistribute` in the optimizer wrapper). On the trivial mesh
every function here returns its input.

Axis names in rules and activation specs resolve per kind of state:

- a mesh axis (`dp`, `fsdp`, `tp`, `pp`) stands for itself;
- `fsdp` additionally stands for `dp` where the ZeRO stage shards that kind of state over the
  data axis: optimizer state from stage 1, gradients from 2, parameters from 3;
- `batch` is every data axis present (`dp`, `fsdp`): the batch dimension of activations;
- `seq` is `tp` under sequence parallelism, else nothing.
Kinds: "params", "grads", "opt" (states), "act" (activations), "compute" (parameters as the
forward uses them: gathered over the data axes, still split over `tp`).
An axis the mesh lacks means "not split", so one table serves every mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

# The one DTensor test lives in ops (which imports neither aquila_fn nor parallel), so parallel
# takes it from there; re-exported here for parallel's other modules.
from ops import is_dtensor
from parallel import rules as rules_mod
from parallel.mesh import AXES, DATA_AXES, Mesh
from parallel.rules import RuleError, Rules, Spec
from parallel.tree import map_with_path

KINDS = ("params", "grads", "opt", "act", "compute")
ZERO_STAGE_FOR = {"opt": 1, "grads": 2, "params": 3}
REPLICATE_ALL: Rules = ((r".*", ()),)
LOGICAL = ("batch", "seq")


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    return DTensor, Partial, Replicate, Shard


@dataclass(frozen=True)
class Layout:
    """How a pytree (and the activations computed from it) sits on a mesh."""

    mesh: Mesh
    rules: Rules = REPLICATE_ALL
    zero: int = 0
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.sequence_parallel and self.mesh.axes and not self.mesh.has("tp"):
            raise ValueError("sequence parallelism splits the tensor-parallel group's work: "
                             "it needs a tp axis in the mesh")
        rules_mod.check_rules(self.rules)

    @property
    def trivial(self) -> bool:
        return self.mesh.trivial

    @property
    def device_mesh(self):
        return self.mesh.device_mesh

    @property
    def data_axes(self) -> tuple[str, ...]:
        return tuple(a for a in DATA_AXES if self.mesh.has(a))

    @property
    def data_size(self) -> int:
        return self.mesh.size(self.data_axes)

    # ------------------------------------------------------------------ resolving names

    def axes_for(self, name: str, kind: str) -> tuple[str, ...]:
        """The mesh axes a spec name stands for, for one kind of state (see the module doc)."""
        has = self.mesh.has
        if name == "batch":
            return self.data_axes
        if name == "seq":
            return ("tp",) if self.sequence_parallel and has("tp") else ()
        if name not in AXES:
            raise RuleError(f"unknown axis name {name!r} in a sharding spec; use one of "
                            f"{', '.join(AXES + LOGICAL)}")
        if name == "fsdp" and kind == "compute":
            return ()  # parameters are gathered over the data axes for computation
        axes = (name,) if has(name) else ()
        if name == "fsdp" and kind in ZERO_STAGE_FOR and self.zero >= ZERO_STAGE_FOR[kind] and has("dp"):
            axes = ("dp",) + axes  # dp outer, fsdp inner: the mesh's own order
        return axes

    def placements(self, spec: Spec, ndim: int, kind: str = "params", path: str = "tensor") -> tuple:
        """DTensor placements (one per mesh axis) for a spec over a tensor of `ndim` dims."""
        _, _, Replicate, Shard = _dtensor_api()
        spec = rules_mod.normalize_spec(spec, path)
        if len(spec) > ndim:
            raise RuleError(f"{path}: spec {spec} has more entries than the tensor's {ndim} dims")
        owner: dict[str, int] = {}
        for dim, entry in enumerate(spec):
            for name in entry or ():
                for axis in self.axes_for(name, kind):
                    if axis in owner and owner[axis] != dim:
                        raise RuleError(f"{path}: mesh axis {axis!r} splits both dim {owner[axis]} "
                                        f"and dim {dim} (spec {spec})")
                    owner[axis] = dim
        return tuple(Shard(owner[a]) if a in owner else Replicate() for a in self.mesh.axes)

    def leaf_placements(self, path: str, ndim: int, kind: str = "params") -> tuple:
        return self.placements(rules_mod.leaf_spec(self.rules, path, ndim), ndim, kind, path)

    def tree_placements(self, tree: Any, kind: str = "params") -> Any:
        """The placements of every tensor leaf (also a validation of the table against the tree)."""
        return map_with_path(lambda p, x: self.leaf_placements(p, x.dim(), kind)
                             if isinstance(x, torch.Tensor) else None, tree)

    # ------------------------------------------------------------------ activation context

    @contextlib.contextmanager
    def activate(self) -> Iterator["Layout"]:
        """Make this the layout `constrain` resolves against. Plain tensors met by DTensor ops
        count as replicated (rotary tables, masks), and with a tp axis the cross-entropy over
        vocabulary-sharded logits runs vocabulary-parallel. Run forward *and* backward inside."""
        global _active
        if self.trivial or _active is self:
            yield self
            return
        from torch.distributed.tensor.experimental import implicit_replication
        from torch.distributed.tensor.parallel import loss_parallel

        previous, _active = _active, self
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(implicit_replication())
                if self.mesh.has("tp") and not _LOSS_PARALLEL.get():
                    lp_token = _LOSS_PARALLEL.set(True)
                    stack.callback(_LOSS_PARALLEL.reset, lp_token)
                    stack.enter_context(loss_parallel())
                yield self
        finally:
            _active = previous

    def activated(self, fn: Callable) -> Callable:
        """`fn` run inside `activate()` (e.g. a whole train step)."""
        if self.trivial:
            return fn

        def wrapped(*args, **kwargs):
            with self.activate():
                return fn(*args, **kwargs)

        return wrapped


# The active layout: a plain global rather than a ContextVar, which torch.compile cannot read
# (compiled layers call `constrain`; the compiled code is guarded on this object) and which
# autograd's device threads, where backward recomputes checkpointed layers, would not see.
_active: Layout | None = None
_LOSS_PARALLEL: contextvars.ContextVar[bool] = contextvars.ContextVar("aquila_loss_parallel", default=False)


def current_layout() -> Layout | None:
    return _active


def as_layout(mesh_or_layout: Mesh | Layout, rules: Rules | None = None, **kw) -> Layout:
    if isinstance(mesh_or_layout, Layout):
        if rules is not None or kw:
            return Layout(mesh_or_layout.mesh, rules if rules is not None else mesh_or_layout.rules,
                          **{"zero": mesh_or_layout.zero,
                             "sequence_parallel": mesh_or_layout.sequence_parallel, **kw})
        return mesh_or_layout
    return Layout(mesh_or_layout, rules if rules is not None else REPLICATE_ALL, **kw)


# ---------------------------------------------------------------------- pytree transforms


def place(x: torch.Tensor, layout: Layout, placements: tuple) -> torch.Tensor:
    """One tensor onto the mesh with `placements`: a full tensor is sliced locally (every rank
    holds the same values, so no communication); a DTensor is redistributed."""
    if is_dtensor(x):
        if tuple(x.placements) == tuple(placements):
            return x
        return x.redistribute(layout.device_mesh, placements)
    from torch.distributed.tensor import distribute_tensor

    if x.device.type not in (layout.mesh.device, "meta"):  # meta: shapes only (parallel.plan)
        x = x.to(layout.mesh.device)
    return distribute_tensor(x.detach(), layout.device_mesh, placements, src_data_rank=None)


def shard(tree: Any, mesh_or_layout: Mesh | Layout, rules: Rules | None = None, *,
          kind: str = "params") -> Any:
    """Every tensor leaf as a DTensor placed by the first matching rule (identity on one process).

    Full tensors must hold the same values on every rank (e.g. the same seeded init); DTensor
    leaves are resharded, so `shard` also moves a tree from one layout to another.
    """
    layout = as_layout(mesh_or_layout, rules)
    if layout.trivial:
        return tree

    def one(path, x):
        if not isinstance(x, torch.Tensor):
            return x
        return place(x, layout, layout.leaf_placements(path, x.dim(), kind))

    return map_with_path(one, tree)


def materialize(shapes: Any, init_leaf: Callable[[str, torch.Tensor], torch.Tensor],
                mesh_or_layout: Mesh | Layout, rules: Rules | None = None, *,
                kind: str = "params") -> Any:
    """Sharded initialisation: `init_leaf(path, meta_leaf)` -> full tensor, sharded at once so at
    most one full leaf exists at a time. Equals `shard(init(...))` by construction."""
    layout = as_layout(mesh_or_layout, rules)

    def one(path, meta):
        full = init_leaf(path, meta)
        if layout.trivial:
            return full
        return place(full, layout, layout.leaf_placements(path, full.dim(), kind))

    return map_with_path(one, shapes)


def shard_like(tree: Any, template: Any) -> Any:
    """`tree` (full tensors, e.g. loaded from a checkpoint written under any mesh) placed as the
    matching leaves of `template` are: DTensor leaves take the template's mesh and placements,
    plain leaves stay as they are. This is resharding on resume."""
    from torch.distributed.tensor import distribute_tensor

    def one(path, x, like):
        if not (is_dtensor(like) and isinstance(x, torch.Tensor)):
            return x
        if is_dtensor(x):
            return x.redistribute(like.device_mesh, like.placements)
        if tuple(x.shape) != tuple(like.shape):
            raise ValueError(f"leaf {path!r}: shape {tuple(x.shape)} does not match {tuple(like.shape)}")
        x = x.to(device=like.to_local().device, dtype=like.dtype)
        return distribute_tensor(x, like.device_mesh, like.placements, src_data_rank=None)

    return map_with_path(one, tree, template)


def gather(tree: Any) -> Any:
    """Full (unsharded) plain tensors on every rank; plain leaves pass through."""
    return map_with_path(lambda p, x: x.full_tensor() if is_dtensor(x) else x, tree)


def to_local(tree: Any) -> Any:
    """Each DTensor leaf's local block (no communication)."""
    return map_with_path(lambda p, x: x.to_local() if is_dtensor(x) else x, tree)


def constrain(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    """Place an activation as `spec` says under the active layout (differentiable); the identity
    without one, or for plain tensors (which are replicated by construction)."""
    if not is_dtensor(x):
        return x
    layout = _active
    if layout is None or layout.trivial:
        return x
    placements = layout.placements(spec, x.dim(), "act", "activation")
    if tuple(x.placements) == placements:
        return x
    if any(p.is_partial() for p in x.placements):
        return _ReducePartial.apply(x, placements)
    return x.redistribute(layout.device_mesh, placements)


class _ReducePartial(torch.autograd.Function):
    """Partial -> placements, whose backward hands the gradient back *replicated* over the
    formerly partial axes. (DTensor's own backward tries to rebuild the source's partial type,
    which fails for the masked partial sums of a vocabulary-parallel embedding.)"""

    @staticmethod
    def forward(ctx, x, placements):
        _, _, Replicate, _ = _dtensor_api()
        ctx.mesh = x.device_mesh
        ctx.grad_placements = tuple(Replicate() if p.is_partial() else p for p in x.placements)
        return x.redistribute(x.device_mesh, placements)

    @staticmethod
    def backward(ctx, grad):
        return grad.redistribute(ctx.mesh, ctx.grad_placements), None


def shard_batch(batch: Any, mesh_or_layout: Mesh | Layout, *, local: bool = True) -> Any:
    """Batch tensors as DTensors split along dim 0 over the data axes, replicated elsewhere.

    local=True: each rank passes its own rows (a data loader per rank); the global batch is their
    concatenation in data-rank order. local=False: every rank passes the same global batch and
    keeps its rows.
    """
    layout = as_layout(mesh_or_layout)
    if layout.trivial:
        return batch
    from torch.distributed.tensor import DTensor

    def one(path, x):
        if not isinstance(x, torch.Tensor) or is_dtensor(x):
            return x
        placements = layout.placements(("batch",), x.dim(), "act", path)
        if x.device.type not in (layout.mesh.device, "meta"):
            x = x.to(layout.mesh.device)
        if local:
            return DTensor.from_local(x, layout.device_mesh, placements, run_check=False)
        return place(x, layout, placements)

    return map_with_path(one, batch)


def local_rows(batch: Any, mesh_or_layout: Mesh | Layout) -> Any:
    """This rank's rows of a global batch (the inverse of local=True `shard_batch`)."""
    layout = as_layout(mesh_or_layout)
    if layout.trivial or not layout.data_axes:
        return batch
    n, r = layout.data_size, data_rank(layout)

    def one(path, x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.shape[0] % n:
            raise ValueError(f"batch leaf {path!r}: {x.shape[0]} rows do not split over {n} data ranks")
        return x.chunk(n)[r]

    return map_with_path(one, batch)


def data_rank(layout: Layout) -> int:
    """This rank's index among the data-parallel replicas (dp outer, fsdp inner)."""
    r = 0
    for a in layout.data_axes:
        r = r * layout.mesh.size(a) + layout.mesh.rank_in(a)
    return r


def local_value(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's local value, differentiably (a partial sum stays this rank's partial sum)."""
    return x.to_local() if is_dtensor(x) else x
