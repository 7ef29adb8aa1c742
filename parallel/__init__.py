"""A small device-mesh library on torch.distributed DeviceMesh + DTensor: named mesh axes,
sharding rules over pytree paths, shard/gather of pytrees, activation constraints, gradient
reduction, ZeRO optimizer sharding (and offload), pipeline stages, a planner, and failing loudly.
It knows nothing of any particular model.

    mesh.py      make_mesh("dp=2,tp=2") from the torchrun environment
    rules.py     (regex on leaf path, spec over mesh axes) tables; first match wins
    layout.py    Layout, shard / gather / constrain / shard_batch / materialize / shard_like
    grads.py     GradReducer: bucketed asynchronous reduction during backward (accumulation,
                 loss scaling, ZeRO-2/3 reduce-scatter)
    zero.py      compute_view (ZeRO-3 gather with prefetch), ReshardAfterForward (saved gathers
                 re-gathered in backward), distributed_optimizer (ZeRO 1-3, offload)
    pipeline.py  functional stages on torch.distributed.pipelining (GPipe, 1F1B, interleaved),
                 a forward-only pass, SharedLeaves (tied weights on two stages)
    meter.py     collectives and live memory, observed (real or meta tensors)
    plan.py      python -m parallel.plan: per-rank memory and traffic without allocating
    faults.py    guard and Watchdog: a dead or stalled rank becomes an error, not a hang
    cli.py       UserError and the command-line error boundary every script shares: a user's
                 mistake is one line and exit status 2 (once under torchrun), a bug a traceback
"""

from parallel import tree
from parallel.grads import GradReducer, reduce_gradients
from parallel.layout import (Layout, constrain, current_layout, gather, local_rows, materialize, shard,
                             shard_batch, shard_like, to_local)
from parallel.mesh import AXES, Mesh, MeshError, make_mesh, shutdown_distributed, trivial_mesh
from parallel.rules import RuleError
from parallel.zero import compute_view, distributed_optimizer, global_grad_norm

__all__ = ["AXES", "GradReducer", "Layout", "Mesh", "MeshError", "RuleError", "compute_view",
           "constrain", "current_layout", "distributed_optimizer", "gather", "global_grad_norm",
           "local_rows", "make_mesh", "materialize", "shutdown_distributed", "reduce_gradients", "shard", "shard_batch", "shard_like",
           "to_local", "tree", "trivial_mesh"]
