"""Causal / grouped-query attention over BSND tensors, including the one-query decode shape."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import check_impl, emulated_matmul, is_dtensor, is_npu, on_local_blocks, torch_npu

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
    if q.is_meta and keep is None:
        # Meta tensors (parallel.plan's dry run) would take SDPA's math path, which keeps the
        # [B, H, S, S] probabilities; the flash kernel a device runs keeps q, k, v, the output
        # and a logsumexp per row. Its CPU op has meta shapes (and the output layout) of its own.
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, scale=scale)[0]
        return out.transpose(1, 2)
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


# The chunked kernel is auto's choice on CPU for causal prefill of at least this many queries
# (see _chunked_keep_probs). bf16, where the CPU multiplies bf16 natively (avx512_bf16 / AMX):
# it beat SDPA (1024 tokens, 32 heads of 128: forward 1.3x, forward+backward 1.1x; 512 tokens,
# head dim 64: 1.3x) because torch's CPU flash kernel runs bf16 at about fp32 speed there while
# this kernel multiplies P @ V in bf16. fp32 training, with the probabilities kept: see
# SAVED_PROBS_MAX_BYTES. An fp32 forward alone is as fast through SDPA's fused online softmax,
# and below 512 queries the kernel gained little (fp32 training at 256 tokens: 1.0-1.1x SDPA).
CHUNKED_MIN_QUERIES = 512
# Query rows per block of the chunked causal kernel: each block computes scores only up to its
# own last key, so a causal pass computes (n/c + 1) / (2 n/c) of the score matrix (56% at 1024
# tokens, against 62.5% for torch's CPU flash kernel with its 256-row blocks), and 128 rows
# keep the batched matmuls near peak (64, 96, 192 and 256 rows were no faster on a Zen 3).
CHUNK_ROWS = 128
# In training the kernel keeps each block's fp32 probabilities for backward when they fit in
# this many bytes per call (1024 tokens x 32 heads take 72 MiB at batch 1, against 128 MiB for
# each of the several [B, H, S, S] fp32 tensors the reference keeps): backward then runs 4
# matmuls instead of 5 and no softmax. On a Zen 3 (AVX2) fp32 forward+backward became 1.1-1.3x
# SDPA's at 1024 tokens and 1.46x at 512. Beyond the budget SDPA, which keeps O(S) per row
# (recomputing in the chunked kernel was as fast at 1024 tokens and slower at 2048).
SAVED_PROBS_MAX_BYTES = 128 << 20


def _query_blocks(sq: int, sk: int, rows: int = CHUNK_ROWS):
    """(first row, end row, end key) per block of queries, bottom-right causal."""
    for i in range(0, sq, rows):
        e = min(i + rows, sq)
        yield i, e, sk - sq + e


def saved_probs_bytes(b: int, h: int, sq: int, sk: int) -> int:
    """Bytes of fp32 probabilities the chunked kernel keeps for backward."""
    return 4 * b * h * sum((e - i) * kend for i, e, kend in _query_blocks(sq, sk))


def _rows_by_kv_head(x: torch.Tensor, g: int, dtype, scale: float | None = None) -> torch.Tensor:
    """[B, S, H, d] -> a new [B, KV, S, G, d] in dtype (times scale): one kv head's G query
    heads for rows i:e are then the contiguous matrix [KV, (e - i) * G, d] of one bmm."""
    b, s, h, d = x.shape
    src = x.view(b, s, h // g, g, d).permute(0, 2, 1, 3, 4)
    out = x.new_empty(src.shape, dtype=dtype)
    return out.copy_(src) if scale is None else torch.mul(src, scale, out=out)


def _store_rows(dst: torch.Tensor, block: torch.Tensor, i: int, e: int) -> None:
    """Write a kernel block [KV, (e - i) * G, d] into rows i:e of one sequence's [S, H, d]."""
    n, kv, d = e - i, block.shape[0], block.shape[-1]
    dst[i:e].view(n, kv, -1, d).copy_(block.view(kv, n, -1, d).transpose(0, 1))


def _kv_heads(x: torch.Tensor) -> torch.Tensor:
    """One sequence's keys or values, [Sk, KV, d], as [KV, Sk, d]: a view, which bmm reads
    in place (a transposing copy of K to [KV, d, Sk] cost more than a third of a GEMM)."""
    return x.transpose(0, 1)


def _block_probs(qg, kb, i, e, kend):
    """fp32 probabilities of query rows [i, e) (all G heads of each kv head) against keys
    [0, kend), the causal triangle of the last e - i keys masked: [KV, (e - i) * G, kend]."""
    kv, g, d, n = qg.shape[0], qg.shape[2], qg.shape[3], e - i
    scores = torch.bmm(qg[:, i:e].reshape(kv, n * g, d), kb[:, :kend].transpose(1, 2))
    masked = ~_causal_keep(n, n, qg.device).unsqueeze(1)                  # [n, 1 (G), n]
    scores.view(kv, n, g, kend)[..., kend - n:].masked_fill_(masked, float("-inf"))
    return torch.softmax(scores, dim=-1)


def _add_bmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b; a 16-bit product is added to the fp32 accumulator after the matmul."""
    if acc.dtype == a.dtype:
        acc.baddbmm_(a, b)
    else:
        acc += torch.bmm(a, b)


def _score_grads(do, vt, delta, probs):
    """dS = P * (dO V^T - rowsum(dO * O)), in do's dtype; in fp32 the subtraction rides on
    the matmul (baddbmm with beta = -1), saving a pass over the block."""
    if do.dtype == delta.dtype:
        ds = torch.baddbmm(delta, do, vt, beta=-1)
    else:
        ds = torch.bmm(do, vt).to(delta.dtype).sub_(delta)
    return ds.mul_(probs).to(do.dtype)


class _ChunkedCausal(torch.autograd.Function):
    """Causal attention in blocks of query rows, with flash attention's numerics: scores and
    softmax in fp32, probabilities cast to the value dtype for P @ V (16-bit matmuls run at
    their full speed). Backward uses the probabilities kept in forward (keep_probs) or
    recomputes them per block. Each bmm reads K and V as strided views of the BSND inputs."""

    @staticmethod
    def forward(ctx, q, k, v, scale, keep_probs):
        b, sq, h, d = q.shape
        kv, dt = k.shape[2], v.dtype
        acc = torch.promote_types(q.dtype, torch.float32)
        qg = _rows_by_kv_head(q, h // kv, acc, scale)                      # [B, KV, Sq, G, d]
        kf = k.to(acc)
        out = q.new_empty(q.shape, dtype=dt)
        kept = []
        for bi in range(b):
            kb, vb = _kv_heads(kf[bi]), _kv_heads(v[bi])
            for i, e, kend in _query_blocks(sq, k.shape[1]):
                probs = _block_probs(qg[bi], kb, i, e, kend)
                _store_rows(out[bi], torch.bmm(probs.to(dt), vb[:, :kend]), i, e)
                if keep_probs:
                    kept.append(probs)
        ctx.scale = scale
        ctx.save_for_backward(qg, k, v, out, *kept)  # saved tensors: activation checkpointing frees them
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, out, *kept = ctx.saved_tensors
        b, kv, sq, g, d = qg.shape
        sk, acc, dt = k.shape[1], qg.dtype, v.dtype
        kf = k.to(acc)
        dog = _rows_by_kv_head(grad_out, g, dt)                            # [B, KV, Sq, G, d]
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)                   # rowsum(dO * O), [B, Sq, H]
        delta = _rows_by_kv_head(delta.unsqueeze(-1), g, acc)              # [B, KV, Sq, G, 1]
        dq = grad_out.new_empty(grad_out.shape, dtype=acc)
        dk, dv = qg.new_zeros((b, kv, sk, d)), qg.new_zeros((b, kv, sk, d))
        kept = iter(kept)
        for bi in range(b):
            kb, kd, vb = _kv_heads(kf[bi]), _kv_heads(k[bi]), _kv_heads(v[bi])
            for i, e, kend in _query_blocks(sq, sk):
                probs = next(kept, None)
                if probs is None:
                    probs = _block_probs(qg[bi], kb, i, e, kend)
                do = dog[bi, :, i:e].reshape(kv, -1, d)
                _add_bmm(dv[bi, :, :kend], probs.to(dt).transpose(1, 2), do)
                ds = _score_grads(do, vb[:, :kend].transpose(1, 2), delta[bi, :, i:e].reshape(kv, -1, 1), probs)
                _store_rows(dq[bi], torch.bmm(ds, kd[:, :kend]), i, e)
                _add_bmm(dk[bi, :, :kend], ds.transpose(1, 2), qg[bi, :, i:e].reshape(kv, -1, d).to(dt))
        return (dq.mul_(ctx.scale).to(grad_out.dtype), dk.transpose(1, 2).to(k.dtype),
                dv.transpose(1, 2).to(v.dtype), None, None)


def attention_chunked(q, k, v, *, scale=None, keep_probs=False):
    """Causal attention (Sq <= Sk, no mask) in blocks of query rows: see _ChunkedCausal.
    keep_probs trades saved_probs_bytes() of memory for a faster backward."""
    if q.shape[1] > k.shape[1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention_chunked needs at most as many queries as keys and query heads "
                         f"a multiple of kv heads; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    return _ChunkedCausal.apply(q, k, v, scale, keep_probs)


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
    impl: "reference" (plain math), "fused" (SDPA; the grouped decode kernel when Sq = 1; on
    CPU the chunked causal kernel for long bf16 prefill and fp32 training, see
    _chunked_keep_probs; on a CPU without 16-bit matmul instructions, the fp32 choice on fp32
    copies: see emulated_matmul), "npu"
    (npu_fusion_attention), "auto" (npu on NPU, else fused).
    """
    check_impl(impl)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads {k.shape[2]}")
    if is_dtensor(q):
        return _attention_dtensor(q, k, v, causal=causal, mask=mask, scale=scale, impl=impl)
    if impl == "npu" or (impl == "auto" and is_npu(q)):
        return attention_npu(q, k, v, causal=causal, mask=mask, scale=scale)
    if impl == "reference":
        return attention_reference(q, k, v, causal=causal, mask=mask, scale=scale)
    if q.shape[1] == 1:  # causal is moot: the one query sits after every key; fp32 inside
        return attention_decode(q, k, v, mask=mask, scale=scale)
    if emulated_matmul(q):  # 16-bit on a CPU without 16-bit matmul instructions: fp32 inside
        out = attention(q.float(), k.float(), v.float(), causal=causal, mask=mask, scale=scale, impl=impl)
        return out.to(q.dtype)
    keep_probs = _chunked_keep_probs(q, k, v, causal, mask)
    if keep_probs is not None:
        return attention_chunked(q, k, v, scale=scale, keep_probs=keep_probs)
    return attention_sdpa(q, k, v, causal=causal, mask=mask, scale=scale)


# DTensor placements under which attention is independent per rank: batch rows (dim 0) and
# heads (dim 2) split, or nothing; a split sequence or head dim, or a partial sum, is not.
_PER_RANK_SHARD_DIMS = (0, 2)


def _attention_dtensor(q, k, v, *, causal, mask, scale, impl):
    """Attention over DTensors (tensor and data parallel layers). With q, k, v placed alike
    (kv heads split like query heads keep each rank's GQA groups whole) over batch and heads,
    and no mask to distribute, it runs the kernel `impl` picks on each rank's local blocks (as
    torchtitan's tensor parallelism does): no communication, and no DTensor sharding search for
    the batched matmuls of the math, which took about 6 s per new shape on a 2-D mesh with
    torch 2.13. Otherwise the reference math runs on the DTensors and DTensor moves what it must."""
    out = None
    if mask is None and all(is_dtensor(t) and t.placements == q.placements for t in (k, v)):
        out = on_local_blocks(lambda a, b, c: attention(a, b, c, causal=causal, scale=scale, impl=impl),
                              q, k, v, free_dims=_PER_RANK_SHARD_DIMS)
    return out if out is not None else attention_reference(q, k, v, causal=causal, mask=mask, scale=scale)


def _chunked_keep_probs(q, k, v, causal, mask) -> bool | None:
    """None where SDPA is faster, else whether the chunked kernel keeps its probabilities:
    bf16 prefill (16-bit matmuls native here) takes the kernel, keeping probabilities in
    training within SAVED_PROBS_MAX_BYTES; fp32 takes it only in training within the budget.
    See CHUNKED_MIN_QUERIES. Inside torch.compile, and for tensor subclasses, SDPA."""
    if not (q.device.type == "cpu" and causal and mask is None and type(q) is torch.Tensor
            and CHUNKED_MIN_QUERIES <= q.shape[1] <= k.shape[1] and not torch.compiler.is_compiling()):
        return None
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    keep = training and saved_probs_bytes(q.shape[0], q.shape[2], q.shape[1], k.shape[1]) <= SAVED_PROBS_MAX_BYTES
    if q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and keep):
        return keep
    return None
