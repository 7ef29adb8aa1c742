"""Rotary position embedding, rotate-half layout (Hugging Face LLaMA)."""
from __future__ import annotations

import functools

import torch

from ._dispatch import LazyCompiled, is_compiling, is_dtensor, on_local_blocks, resolve_elementwise, torch_npu


def _rope_table_compute(length, head_dim, theta, dtype, device):
    # fp32 like Hugging Face and Meta's reference code, so parity tests agree bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device)
                                .float() / head_dim))
    t = torch.arange(length, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half: both halves share a frequency
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.lru_cache(maxsize=64)
def _rope_table_cached(length, head_dim, theta, dtype, device):
    return _rope_table_compute(length, head_dim, theta, dtype, device)


def rope_table(length: int, head_dim: int, theta: float = 10000.0,
               dtype: torch.dtype = torch.float32, device="cpu"):
    """(cos, sin), each [length, head_dim], rotate-half layout.

    Cached per (length, head_dim, theta, dtype, device): callers must not modify them in
    place. Under torch.compile the table is computed in the graph (constant-folded).
    """
    key = (int(length), int(head_dim), float(theta), dtype, torch.device(device))
    if is_compiling():
        return _rope_table_compute(*key)
    return _rope_table_cached(*key)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _per_head(t: torch.Tensor) -> torch.Tensor:
    # cos [S, hd] or [B, S, hd] -> [1|B, S, 1, hd] against x [B, S, H, hd]
    if t.dim() == 2:
        t = t.unsqueeze(0)
    return t.unsqueeze(-2)


def rotary_reference(x, cos, sin):
    c, s = _per_head(cos), _per_head(sin)
    return (x * c + _rotate_half(x) * s).to(x.dtype)


def _rotary_backward(grad, cos, sin):
    """d/dx of rotary_reference: grad * cos + the transposed rotate-half of grad * sin."""
    c, s = _per_head(cos), _per_head(sin)
    g1, g2 = (grad * s).chunk(2, dim=-1)
    return (grad * c + torch.cat([g2, -g1], dim=-1)).to(grad.dtype)


_forward_kernel = LazyCompiled(rotary_reference)
_backward_kernel = LazyCompiled(_rotary_backward)


class _FusedRotary(torch.autograd.Function):
    """A compiled kernel each way, keeping only the tables for backward (see ops.norm's
    _FusedRMSNorm for why the saved tensors are declared here)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _forward_kernel(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        return _backward_kernel(grad, *ctx.saved_tensors), None, None


def rotary_fused(x, cos, sin):
    if cos.requires_grad or sin.requires_grad:  # learned tables: the reference's autograd
        return rotary_reference(x, cos, sin)
    return _FusedRotary.apply(x, cos, sin)


def rotary_npu(x, cos, sin):
    # npu_rotary_mul: 4-D x (here BSND) and 4-D tables (1S1D or BS1D) of x's dtype,
    # rotary_mode "half" is the rotate-half layout.
    c = _per_head(cos).to(x.dtype).contiguous()
    s = _per_head(sin).to(x.dtype).contiguous()
    return torch_npu().npu_rotary_mul(x, c, s)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           impl: str = "auto") -> torch.Tensor:
    """x [B, S, H, hd] rotated by cos/sin [S, hd] or [B, S, hd] (rotate-half); x.dtype out.
    A DTensor x split over heads (and batch, for [S, hd] tables) rotates each rank's block."""
    if is_dtensor(x) and impl != "reference" and not (is_dtensor(cos) or is_dtensor(sin)):
        out = on_local_blocks(lambda a: rotary(a, cos, sin, impl=impl), x,
                              free_dims=(0, 2) if cos.dim() == 2 else (2,))
        if out is not None:
            return out
    impl = resolve_elementwise(impl, x)
    if impl == "npu":
        return rotary_npu(x, cos, sin)
    if impl == "fused":
        return rotary_fused(x, cos, sin)
    return rotary_reference(x, cos, sin)
