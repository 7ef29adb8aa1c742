"""Causal / grouped-query attention over BSND tensors, including the one-query decode shape."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import check_impl, emulated_matmul, is_npu, torch_npu

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


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """[B, S, H, d] -> [B, KV, G, S, d] (a view): query head kv * G + j reads kv head kv."""
    b, s, h, d = x.shape
    return x.view(b, s, h // g, g, d).permute(0, 2, 3, 1, 4)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    b, kv, g, s, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, s, kv * g, d)


def attention_decode(q, k, v, *, mask=None, scale=None):
    """One query per sequence against a KV cache: grouped matmuls over views of the cache
    (no repeat of K/V per query head, no layout copies), softmax in fp32. On CPU this beats
    SDPA, whose flash kernel is tuned for long query blocks (and is slow in bf16 here)."""
    b, sq, h, d = q.shape
    sk, kv = k.shape[1], k.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = _grouped(q, g).reshape(b, kv, g * sq, d)
    scores = torch.matmul(qg.to(acc), k.permute(0, 2, 3, 1).to(acc)) * scale  # [B, KV, G, Sk]
    keep = None
    if mask is not None:
        keep = torch.broadcast_to(mask, (b, h, sq, sk)).reshape(b, kv, g * sq, sk)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0)  # rows with no key: zeros, as in the reference
    out = torch.matmul(probs, v.permute(0, 2, 1, 3).to(acc))                  # [B, KV, G, d]
    return _ungrouped(out.view(b, kv, g, sq, d)).to(q.dtype)


# The chunked kernel is auto's choice on CPU for causal bf16 prefill of at least this many
# queries, where the CPU multiplies bf16 natively (avx512_bf16 / AMX): there it beat SDPA
# (1024 tokens, 32 heads of 128: forward 1.3x, forward+backward 1.1x; 512 tokens, head dim
# 64: 1.3x), because torch's CPU flash kernel runs bf16 at about fp32 speed on CPUs without
# AMX while this kernel multiplies P @ V in bf16. In fp32, or with
# fewer queries, SDPA was as fast or faster (its smaller query blocks skip as much of the
# causal triangle), so it stays there.
CHUNKED_MIN_QUERIES = 512
# Query rows per block of the chunked causal kernel: each block computes scores only up to its
# own last key, so a causal pass computes (n/c + 1) / (2 n/c) of the score matrix (56% at 1024
# tokens, against 62.5% for torch's CPU flash kernel with its 256-row blocks), and 128 rows
# keep the batched matmuls near peak.
CHUNK_ROWS = 128


def _query_blocks(sq: int, sk: int, rows: int = CHUNK_ROWS):
    """(first row, end row, end key) per block of queries, bottom-right causal."""
    for i in range(0, sq, rows):
        e = min(i + rows, sq)
        yield i, e, sk - sq + e


def _block_scores(qs, kt, i, e, kend):
    """fp32 scores of query rows [i, e) against keys [0, kend), the causal triangle of the
    last e - i keys masked: [B, KV, G, n, kend] (qs is pre-scaled)."""
    b, kv, g, _, d = qs.shape
    n = e - i
    scores = torch.matmul(qs[:, :, :, i:e].reshape(b, kv, g * n, d), kt[..., :kend])
    scores = scores.view(b, kv, g, n, kend)
    scores[..., kend - n:].masked_fill_(~_causal_keep(n, n, qs.device), float("-inf"))
    return scores


class _ChunkedCausal(torch.autograd.Function):
    """Causal attention in blocks of query rows, with flash attention's numerics: scores and
    softmax in fp32, probabilities cast to the value dtype for P @ V (16-bit matmuls run at
    their full speed); backward recomputes each block's probabilities instead of saving them."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        qs, kt = _scaled_queries_keys(q, k, scale)
        vh = v.transpose(1, 2).contiguous()                       # [B, KV, Sk, d]
        b, kv, g, sq, d = qs.shape
        out = q.new_empty(qs.shape)
        for i, e, kend in _query_blocks(sq, k.shape[1]):
            probs = torch.softmax(_block_scores(qs, kt, i, e, kend), dim=-1).to(v.dtype)
            pv = torch.matmul(probs.view(b, kv, g * (e - i), kend), vh[:, :, :kend])
            out[:, :, :, i:e] = pv.view(b, kv, g, e - i, d)
        out = _ungrouped(out)
        ctx.save_for_backward(q, k, v, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        qs, kt = _scaled_queries_keys(q, k, ctx.scale)
        b, kv, g, sq, d = qs.shape
        dt, acc = v.dtype, qs.dtype
        out = _grouped(out, g)
        kh = k.transpose(1, 2).contiguous()                                # [B, KV, Sk, d]
        vt = v.permute(0, 2, 3, 1).contiguous()                            # [B, KV, d, Sk]
        do = _grouped(grad_out.to(dt), g)                                  # [B, KV, G, Sq, d]
        delta = (do.to(acc) * out.to(acc)).sum(-1, keepdim=True)           # rowsum(dO * O)
        dq = torch.empty_like(qs)
        dk, dv = qs.new_zeros(kh.shape), qs.new_zeros(kh.shape)
        for i, e, kend in _query_blocks(sq, k.shape[1]):
            rows = g * (e - i)
            probs = torch.softmax(_block_scores(qs, kt, i, e, kend), dim=-1)
            do_blk = do[:, :, :, i:e].reshape(b, kv, rows, d)
            dv[:, :, :kend] += torch.matmul(probs.view(b, kv, rows, kend).to(dt).transpose(-1, -2), do_blk)
            dp = torch.matmul(do_blk, vt[..., :kend]).view(b, kv, g, e - i, kend)
            ds = dp.to(acc).sub_(delta[:, :, :, i:e]).mul_(probs).view(b, kv, rows, kend).to(dt)
            dq[:, :, :, i:e] = torch.matmul(ds, kh[:, :, :kend]).view(b, kv, g, e - i, d)
            dk[:, :, :kend] += torch.matmul(ds.transpose(-1, -2), qs[:, :, :, i:e].reshape(b, kv, rows, d).to(dt))
        return (_ungrouped(dq * ctx.scale).to(q.dtype), dk.transpose(1, 2).to(k.dtype),
                dv.transpose(1, 2).to(v.dtype), None)


def _scaled_queries_keys(q, k, scale):
    """Queries grouped per kv head and pre-scaled, [B, KV, G, Sq, d], and keys transposed,
    [B, KV, d, Sk], both in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = _grouped(q, q.shape[2] // k.shape[2]).to(acc) * scale
    return qs, k.permute(0, 2, 3, 1).to(acc)


def attention_chunked(q, k, v, *, scale=None):
    """Causal attention (Sq <= Sk, no mask) in blocks of query rows: see _ChunkedCausal."""
    if q.shape[1] > k.shape[1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention_chunked needs at most as many queries as keys and query heads "
                         f"a multiple of kv heads; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    return _ChunkedCausal.apply(q, k, v, scale)


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
    impl: "reference" (plain math), "fused" (SDPA; the grouped decode kernel when Sq = 1; the
    chunked causal kernel for long bf16 prefill on CPU, see CHUNKED_MIN_QUERIES; on a CPU
    without 16-bit matmul instructions, SDPA on fp32 copies: see emulated_matmul), "npu"
    (npu_fusion_attention), "auto" (npu on NPU, else fused).
    """
    check_impl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if _is_dtensor(q):
        return _attention_dtensor(q, k, v, causal=causal, mask=mask, scale=scale, impl=impl)
    if impl == "npu" or (impl == "auto" and is_npu(q)):
        return attention_npu(q, k, v, causal=causal, mask=mask, scale=scale)
    if impl == "reference":
        return attention_reference(q, k, v, causal=causal, mask=mask, scale=scale)
    if q.shape[1] == 1:  # causal is moot: the one query sits after every key; fp32 inside
        return attention_decode(q, k, v, mask=mask, scale=scale)
    if emulated_matmul(q):  # 16-bit on a CPU without 16-bit matmul instructions
        out = attention_sdpa(q.float(), k.float(), v.float(), causal=causal, mask=mask, scale=scale)
        return out.to(q.dtype)
    if _chunked_is_faster(q, k, causal, mask):
        return attention_chunked(q, k, v, scale=scale)
    return attention_sdpa(q, k, v, causal=causal, mask=mask, scale=scale)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


# DTensor placements under which attention is independent per rank: batch rows (dim 0) and
# heads (dim 2) split, or nothing; a split sequence or head dim, or a partial sum, is not.
_PER_RANK_SHARD_DIMS = (0, 2)


def _per_rank(q, k, v, mask) -> bool:
    """Whether each rank can attend over its own blocks of q, k, v: the same mesh and the
    same placements, each a batch or head split or a replica (kv heads split like query
    heads keep each rank's GQA groups whole), and no mask to distribute."""
    if mask is not None or not all(_is_dtensor(t) for t in (k, v)):
        return False
    same = all(t.device_mesh == q.device_mesh and t.placements == q.placements for t in (k, v))
    return same and all(p.is_replicate() or (p.is_shard() and p.dim in _PER_RANK_SHARD_DIMS)
                        for p in q.placements)


def _attention_dtensor(q, k, v, *, causal, mask, scale, impl):
    """Attention over DTensors (tensor and data parallel layers). Sharded over batch and heads,
    it runs the kernel `impl` picks on each rank's local blocks (as torchtitan's tensor
    parallelism does): no communication, and no DTensor sharding search for the batched
    matmuls of the math, which took about 6 s per new shape on a 2-D mesh with torch 2.13.
    Otherwise the reference math runs on the DTensors and DTensor moves what it must."""
    if not _per_rank(q, k, v, mask):
        return attention_reference(q, k, v, causal=causal, mask=mask, scale=scale)
    from torch.distributed.tensor import DTensor
    out = attention(q.to_local(), k.to_local(), v.to_local(), causal=causal, scale=scale, impl=impl)
    # contiguous, so the DTensor's global strides are the contiguous ones of its shape (the
    # caller's reshape into [B, S, H * hd] would copy a transposed kernel output anyway)
    return DTensor.from_local(out.contiguous(), q.device_mesh, q.placements, run_check=False,
                              shape=q.shape, stride=_contiguous_strides(q.shape))


def _contiguous_strides(shape) -> tuple:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= size
    return tuple(reversed(strides))


def _chunked_is_faster(q, k, causal, mask) -> bool:
    """See CHUNKED_MIN_QUERIES. Inside torch.compile, and for tensor subclasses, SDPA."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and causal and mask is None
            and CHUNKED_MIN_QUERIES <= q.shape[1] <= k.shape[1]
            and type(q) is torch.Tensor and not torch.compiler.is_compiling())
