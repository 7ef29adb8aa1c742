"""The two pure functions a decoder runs, and how they compile to fast code.

`prefill_step` fills the static KV cache with the prompt; `decode_step` appends one token per
row. Both are plain functions of (params, tokens, cache, ...), so the same code runs eagerly,
under torch.compile (`decode_backend`) and exported ahead of time (`decode_decompositions`,
used by aquila_fn.inference.aot_package). This module is part of the compiled step's cache key:
editing it invalidates the packages on disk.
"""

from __future__ import annotations

import torch

from aquila_fn.core.config import ModelConfig
from aquila_fn.core.model import forward, project_logits


def prefill_step(params, tokens, cache, positions, key_mask, *, config: ModelConfig,
                 compute_dtype=None, impl="auto"):
    """Run the prompt [B, P] through the model, filling cache slots 0..P-1; logits [B, V] of the
    last position (left padding puts every row's last real token there)."""
    hidden, cache = forward(params, tokens, config, cache=cache, start_pos=0, positions=positions,
                            attn_mask=key_mask, compute_dtype=compute_dtype, impl=impl,
                            return_hidden=True)
    # Project only the last position: a [B, P, V] logits tensor would be wasted work.
    return project_logits(params, hidden[:, -1]), cache


def decode_step(params, tokens, cache, start_pos, positions, key_mask, *, config: ModelConfig,
                compute_dtype=None, impl="auto"):
    """One token per row: tokens [B, 1] go to cache slot `start_pos` (a 0-d tensor) at rotary
    positions [B, 1]; returns logits [B, V]."""
    logits, cache = forward(params, tokens, config, cache=cache, start_pos=start_pos,
                            positions=positions, attn_mask=key_mask, compute_dtype=compute_dtype,
                            impl=impl)
    return logits[:, -1], cache


def _matvec_as_reduction(a: torch.Tensor, b: torch.Tensor):
    """aten.mm for one row: a fused multiply-and-sum over the contiguous dim of the weight, which
    inductor's C++ code runs at memory bandwidth (MKL's sgemv reaches ~1/3 of it here), and which
    fuses the int8 -> float conversion of quantised weights into the same loop."""
    if a.shape[0] == 1 and b.dim() == 2 and b.stride(0) == 1:  # b is a transposed (out, in) weight
        # Materialise the activation first: otherwise inductor inlines its producer (the RMS
        # norm) into the loop and recomputes it for every weight row, 4x slower for int8.
        a = torch.ops.prims.inductor_force_stride_order.default(a, a.stride())
        acc = torch.float32
        return (a.to(acc).unsqueeze(1) * b.t().to(acc).unsqueeze(0)).sum(-1).to(a.dtype)
    return NotImplemented


def _batched_matvec_as_reduction(a: torch.Tensor, b: torch.Tensor):
    """aten.bmm for one query row per batch (attention scores and the probability-weighted sum
    of values at decode). Materialising `a` matters most here: inlined, the query's rotary
    embedding (pow, cos, sin) would be recomputed for every cached key."""
    if a.shape[1] != 1:
        return NotImplemented
    a = torch.ops.prims.inductor_force_stride_order.default(a, a.stride())
    if b.stride(1) == 1:  # b = keys transposed: reduce along their contiguous head dim
        return (a.unsqueeze(2) * b.transpose(1, 2).unsqueeze(1)).sum(-1)
    return (a.transpose(1, 2) * b).sum(1, keepdim=True)


def decode_backend(gm: torch.fx.GraphModule, example_inputs):
    """Inductor with single-row matrix products rewritten as reductions (see above)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    decompositions = dict(select_decomp_table())
    decompositions[torch.ops.aten.mm.default] = _matvec_as_reduction
    decompositions[torch.ops.aten.bmm.default] = _batched_matvec_as_reduction
    return compile_fx(gm, example_inputs, decompositions=decompositions)


def decode_decompositions() -> dict:
    """Core ATen, with batch-1 matrix products as fused reductions (see `decode_backend`)."""
    table = torch.export.default_decompositions()
    table[torch.ops.aten.mm.default] = _matvec_as_reduction
    table[torch.ops.aten.bmm.default] = _batched_matvec_as_reduction
    return table
