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
from aquila_fn.tokenizer import Tokenizer, load_tokenizer, padded_vocab_size
from aquila_fn.llama2c import load_llama2c, save_llama2c

__all__ = [
    "ConfigError", "ModelConfig", "PRESETS", "get_config",
    "TokenError", "forward", "init_cache", "init_params", "loss_fn", "loss_sum_fn",
    "merge_projections", "param_shapes", "split_projections",
    "flatten_dict", "map_with_path", "named_leaves", "param_count", "tree_map", "unflatten_dict",
    "grad", "value_and_grad",
    "Tokenizer", "load_tokenizer", "padded_vocab_size", "load_llama2c", "save_llama2c",
]
