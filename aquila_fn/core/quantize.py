"""Weight-only int8 quantisation for decoding, with per-output-channel scales.

    qparams = quantize_params(params)          # every projection matrix -> {"int8", "scale"}
    logits, _ = forward(qparams, tokens, config)
    ppl = perplexity(qparams, config, tokens)

Batch-1 decoding reads every weight once per token, so its speed is bounded by weight bytes:
int8 reads a quarter of fp32. Each matrix row (an output channel) gets one symmetric scale,
amax / 127; activations, norms and the embedding lookup stay in floating point. A quantised
leaf is the dict {"int8": [out, in] int8, "scale": [out] fp32}; `aquila_fn.core.model` multiplies by
the scale after the matmul, and the compiled decode step (aquila_fn.inference.generate) fuses the
int8 -> float conversion into its matrix-vector loop. Quantised params are for inference:
training, `loss_fn` and Hugging Face export want float weights (`dequantize_params`).
"""

from __future__ import annotations

import math

import torch

from aquila_fn.core import pytree
from aquila_fn.core.config import ModelConfig

__all__ = ["quantize_weight", "dequantize_weight", "is_quantized", "quantize_params",
           "dequantize_params", "weight_bytes", "perplexity", "QUANTIZED_ROLES"]

# The matrices a decode step reads (merged q/k/v and gate/up included).
QUANTIZED_ROLES = ("wq", "wk", "wv", "wo", "wqkv", "w_gate", "w_up", "w_down", "w_gate_up")
INT8_MAX = 127


def quantize_weight(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8: w ≈ int8 * scale[:, None]."""
    if w.dim() != 2:
        raise ValueError(f"int8 quantisation expects a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"int8": q, "scale": scale}


def dequantize_weight(qw: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qw["int8"].float() * qw["scale"].float()[:, None]).to(dtype)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, dict) and set(leaf) == {"int8", "scale"}


def quantize_params(params: dict, *, include_head: bool = True) -> dict:
    """Quantise every projection matrix of every layer and, with `include_head`, the output
    head. With tied embeddings the head becomes a separate int8 `lm_head` (the embedding
    lookup keeps the float table), which `forward` then uses for the logits."""
    layers = []
    for layer in params["layers"]:
        layers.append({
            **layer,
            "attn": {k: _quantize_role(k, v) for k, v in layer["attn"].items()},
            "mlp": {k: _quantize_role(k, v) for k, v in layer["mlp"].items()},
        })
    out = {**params, "layers": layers}
    if include_head:
        head = params.get("lm_head", params["embed"])
        out["lm_head"] = head if is_quantized(head) else quantize_weight(head)
    return out


def _quantize_role(role: str, w):
    if role in QUANTIZED_ROLES and not is_quantized(w):
        return quantize_weight(w)
    return w


def dequantize_params(params: dict, config: ModelConfig | None = None,
                      dtype: torch.dtype = torch.float32) -> dict:
    """Float params again (the rounding is not undone). With a tied config, the head that
    `quantize_params` added is dropped, restoring the original tree structure."""

    def restore(node):
        if is_quantized(node):
            return dequantize_weight(node, dtype)
        if isinstance(node, dict):
            return {k: restore(v) for k, v in node.items()}
        if isinstance(node, list):
            return [restore(v) for v in node]
        return node

    out = restore(params)
    if config is not None and config.tie_embeddings:
        out.pop("lm_head", None)
    return out


def weight_bytes(params: dict, *, include_embed: bool = False) -> int:
    """Bytes a batch-1 decode step reads from the weights: every leaf except the embedding table
    (only one row of it is read), unless the head is tied to it."""
    total = 0
    for path, leaf in pytree.named_leaves(params):
        if path == "embed" and not include_embed and "lm_head" in params:
            continue
        total += leaf.numel() * leaf.element_size()
    return total


@torch.no_grad()
def perplexity(params: dict, config: ModelConfig, tokens: torch.Tensor, *, seq_len: int = 256,
               batch_size: int = 8, compute_dtype: torch.dtype | None = None) -> float:
    """exp(mean next-token NLL) over `tokens` (1-D) cut into non-overlapping windows of
    `seq_len` + 1; works on float and quantised params alike (it uses `forward`'s logits)."""
    from aquila_fn.core.model import forward

    tokens = tokens.reshape(-1).long()
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{tokens.numel()} tokens are too few for one window of {seq_len} + 1")
    windows = tokens[:n_windows * seq_len + 1]
    inputs = windows[:-1].view(n_windows, seq_len)
    targets = windows[1:].view(n_windows, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        logits, _ = forward(params, inputs[i:i + batch_size], config, compute_dtype=compute_dtype)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 targets[i:i + batch_size].flatten(), reduction="sum")
        nll += float(loss)
        count += targets[i:i + batch_size].numel()
    return math.exp(nll / count)
