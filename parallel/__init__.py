"""A small device-mesh library on torch.distributed DeviceMesh + DTensor: named mesh axes,
sharding rules over pytree paths, shard/gather of pytrees, activation constraints, gradient
reduction, ZeRO optimizer sharding. It knows nothing of any particular model."""

from parallel import tree
from parallel.grads import GradReducer, reduce_gradients
from parallel.layout import (Layout, constrain, current_layout, gather, local_rows, materialize, shard,
                             shard_batch, shard_like, to_local)
from parallel.mesh import AXES, Mesh, MeshError, make_mesh, trivial_mesh
from parallel.rules import RuleError
from parallel.zero import compute_view, distributed_optimizer, global_grad_norm

__all__ = ["AXES", "GradReducer", "Layout", "Mesh", "MeshError", "RuleError", "compute_view",
           "constrain", "current_layout", "distributed_optimizer", "gather", "global_grad_norm",
           "local_rows", "make_mesh", "materialize", "reduce_gradients", "shard", "shard_batch", "shard_like",
           "to_local", "tree", "trivial_mesh"]
