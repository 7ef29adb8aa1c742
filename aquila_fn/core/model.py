"""The Aquila / LLaMA decoder as pure functions over a parameter pytree.

    params = init_params(config, seed)
    logits, cache = forward(params, tokens, config)
    loss, n_tokens = loss_fn(params, {"input_ids": x, "labels": y}, config)

Weights are stored (out, in) like nn.Linear (`y = x @ w.T`) under Hugging Face-style roles,
so interop is a renaming. Norms, softmax and the loss run in fp32; matmuls run in
`compute_dtype` (default: the dtype of the parameters).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import ops
from aquila_fn.core import pytree
from aquila_fn.core.config import ModelConfig
from parallel import constrain
from parallel.cli import UserError

# Activation layouts for `parallel.constrain` (the identity without an active mesh): the residual
# stream is split over the sequence under sequence parallelism; the inputs of the
# tensor-parallel matmuls hold the whole sequence. Both split the batch over the data axes.
RESIDUAL = ("batch", "seq", None)
FULL_SEQ = ("batch", None, None)

Params = dict[str, Any]
RECOMPUTE_POLICIES = ("none", "full", "selective")


class TokenError(UserError, ValueError):
    """A token id outside the model's vocabulary."""


# ----------------------------------------------------------------------------- initialisation


def param_shapes(config: ModelConfig, dtype: torch.dtype = torch.float32) -> Params:
    """The parameter tree as meta tensors: shapes and dtypes, no storage."""
    d, f, hd = config.dim, config.ffn_dim, config.head_dim

    def t(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    def layer():
        return {
            "attn_norm": t(d),
            "attn": {"wq": t(config.n_heads * hd, d), "wk": t(config.kv_dim, d),
                     "wv": t(config.kv_dim, d), "wo": t(d, config.n_heads * hd)},
            "mlp_norm": t(d),
            "mlp": {"w_gate": t(f, d), "w_up": t(f, d), "w_down": t(d, f)},
        }

    params = {"embed": t(config.vocab_size, d), "layers": [layer() for _ in range(config.n_layers)],
              "norm": t(d)}
    if not config.tie_embeddings:
        params["lm_head"] = t(config.vocab_size, d)
    return params


def leaf_seed(seed: int, path: str) -> int:
    """A leaf's random stream depends only on (seed, path), never on creation order."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_leaf(path: str, shape: torch.Size, config: ModelConfig, seed: int,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Materialise one leaf: norms are ones; matrices N(0, std), with the residual-output
    projections (wo, w_down) scaled by 1/sqrt(2·n_layers) as Megatron's scaled init does.
    On a GPU or NPU the values are drawn there, by that device's generator (the CPU's would take
    minutes for a 7B model), so they depend on the device type, never on order or sharding."""
    if path.endswith("norm"):
        return torch.ones(shape, dtype=dtype, device=device)
    std = config.init_std
    if path.endswith(("wo", "w_down")):
        std /= math.sqrt(2 * config.n_layers)
    where = torch.device(device) if torch.device(device).type in ("cuda", "npu") else torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(leaf_seed(seed, path))
    values = torch.randn(shape, generator=gen, dtype=torch.float32, device=where).mul_(std)
    return values.to(dtype=dtype, device=device)


def init_params(config: ModelConfig, seed: int, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> Params:
    """Initial parameters; `device="meta"` gives shapes only."""
    shapes = param_shapes(config, dtype)
    if torch.device(device).type == "meta":
        return shapes
    return pytree.map_with_path(lambda p, x: init_leaf(p, x.shape, config, seed, dtype, device), shapes)


# ----------------------------------------------------------------------------- merged projections


def merge_projections(params: Params) -> Params:
    """AscendSpeed's merged layout: q/k/v and gate/up each become one matrix (one matmul)."""
    layers = []
    for layer in params["layers"]:
        attn, mlp = layer["attn"], layer["mlp"]
        layers.append({
            **layer,
            "attn": {"wqkv": torch.cat([attn["wq"], attn["wk"], attn["wv"]]), "wo": attn["wo"]},
            "mlp": {"w_gate_up": torch.cat([mlp["w_gate"], mlp["w_up"]]), "w_down": mlp["w_down"]},
        })
    return {**params, "layers": layers}


def split_projections(params: Params, config: ModelConfig) -> Params:
    """Inverse of `merge_projections`: back to the Hugging Face interchange names."""
    q, kv, f = config.n_heads * config.head_dim, config.kv_dim, config.ffn_dim
    layers = []
    for layer in params["layers"]:
        attn, mlp = layer["attn"], layer["mlp"]
        if "wqkv" not in attn:
            layers.append(layer)
            continue
        wq, wk, wv = attn["wqkv"].split([q, kv, kv])
        w_gate, w_up = mlp["w_gate_up"].split([f, f])
        layers.append({**layer, "attn": {"wq": wq, "wk": wk, "wv": wv, "wo": attn["wo"]},
                       "mlp": {"w_gate": w_gate, "w_up": w_up, "w_down": mlp["w_down"]}})
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- KV cache


def init_cache(config: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """A static, preallocated KV cache: one {"k", "v"} of [batch, max_len, n_kv_heads, head_dim]
    per layer. `forward` writes the new keys/values into it in place (the buffers are donated,
    as in JAX) and returns it."""
    shape = (batch, max_len, config.n_kv_heads, config.head_dim)
    return [{"k": torch.zeros(shape, dtype=dtype, device=device),
             "v": torch.zeros(shape, dtype=dtype, device=device)} for _ in range(config.n_layers)]


# ----------------------------------------------------------------------------- forward


def check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TokenError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise TokenError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                         f"were the ids made with another tokenizer?")


def _linear(x: torch.Tensor, w: torch.Tensor | dict) -> torch.Tensor:
    if isinstance(w, Mapping):  # weight-only int8 (aquila_fn.core.quantize): per-output-channel scales
        return (x @ w["int8"].to(x.dtype).T) * w["scale"].to(x.dtype)
    return x @ w.to(x.dtype).T


def _update_cache(kv: dict, slots: slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Write the new keys/values into their cache slots; return the keys/values to attend to.
    A slice (prefill or extension at a known position) reads back only the filled prefix, so
    attention does no work on empty slots and, without padding, needs no mask (its causal
    kernels: flash, npu sparse mode). A tensor of slots (the compiled decode step, whose
    position is data) reads the whole static cache; the mask hides the empty slots."""
    if isinstance(slots, slice):
        kv["k"][:, slots] = k.to(kv["k"].dtype)
        kv["v"][:, slots] = v.to(kv["v"].dtype)
        return kv["k"][:, :slots.stop], kv["v"][:, :slots.stop]
    kv["k"].index_copy_(1, slots, k.to(kv["k"].dtype))
    kv["v"].index_copy_(1, slots, v.to(kv["v"].dtype))
    return kv["k"], kv["v"]


def _attention_block(p: Params, x: torch.Tensor, cos, sin, config: ModelConfig, kv: dict | None,
                     slots: slice | torch.Tensor | None, mask: torch.Tensor | None, impl: str,
                     recompute_core: bool) -> torch.Tensor:
    b, s, _ = x.shape
    hd, h, kvh = config.head_dim, config.n_heads, config.n_kv_heads
    if "wqkv" in p:
        q, k, v = _linear(x, p["wqkv"]).split([h * hd, kvh * hd, kvh * hd], dim=-1)
    else:
        q, k, v = _linear(x, p["wq"]), _linear(x, p["wk"]), _linear(x, p["wv"])
    q = ops.rotary(q.view(b, s, h, hd), cos, sin, impl=impl)
    k = ops.rotary(k.view(b, s, kvh, hd), cos, sin, impl=impl)
    v = v.view(b, s, kvh, hd)
    if kv is not None:
        k, v = _update_cache(kv, slots, k, v)
        k, v = k.to(q.dtype), v.to(q.dtype)
    causal = mask is None

    def core(q, k, v):
        return ops.attention(q, k, v, causal=causal, mask=mask, impl=impl)

    out = checkpoint(core, q, k, v, use_reentrant=False) if recompute_core else core(q, k, v)
    return _linear(out.reshape(b, s, h * hd), p["wo"])


def _mlp_block(p: Params, x: torch.Tensor, impl: str) -> torch.Tensor:
    if "w_gate_up" in p:
        gate, up = _linear(x, p["w_gate_up"]).chunk(2, dim=-1)
    else:
        gate, up = _linear(x, p["w_gate"]), _linear(x, p["w_up"])
    return _linear(ops.swiglu(gate, up, impl=impl), p["w_down"])


def _layer(p: Params, h: torch.Tensor, cos, sin, config: ModelConfig, kv, slots, mask, impl: str,
           recompute_core: bool) -> torch.Tensor:
    x = constrain(ops.rms_norm(h, p["attn_norm"], config.norm_eps, impl=impl), FULL_SEQ)
    attn = _attention_block(p["attn"], x, cos, sin, config, kv, slots, mask, impl, recompute_core)
    h = h + constrain(attn, RESIDUAL)
    x = constrain(ops.rms_norm(h, p["mlp_norm"], config.norm_eps, impl=impl), FULL_SEQ)
    return h + constrain(_mlp_block(p["mlp"], x, impl), RESIDUAL)


def _attention_mask(batch: int, q_len: int, k_len: int, start_pos, attn_mask, device) -> torch.Tensor | None:
    """Boolean [B, 1, Sq, Sk] mask (True = may attend) when padding or a whole static cache needs
    one; else None and the attention op applies its own causal mask. Without a cache, or at a
    Python-int position (the keys are the filled prefix, see _cache_slots), causality is the op's
    bottom-right aligned mask."""
    if attn_mask is None and not isinstance(start_pos, torch.Tensor):
        return None
    if start_pos is None:
        start_pos = 0
    q_slot = start_pos + torch.arange(q_len, device=device)
    k_slot = torch.arange(k_len, device=device)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None, None]
    if attn_mask is not None:
        valid = attn_mask[:, None, None, :k_len].bool()
        # A padding query has no valid key; letting it see itself keeps softmax finite.
        allowed = allowed & (valid | (k_slot[None, :] == q_slot[:, None])[None, None])
    return allowed.expand(batch, 1, q_len, k_len)


def _cache_slots(cache: list | None, start_pos: int | torch.Tensor, s: int, device):
    """(the cache slots the tokens go to, the number of keys attention sees). At a Python-int
    position the slots are a slice and attention sees the filled prefix; at a tensor position,
    a tensor of slots and the whole cache."""
    if cache is None:
        return None, s
    length = cache[0]["k"].shape[1]
    if isinstance(start_pos, int):
        if start_pos < 0 or start_pos + s > length:
            raise ValueError(f"slots {start_pos}..{start_pos + s - 1} do not fit a cache of {length} slots")
        return slice(start_pos, start_pos + s), start_pos + s
    return start_pos + torch.arange(s, device=device), length


def head_weight(params: Params) -> torch.Tensor:
    return params["lm_head"] if "lm_head" in params else params["embed"]


# The forward in stages. `forward` composes them; pipeline stages (aquila_fn.training.pipeline_stages) and the
# decoder (aquila_fn.inference.generate) call the same pieces, so there is one model code path.


def embed(params: Params, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Token embeddings [B, S, D] in the compute dtype."""
    return constrain(F.embedding(tokens, params["embed"]), RESIDUAL).to(dtype)


def rotary_tables(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """(cos, sin) for the given rotary positions ([S] or [B, S])."""
    cos, sin = ops.rope_table(config.max_seq_len, config.head_dim, config.rope_theta, dtype,
                              positions.device)
    return cos[positions], sin[positions]


@functools.cache
def _compiled_layer(backend: str):
    from aquila_fn.core.compile import compile

    # static shapes: a training run's layers all have one shape (a recompile with dynamic
    # shapes could not trace ZeRO-3's saved-tensor hooks, parallel.zero.ReshardAfterForward)
    return compile(_layer, backend=backend, dynamic=False)


def _as_dict(p):
    """A layer's parameters as plain dicts: a Mapping that gathers leaves as they are read
    (ZeRO-3's parallel.zero.GatherOnAccess) is read in full, outside the compiled layer."""
    return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in p.items()}


def _run_layer(compiled: bool | str, p, *args) -> torch.Tensor:
    if not compiled:
        return _layer(p, *args)
    return _compiled_layer("auto" if compiled is True else compiled)(_as_dict(p), *args)


def run_layers(layers, h: torch.Tensor, cos, sin, config: ModelConfig, *, cache: list | None = None,
               slots: slice | torch.Tensor | None = None, mask: torch.Tensor | None = None, impl: str = "auto",
               recompute: str = "none", compile_layers: bool | str = False) -> torch.Tensor:
    """The decoder layers over the hidden state, with the chosen recomputation policy.
    compile_layers: True or a backend name (aquila_fn.core.compile) runs each layer as a compiled
    function (regional compilation: one graph per layer shape, shared by the layers), for
    programs that cannot be one graph, e.g. on a mesh, where parameters are gathered and
    gradients reduced between layers."""
    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute={recompute!r}; expected one of {RECOMPUTE_POLICIES}")
    for i, p in enumerate(layers):
        kv = None if cache is None else cache[i]
        if recompute == "full" and torch.is_grad_enabled():
            h = checkpoint(_run_layer, compile_layers, p, h, cos, sin, config, kv, slots, mask, impl, False,
                           use_reentrant=False)
        else:
            h = _run_layer(compile_layers, p, h, cos, sin, config, kv, slots, mask, impl, recompute == "selective")
    return h


def final_norm(params: Params, h: torch.Tensor, config: ModelConfig, impl: str = "auto") -> torch.Tensor:
    return constrain(ops.rms_norm(h, params["norm"], config.norm_eps, impl=impl), FULL_SEQ)


def project_logits(params: Params, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits from the final hidden state (works with int8 head weights too)."""
    return _linear(h, head_weight(params)).float()


def forward(params: Params, tokens: torch.Tensor, config: ModelConfig, *, cache: list | None = None,
            start_pos: int | torch.Tensor = 0, positions: torch.Tensor | None = None,
            attn_mask: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
            impl: str = "auto", recompute: str = "none", compile_layers: bool | str = False,
            return_hidden: bool = False):
    """Logits [B, S, V] (fp32) for `tokens` [B, S], and the cache.

    With a cache, the tokens occupy slots start_pos..start_pos+S-1 and attend to every earlier
    slot. At a Python-int start_pos (a prefill) attention reads only slots 0..start_pos+S-1; a
    0-d tensor start_pos (the compiled decode step) reads the whole cache under a mask, so one
    graph serves every step. `positions` [B, S] overrides the rotary positions (left-padded
    batches); `attn_mask` [B, S_keys] marks real tokens (True) against padding. `return_hidden`
    returns the final normed hidden state instead of logits (the fused loss projects it itself).
    """
    if not torch.compiler.is_compiling():
        check_tokens(tokens, config.vocab_size)
    b, s = tokens.shape
    device = tokens.device
    h = embed(params, tokens, compute_dtype or params["embed"].dtype)
    if positions is None:
        positions = start_pos + torch.arange(s, device=device)
    cos, sin = rotary_tables(config, positions, h.dtype)

    slots, k_len = _cache_slots(cache, start_pos, s, device)
    mask = _attention_mask(b, s, k_len, start_pos if cache is not None else None, attn_mask, device)
    h = run_layers(params["layers"], h, cos, sin, config, cache=cache, slots=slots, mask=mask, impl=impl,
                   recompute=recompute, compile_layers=compile_layers)
    h = final_norm(params, h, config, impl)
    return (h, cache) if return_hidden else (project_logits(params, h), cache)


# ----------------------------------------------------------------------------- loss


def loss_sum_fn(params: Params, batch: dict[str, torch.Tensor], config: ModelConfig, *,
                compute_dtype: torch.dtype | None = None, impl: str = "auto",
                recompute: str = "none", compile_layers: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses in fp32, number of counted tokens); labels of -100 are ignored.

    `batch["labels"][b, t]` is the target for position t (already shifted). The output projection
    and the cross-entropy are fused and chunked, so [tokens, vocab] logits never exist at once.
    """
    hidden, _ = forward(params, batch["input_ids"], config, attn_mask=batch.get("attention_mask"),
                        compute_dtype=compute_dtype, impl=impl, recompute=recompute,
                        compile_layers=compile_layers, return_hidden=True)
    w = head_weight(params).to(hidden.dtype)
    return ops.cross_entropy(hidden.reshape(-1, hidden.shape[-1]), w, batch["labels"].reshape(-1),
                             impl=impl)


def loss_fn(params: Params, batch: dict[str, torch.Tensor], config: ModelConfig, **kwargs):
    """(token-weighted mean loss, number of counted tokens)."""
    total, count = loss_sum_fn(params, batch, config, **kwargs)
    return total / count.clamp(min=1), count
