"""Rotary position embedding, rotate-half layout (Hugging Face LLaMA)."""
from __future__ import annotations

import functools

import torch

from ._dispatch import check_impl, is_npu, torch_npu


@functools.lru_cache(maxsize=64)
def _rope_table_cached(length, head_dim, theta, dtype, device):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half: both halves share a frequency
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def rope_table(length: int, head_dim: int, theta: float = 10000.0,
               dtype: torch.dtype = torch.float32, device="cpu"):
    """(cos, sin), each [length, head_dim], cached per (length, dim, theta, dtype, device)."""
    return _rope_table_cached(int(length), int(head_dim), float(theta), dtype, torch.device(device))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _broadcast_table(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # cos [S, hd] or [B, S, hd] -> [1|B, S, 1, hd] against x [B, S, H, hd]
    if t.dim() == 2:
        t = t.unsqueeze(0)
    return t.unsqueeze(-2)


def rotary_reference(x, cos, sin):
    c, s = _broadcast_table(cos, x), _broadcast_table(sin, x)
    return (x * c + _rotate_half(x) * s).to(x.dtype)


def rotary_npu(x, cos, sin):
    c, s = _broadcast_table(cos, x).to(x.dtype), _broadcast_table(sin, x).to(x.dtype)
    return torch_npu().npu_rotary_mul(x, c, s)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
           impl: str = "auto") -> torch.Tensor:
    """x [B, S, H, hd] rotated by tables cos/sin [S, hd] or [B, S, hd]."""
    check_impl(impl)
    if impl == "npu" or (impl == "auto" and is_npu(x)):
        return rotary_npu(x, cos, sin)
    return rotary_reference(x, cos, sin)
