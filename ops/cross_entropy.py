"""Cross-entropy fused with the output projection: loss over logits = hidden @ weight.T.

The fused path walks the tokens in chunks, so only [chunk, V] logits exist at a time, and
computes the exact gradients for hidden and weight in the same pass (the chunk's logits are
at hand then); backward only scales them by the incoming gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import LazyCompiled, check_impl

# fp32 logits per chunk: 2**26 elements = 256 MiB (671 tokens at V = 100,008), where fp32
# matmuls reach full speed. 16-bit weights get half: they also keep a 16-bit copy of the
# chunk and a [V, D] partial product for the fp32 accumulation of the weight gradient.
CHUNK_LOGITS = {torch.float32: 1 << 26}
CHUNK_LOGITS_LOW_PRECISION = 1 << 25


def cross_entropy_reference(hidden, weight, labels, ignore_index=-100):
    logits = (hidden @ weight.t()).float()  # the full [N, V] fp32 logits
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def default_chunk_size(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    budget = CHUNK_LOGITS.get(dtype, CHUNK_LOGITS_LOW_PRECISION)
    return max(16, budget // max(vocab, 1))


class _Scratch:
    """Buffers reused by every chunk: a fresh 64 MiB tensor per chunk costs more in page
    faults than the arithmetic done on it (CPU), and the allocator churns (CUDA)."""

    def __init__(self, chunk, weight, need_dw):
        v, low = weight.shape[0], weight.dtype != torch.float32
        self.logits = torch.empty(chunk, v, dtype=torch.float32, device=weight.device)
        self.low = torch.empty(chunk, v, dtype=weight.dtype, device=weight.device) if low else None
        self.dw_part = torch.empty_like(weight) if (need_dw and low) else None


def _chunk_softmax(h, weight, labels, valid, scratch):
    """Per-token losses of one chunk; leaves exp(logits - max) (fp32 [c, V]) in
    scratch.logits and returns its row sums."""
    c = h.shape[0]
    logits = scratch.logits[:c]
    if scratch.low is None:
        torch.mm(h, weight.t(), out=logits)
    else:  # matmul in the input dtype (as the reference does), softmax in fp32
        logits.copy_(torch.mm(h, weight.t(), out=scratch.low[:c]))
    safe = torch.where(valid, labels, 0)
    target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    top = logits.amax(1, keepdim=True)
    total = logits.sub_(top).exp_().sum(1, keepdim=True)
    loss = torch.where(valid, (top + total.log()).squeeze(1) - target, 0.0)
    return loss, total, safe


def _chunk_grads(h, weight, valid, safe, total, scratch, dh, dw):
    """d loss_sum / d logits = softmax - onehot(label) on valid rows, built in place, then
    pushed through the projection into dh (this chunk's rows) and dw (accumulated)."""
    c = h.shape[0]
    g = scratch.logits[:c]
    keep = valid.to(g.dtype).unsqueeze(1)
    g.mul_(keep / total)
    g[torch.arange(c, device=g.device), safe] -= keep.squeeze(1)
    if scratch.low is not None:
        g = scratch.low[:c].copy_(g)
    if dh is not None:
        torch.mm(g, weight, out=dh)
    if dw is not None and scratch.dw_part is None:
        dw.addmm_(g.t(), h)
    elif dw is not None:  # low-precision matmul, fp32 accumulation over chunks
        _accumulate(dw, torch.mm(g.t(), h, out=scratch.dw_part))


def _accumulate_eager(dst, src):
    dst.add_(src.float())


# Eager mixed-dtype add_ converts all of src into a temporary first (two passes and a
# [V, D] fp32 copy); the compiled kernel converts on the fly: ~10x faster on CPU.
_accumulate = LazyCompiled(_accumulate_eager)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, need_dh, need_dw):
        scratch = _Scratch(min(chunk, hidden.shape[0]), weight, need_dw)
        loss = hidden.new_zeros((), dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for start in range(0, hidden.shape[0], chunk):
            h, lab = hidden[start:start + chunk], labels[start:start + chunk]
            valid = lab != ignore_index
            tok_loss, total, safe = _chunk_softmax(h, weight, lab, valid, scratch)
            loss += tok_loss.sum()
            _chunk_grads(h, weight, valid, safe, total, scratch,
                         dh[start:start + chunk] if need_dh else None, dw)
        if need_dw and scratch.dw_part is not None:  # cast into the buffer: no extra copy
            dw = scratch.dw_part.copy_(dw)
        # Kept on ctx, not save_for_backward: backward scales them in place, so the loss's
        # gradients never exist twice (each is as large as its input).
        ctx.grads = (dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused cross_entropy: backward ran twice (retain_graph); "
                               "use impl='reference' for that")
        dh, dw = ctx.grads
        ctx.grads = None
        if dh is not None:
            dh.mul_(grad_loss.to(dh.dtype))
        if dw is not None:
            dw.mul_(grad_loss.to(dw.dtype))
        return dh, dw, None, None, None, None, None


@torch.no_grad()
def _chunked_loss_only(hidden, weight, labels, ignore_index, chunk):
    scratch = _Scratch(min(chunk, hidden.shape[0]), weight, need_dw=False)
    loss = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        lab = labels[start:start + chunk]
        loss += _chunk_softmax(hidden[start:start + chunk], weight, lab, lab != ignore_index,
                               scratch)[0].sum()
    return loss


def cross_entropy_fused(hidden, weight, labels, ignore_index=-100, chunk_size=None):
    chunk = chunk_size or default_chunk_size(weight.shape[0], weight.dtype)
    need_dh = hidden.requires_grad and torch.is_grad_enabled()
    need_dw = weight.requires_grad and torch.is_grad_enabled()
    if need_dh or need_dw:
        loss = _FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk,
                                              need_dh, need_dw)
    else:  # evaluation: no gradient work at all
        loss = _chunked_loss_only(hidden, weight, labels, ignore_index, chunk)
    return loss, (labels != ignore_index).sum()


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = -100, chunk_size: int | None = None,
                  impl: str = "auto"):
    """Sum of token cross-entropies of logits = hidden @ weight.T, in fp32.

    hidden [N, D], weight [V, D] (like nn.Linear / lm_head), labels [N] long.
    Returns (loss_sum fp32 scalar, n_tokens long scalar); labels equal to ignore_index add
    nothing to either. impl: "reference" (full [N, V] fp32 logits and F.cross_entropy),
    "fused" (chunks of chunk_size tokens, by default 256 MiB of fp32 logits, 128 MiB for
    16-bit weights; exact gradients computed in the same pass; backward may run once),
    "npu" and "auto" (the fused path, on every device).
    """
    check_impl(impl)
    if impl == "reference":
        return cross_entropy_reference(hidden, weight, labels, ignore_index)
    return cross_entropy_fused(hidden, weight, labels, ignore_index, chunk_size)
