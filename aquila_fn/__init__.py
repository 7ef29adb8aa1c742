"""aquila-fn: Aquila / LLaMA models as pure functions over parameter pytrees."""

from aquila_fn.config import ConfigError, ModelConfig, PRESETS, get_config
from aquila_fn.model import (
    TokenError,
    forward,
    init_cache,
    init_params,
    loss_fn,
    loss_sum_fn,
    merge_projections,
    param_shapes,
    split_projections,
)
from aquila_fn.pytree import flatten_dict, map_with_path, named_leaves, param_count, tree_map, unflatten_dict
from aquila_fn.transforms import grad, value_and_grad

__all__ = [
    "ConfigError", "ModelConfig", "PRESETS", "get_config",
    "TokenError", "forward", "init_cache", "init_params", "loss_fn", "loss_sum_fn",
    "merge_projections", "param_shapes", "split_projections",
    "flatten_dict", "map_with_path", "named_leaves", "param_count", "tree_map", "unflatten_dict",
    "grad", "value_and_grad",
]
