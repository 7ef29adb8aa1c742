"""Causal / grouped-query attention over BSND tensors, including the one-query decode shape."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import check_impl, is_npu, torch_npu

# npu_fusion_attention's causal sparse modes take this compressed 2048x2048 upper triangle
# (True = masked) instead of a full [Sq, Sk] mask.
NPU_CAUSAL_MASK_SIZE = 2048
NPU_SPARSE_DEFAULT, NPU_SPARSE_RIGHT_DOWN_CAUSAL = 0, 3
NPU_MAX_TOKENS = 2147483647


def _causal_keep(sq: int, sk: int, device) -> torch.Tensor:
    # Bottom-right aligned: query i sits at key position sk - sq + i.
    i = torch.arange(sq, device=device).unsqueeze(-1)
    j = torch.arange(sk, device=device)
    return j <= i + (sk - sq)


def _keep_mask(sq, sk, causal, mask, device):
    """Bool mask broadcastable to [B, H, Sq, Sk] (True = may attend), or None for 'all'."""
    if causal and sq == 1:
        causal = False  # the last query sees every key
    keep = _causal_keep(sq, sk, device) if causal else None
    if mask is not None:
        keep = mask if keep is None else (mask & keep)
    return keep


def attention_reference(q, k, v, *, causal=True, mask=None, scale=None):
    """Plain math: matmul, mask, softmax in fp32, matmul. Fully masked rows give zeros."""
    h, kv, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    qf = q.transpose(1, 2).to(acc)                                  # [B, H, Sq, d]
    kf = k.transpose(1, 2).to(acc).repeat_interleave(h // kv, dim=1)
    vf = v.transpose(1, 2).to(acc).repeat_interleave(h // kv, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale         # [B, H, Sq, Sk]
    keep = _keep_mask(q.shape[1], k.shape[1], causal, mask, q.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)  # rows with no key softmax to NaN: make them 0
    out = torch.matmul(probs, vf)                                   # [B, H, Sq, d]
    return out.transpose(1, 2).to(q.dtype)


def attention_sdpa(q, k, v, *, causal=True, mask=None, scale=None):
    """scaled_dot_product_attention: flash kernels on CPU and CUDA, GQA without copies."""
    sq, sk = q.shape[1], k.shape[1]
    if causal and mask is None and sq == sk:
        keep, is_causal = None, True  # top-left and bottom-right alignment coincide
    else:
        keep, is_causal = _keep_mask(sq, sk, causal, mask, q.device), False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
        is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_decode(q, k, v, *, mask=None, scale=None):
    """One query per sequence against a KV cache: grouped matmuls over views of the cache
    (no repeat of K/V per query head, no layout copies), softmax in fp32. On CPU this beats
    SDPA, whose flash kernel is tuned for long query blocks (and is slow in bf16 here)."""
    b, sq, h, d = q.shape
    sk, kv = k.shape[1], k.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, sq, kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv, g * sq, d)
    scores = torch.matmul(qg.to(acc), k.permute(0, 2, 3, 1).to(acc)) * scale  # [B, KV, G, Sk]
    keep = None
    if mask is not None:
        keep = torch.broadcast_to(mask, (b, h, sq, sk)).reshape(b, kv, g * sq, sk)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)  # rows with no key: zeros, as in the reference
    out = torch.matmul(probs, v.permute(0, 2, 1, 3).to(acc))                  # [B, KV, G, d]
    return out.reshape(b, kv, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype)


_npu_causal_masks: dict = {}


def _npu_causal_mask(device) -> torch.Tensor:
    m = _npu_causal_masks.get(device)
    if m is None:
        n = NPU_CAUSAL_MASK_SIZE
        m = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
        _npu_causal_masks[device] = m
    return m


def attention_npu(q, k, v, *, causal=True, mask=None, scale=None):
    """torch_npu.npu_fusion_attention in BSND layout (GQA native: head_num is the query's).

    Its atten_mask means True = masked out, the opposite of ours. Plain causal attention uses
    sparse_mode 3 (right-down causal, our bottom-right alignment) with the compressed
    2048x2048 triangle; a padding mask is merged with causality into one full
    [B, 1|H, Sq, Sk] mask under sparse_mode 0.
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    sparse_mode, atten_mask = NPU_SPARSE_DEFAULT, None
    if causal and mask is None and sq > 1:
        sparse_mode, atten_mask = NPU_SPARSE_RIGHT_DOWN_CAUSAL, _npu_causal_mask(q.device)
    else:
        keep = _keep_mask(sq, sk, causal, mask, q.device)
        if keep is not None:
            heads = keep.shape[1] if keep.dim() == 4 else 1
            atten_mask = (~torch.broadcast_to(keep, (b, heads, sq, sk))).contiguous()
    return torch_npu().npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), h, "BSND", atten_mask=atten_mask,
        scale=scale, keep_prob=1.0, pre_tockens=NPU_MAX_TOKENS, next_tockens=NPU_MAX_TOKENS,
        sparse_mode=sparse_mode)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              mask: torch.Tensor | None = None, scale: float | None = None,
              impl: str = "auto") -> torch.Tensor:
    """q [B, Sq, H, hd], k/v [B, Sk, KV, hd] with H % KV == 0 -> [B, Sq, H, hd] in q.dtype.

    causal: bottom-right aligned (query i sits at key position Sk - Sq + i), so a decode step
    (Sq = 1) against a KV cache sees every key. mask: optional bool, broadcastable to
    [B, H, Sq, Sk], True = may attend (e.g. [B, 1, 1, Sk] for padding). scale defaults to
    1/sqrt(hd). Rows with no visible key give zeros (reference, fused).
    impl: "reference" (plain math), "fused" (SDPA; the grouped decode kernel when Sq = 1),
    "npu" (npu_fusion_attention), "auto" (npu on NPU, else fused).
    """
    check_impl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if impl == "npu" or (impl == "auto" and is_npu(q)):
        return attention_npu(q, k, v, causal=causal, mask=mask, scale=scale)
    if impl == "reference":
        return attention_reference(q, k, v, causal=causal, mask=mask, scale=scale)
    if q.shape[1] == 1:  # causal is moot: the one query sits after every key
        return attention_decode(q, k, v, mask=mask, scale=scale)
    return attention_sdpa(q, k, v, causal=causal, mask=mask, scale=scale)
