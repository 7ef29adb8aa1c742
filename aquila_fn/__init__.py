"""aquila-fn: Aquila / LLaMA models as pure functions over parameter pytrees.

Subpackages, each depending only on those listed before it: `core` (config, model, pytree,
transforms, compile, device), `data` (tokenizers, corpora, indexed datasets), `interop` (Hugging
Face, llama2.c), `training` (train step, optimizers, checkpoints, sharding, jobs), `inference`
(decoder, sampling, quantization, compiled decode), `evaluation` (tasks, harness). The flat module
paths of earlier releases (`aquila_fn.model`, ...) still import, as aliases (see _aliases).
"""

from aquila_fn import _aliases

from aquila_fn.core.config import ConfigError, ModelConfig, PRESETS, get_config
from aquila_fn.core.model import (
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
from aquila_fn.core.pytree import flatten_dict, map_with_path, named_leaves, param_count, tree_map, unflatten_dict
from aquila_fn.core.transforms import grad, value_and_grad
from aquila_fn.data.tokenizer import Tokenizer, load_tokenizer, padded_vocab_size
from aquila_fn.interop.llama2c import load_llama2c, save_llama2c

__all__ = [
    "ConfigError", "ModelConfig", "PRESETS", "get_config",
    "TokenError", "forward", "init_cache", "init_params", "loss_fn", "loss_sum_fn",
    "merge_projections", "param_shapes", "split_projections",
    "flatten_dict", "map_with_path", "named_leaves", "param_count", "tree_map", "unflatten_dict",
    "grad", "value_and_grad",
    "Tokenizer", "load_tokenizer", "padded_vocab_size", "load_llama2c", "save_llama2c",
]

_aliases.install()
