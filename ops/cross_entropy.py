"""Cross-entropy fused with the output projection: loss over logits = hidden @ weight.T.

The fused path walks the tokens in chunks, so only [chunk, V] logits exist at a time, and
computes the exact gradients for hidden and weight in the same pass (the chunk's logits are
at hand then); backward only scales them by the incoming gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_impl

# fp32 logits per chunk: 2**24 elements = 64 MiB (for V = 100,008 that is 167 tokens).
CHUNK_LOGITS = 1 << 24


def cross_entropy_reference(hidden, weight, labels, ignore_index=-100):
    logits = (hidden @ weight.t()).float()  # the full [N, V] fp32 logits
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def default_chunk_size(vocab: int) -> int:
    return max(16, CHUNK_LOGITS // max(vocab, 1))


def _chunk_loss(h, weight, labels, valid):
    """(per-token loss, probabilities) for one chunk; the probabilities are fp32 [c, V]."""
    logits = (h @ weight.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(valid, labels, 0)
    target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - target, 0.0)
    return loss, logits, lse, safe


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, need_dh, need_dw):
        n = hidden.shape[0]
        loss = hidden.new_zeros((), dtype=torch.float32)
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for start in range(0, n, chunk):
            h, lab = hidden[start:start + chunk], labels[start:start + chunk]
            valid = lab != ignore_index
            tok_loss, logits, lse, safe = _chunk_loss(h, weight, lab, valid)
            loss += tok_loss.sum()
            # d loss_sum / d logits = softmax - onehot on valid rows, built in place.
            g = logits.sub_(lse.unsqueeze(1)).exp_()
            g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
            g.mul_(valid.unsqueeze(1))
            g = g.to(hidden.dtype)
            if need_dh:
                dh[start:start + chunk] = g @ weight
            if need_dw and dw.dtype == h.dtype:
                dw.addmm_(g.t(), h)
            elif need_dw:  # low-precision weight: accumulate the chunks' products in fp32
                dw.add_(g.t() @ h)
        ctx.save_for_backward(dh if need_dh else None, dw.to(weight.dtype) if need_dw else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if dh is not None else None
        dw = dw * grad_loss.to(dw.dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None


@torch.no_grad()
def _chunked_loss_only(hidden, weight, labels, ignore_index, chunk):
    loss = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        lab = labels[start:start + chunk]
        loss += _chunk_loss(hidden[start:start + chunk], weight, lab, lab != ignore_index)[0].sum()
    return loss


def cross_entropy_fused(hidden, weight, labels, ignore_index=-100, chunk_size=None):
    chunk = chunk_size or default_chunk_size(weight.shape[0])
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
    "fused" (chunks of chunk_size tokens, default about 64 MiB of fp32 logits, with
    exact gradients), "npu" and "auto" (the fused path, on every device).
    """
    check_impl(impl)
    if impl == "reference":
        return cross_entropy_reference(hidden, weight, labels, ignore_index)
    return cross_entropy_fused(hidden, weight, labels, ignore_index, chunk_size)
