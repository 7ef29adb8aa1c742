"""Hugging Face interop: Llama / Aquila checkpoint directories <-> parameter pytrees.

    config, params = load_hf("path/to/Aquila2-7B")          # config.json + *.safetensors
    save_hf("out_dir", config, params)                      # LlamaForCausalLM.from_pretrained loads it

Reads `model.safetensors`, sharded `model.safetensors.index.json`, and `pytorch_model.bin`
(sharded or not) through `torch.load(weights_only=True)`, never unpickling arbitrary objects.
Hugging Face Llama already rotates halves, the layout used here, so q/k need no permutation;
the mapping is a renaming:

    model.embed_tokens.weight                    embed
    model.layers.N.input_layernorm.weight        layers.N.attn_norm
    model.layers.N.self_attn.{q,k,v,o}_proj      layers.N.attn.{wq,wk,wv,wo}
    model.layers.N.post_attention_layernorm      layers.N.mlp_norm
    model.layers.N.mlp.{gate,up,down}_proj       layers.N.mlp.{w_gate,w_up,w_down}
    model.norm.weight                            norm
    lm_head.weight                               lm_head   (absent when embeddings are tied)
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Iterator

import torch

from aquila_fn.core import pytree
from aquila_fn.core.config import ModelConfig
from aquila_fn.core.files import read_json
from aquila_fn.core.model import param_shapes, split_projections
from parallel.cli import UserError

__all__ = ["HFFormatError", "load_hf", "save_hf", "hf_to_path", "path_to_hf", "hf_state_dict",
           "params_from_state_dict"]

_LAYER_ROLES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn.wq",
    "self_attn.k_proj.weight": "attn.wk",
    "self_attn.v_proj.weight": "attn.wv",
    "self_attn.o_proj.weight": "attn.wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "mlp.w_gate",
    "mlp.up_proj.weight": "mlp.w_up",
    "mlp.down_proj.weight": "mlp.w_down",
}
_TOP = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some checkpoints carry that hold no parameters (recomputed from the config).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


class HFFormatError(UserError, ValueError):
    """A Hugging Face checkpoint that does not match its config (the message names the tensor)."""


# ----------------------------------------------------------------------------- names


def hf_to_path(name: str) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attn.wq`; None if not a parameter."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER_ROLES:
        return f"layers.{m.group(1)}.{_LAYER_ROLES[m.group(2)]}"
    return None


def path_to_hf(path: str) -> str:
    inverse_top = {v: k for k, v in _TOP.items()}
    if path in inverse_top:
        return inverse_top[path]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
    inverse_roles = {v: k for k, v in _LAYER_ROLES.items()}
    if not m or m.group(2) not in inverse_roles:
        raise KeyError(f"no Hugging Face name for parameter {path!r}")
    return f"model.layers.{m.group(1)}.{inverse_roles[m.group(2)]}"


# ----------------------------------------------------------------------------- reading


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint, preferring safetensors, following an index if sharded."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        if (directory / index_name).is_file():
            weight_map = read_json(directory / index_name, HFFormatError).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise HFFormatError(f"{directory / index_name} has no weight_map of tensor name -> file")
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (directory / name).is_file()]
            if missing:
                raise HFFormatError(f"{directory / index_name} lists shard(s) that do not exist: {missing}")
            return [directory / name for name in files]
        if (directory / single).is_file():
            return [directory / single]
    loose = sorted(directory.glob("*.safetensors"))
    if loose:
        return loose
    raise HFFormatError(f"no weights in {directory}: expected model.safetensors, {SAFETENSORS_INDEX}, "
                        f"pytorch_model.bin or {BIN_INDEX}")


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise HFFormatError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        try:  # weights_only: no arbitrary unpickling
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # torch's "not a zip", truncations
            raise HFFormatError(f"{path}: not a readable PyTorch weights file ({e})") from None
        if not isinstance(state, dict):
            raise HFFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
        yield from state.items()


def params_from_state_dict(tensors: Iterator[tuple[str, torch.Tensor, str]], config: ModelConfig, *,
                           dtype: torch.dtype | None = None, device="cpu", where: str = "checkpoint") -> dict:
    """Params from (hf_name, tensor, source_file) triples, checked against the config's shapes."""
    expected = pytree.flatten_dict(param_shapes(config))
    found: dict[str, torch.Tensor] = {}
    for name, tensor, source in tensors:
        path = hf_to_path(name)
        if path is None:
            if _IGNORED.fullmatch(name):
                continue
            raise HFFormatError(f"{source}: unexpected tensor {name!r} (shape {tuple(tensor.shape)})")
        if path == "lm_head" and config.tie_embeddings:
            continue  # tied: the head is the embedding
        if path not in expected:
            raise HFFormatError(f"{source}: tensor {name!r} does not belong to a model with "
                                f"{config.n_layers} layers")
        want = tuple(expected[path].shape)
        if tuple(tensor.shape) != want:
            raise HFFormatError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                f"expected {want} for {path}")
        tensor = tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device)
        found[path] = tensor.contiguous()
    missing = [p for p in expected if p not in found]
    if missing:
        names = [path_to_hf(p) for p in missing]
        raise HFFormatError(f"{where} lacks {len(missing)} tensor(s) the config needs: "
                            f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    return pytree.unflatten_dict({p: found[p] for p in expected})


def load_hf(directory: str | os.PathLike, *, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> tuple[ModelConfig, dict]:
    """(config, params) from a Llama/Aquila checkpoint directory; `dtype` None keeps the stored dtype."""
    directory = Path(directory)
    config = ModelConfig.from_hf(directory)
    files = _weight_files(directory)

    def tensors():
        for path in files:
            for name, tensor in _read_tensors(path):
                yield name, tensor, str(path)

    return config, params_from_state_dict(tensors(), config, dtype=dtype, device=device,
                                          where=str(directory))


# ----------------------------------------------------------------------------- writing


def hf_state_dict(params: dict, config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face names -> contiguous CPU tensors (merged projections are split first)."""
    from aquila_fn.core.quantize import is_quantized
    if any(is_quantized(x) for x in _dict_nodes(params)):
        raise ValueError("params are int8-quantised; export float weights (aquila_fn.core.quantize.dequantize_params)")
    params = split_projections(params, config)
    state = {}
    for path, leaf in pytree.named_leaves(params):
        if path == "lm_head" and config.tie_embeddings:
            continue
        t = leaf.detach().to("cpu")
        state[path_to_hf(path)] = (t.to(dtype) if dtype is not None else t).contiguous()
    return state


def _dict_nodes(tree) -> Iterator:
    if isinstance(tree, dict):
        yield tree
        for v in tree.values():
            yield from _dict_nodes(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _dict_nodes(v)


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


def save_hf(directory: str | os.PathLike, config: ModelConfig, params: dict, *,
            dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json above `max_shard_bytes`) for LlamaForCausalLM.from_pretrained."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(params, config, dtype)
    stored_dtype = next(iter(state.values())).dtype
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(stored_dtype).removeprefix("torch.")
    with open(directory / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    metadata = {"format": "pt"}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return directory
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(directory / SAFETENSORS_INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return directory
