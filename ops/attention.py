"""Causal / grouped-query attention over BSND tensors, including the one-query decode shape."""
from __future__ import annotations

import math

import torch

from ._dispatch import check_impl, is_npu, torch_npu


def _causal_keep(sq: int, sk: int, device) -> torch.Tensor:
    # Bottom-right aligned: query i sits at key position sk - sq + i.
    i = torch.arange(sq, device=device).unsqueeze(-1)
    j = torch.arange(sk, device=device)
    return j <= i + (sk - sq)


def _keep_mask(sq, sk, causal, mask, device):
    """Bool keep-mask broadcastable to [B, H, Sq, Sk] (True = may attend), or None."""
    keep = _causal_keep(sq, sk, device) if causal else None
    if mask is not None:
        keep = mask if keep is None else (mask & keep)
    return keep


def attention_reference(q, k, v, *, causal=True, mask=None, scale=None):
    """Plain math: matmul, mask, softmax in fp32, matmul. Fully masked rows give zeros."""
    b, sq, h, d = q.shape
    kv = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.transpose(1, 2).float()                                  # [B, H, Sq, d]
    kf = k.transpose(1, 2).float().repeat_interleave(h // kv, dim=1)
    vf = v.transpose(1, 2).float().repeat_interleave(h // kv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale         # [B, H, Sq, Sk]
    keep = _keep_mask(sq, k.shape[1], causal, mask, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)  # all -inf rows softmax to NaN; make them 0
    out = torch.matmul(probs, vf)                                   # [B, H, Sq, d]
    return out.transpose(1, 2).to(q.dtype)


def attention_npu(q, k, v, *, causal=True, mask=None, scale=None):
    """npu_fusion_attention, BSND layout; its atten_mask is True = masked out."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keep = _keep_mask(sq, sk, causal, mask, q.device)
    atten_mask = None
    if keep is not None:
        atten_mask = ~torch.broadcast_to(keep, (b, 1 if keep.dim() < 4 else keep.shape[1], sq, sk))
    out = torch_npu().npu_fusion_attention(
        q, k, v, h, "BSND", atten_mask=atten_mask, scale=scale,
        pre_tockens=2147483647, next_tockens=2147483647, keep_prob=1.0, sparse_mode=0)[0]
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              mask: torch.Tensor | None = None, scale: float | None = None,
              impl: str = "auto") -> torch.Tensor:
    """q [B, Sq, H, hd], k/v [B, Sk, KV, hd] (H % KV == 0) -> [B, Sq, H, hd].

    causal is bottom-right aligned; mask is bool broadcastable to [B, H, Sq, Sk], True = may attend.
    """
    check_impl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    if impl == "npu" or (impl == "auto" and is_npu(q)):
        return attention_npu(q, k, v, causal=causal, mask=mask, scale=scale)
    return attention_reference(q, k, v, causal=causal, mask=mask, scale=scale)
