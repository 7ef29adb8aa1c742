"""Cross-entropy fused with the output projection: loss over logits = hidden @ weight.T.

The fused path walks the tokens in chunks, so only [chunk, V] logits exist at a time, and
computes the exact gradients for hidden and weight in the same pass (the chunk's logits are
at hand then); backward only scales them by the incoming gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import LazyCompiled, check_impl, is_compiling

# Logits per chunk: 2**26 elements (671 tokens at V = 100,008; 256 MiB in fp32, 128 MiB in
# bf16), enough rows for the matmuls to reach full speed.
CHUNK_LOGITS = 1 << 26
# Chunks at least this large go through the compiled softmax kernels; smaller ones (tests,
# tiny models) run the same math eagerly rather than pay for compilation.
MIN_COMPILED_LOGITS = 1 << 20


def cross_entropy_reference(hidden, weight, labels, ignore_index=-100):
    logits = (hidden @ weight.t()).to(_acc(weight.dtype))  # the full [N, V] fp32 logits
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax and loss dtype: fp32 (fp64 inputs keep fp64)."""
    return torch.promote_types(dtype, torch.float32)


def default_chunk_size(vocab: int) -> int:
    return max(16, CHUNK_LOGITS // max(vocab, 1))


def _label_logits(z, labels, valid):
    """(z[i, label_i] in z's dtype, labels with ignored rows pointed at 0). Gathered eagerly,
    before any kernel that overwrites z: inductor in torch 2.11 scheduled this indirect read of
    z after the in-place write of the gradient into z in the same compiled graph, so the loss
    read softmax - 1 for the label logit (about +1 nat per token; the gradient was right)."""
    safe = torch.where(valid, labels, 0)
    return z.gather(1, safe.unsqueeze(1)).squeeze(1), safe


def _softmax_stats(z, target, valid):
    """(per-token loss, logsumexp [c, 1], z in the softmax dtype); target = _label_logits."""
    zf = z.to(_acc(z.dtype))
    top = zf.amax(1, keepdim=True)
    lse = top + (zf - top).exp().sum(1, keepdim=True).log()
    loss = torch.where(valid, lse.squeeze(1) - target.to(zf.dtype), 0.0)
    return loss, lse, zf


def _softmax_loss_eager(z, target, valid):
    return _softmax_stats(z, target, valid)[0]


def _softmax_grad_eager_(z, target, safe, valid):
    """Per-token losses; overwrites z with d loss_sum / d z = softmax - onehot(label), zero
    on ignored rows. exp(z - lse) is recomputed rather than shared with the sum, so the
    compiled kernel keeps no [c, V] intermediate: one pass for statistics, one for z. Every
    read of z here is a row reduction or at the position being written: safe in place."""
    loss, lse, zf = _softmax_stats(z, target, valid)
    onehot = torch.arange(z.shape[1], device=z.device).unsqueeze(0) == safe.unsqueeze(1)
    z.copy_(torch.where(valid.unsqueeze(1), (zf - lse).exp() - onehot.to(zf.dtype), 0.0))
    return loss


_softmax_loss_compiled = LazyCompiled(_softmax_loss_eager, dynamic=False)
_softmax_grad_compiled_ = LazyCompiled(_softmax_grad_eager_, dynamic=False)


def _softmax_loss(z, labels, valid):
    big = z.numel() >= MIN_COMPILED_LOGITS
    target, _ = _label_logits(z, labels, valid)
    return (_softmax_loss_compiled if big else _softmax_loss_eager)(z, target, valid)


def _softmax_grad_(z, labels, valid):
    big = z.numel() >= MIN_COMPILED_LOGITS
    target, safe = _label_logits(z, labels, valid)
    return (_softmax_grad_compiled_ if big else _softmax_grad_eager_)(z, target, safe, valid)


def _accumulate_eager(dst, src):
    dst.add_(src.float())


# Eager mixed-dtype add_ converts all of src into a temporary first (two passes and a
# [V, D] fp32 copy); the compiled kernel converts on the fly: ~10x faster on CPU.
_accumulate_compiled = LazyCompiled(_accumulate_eager)


def _accumulate(dst, src):
    big = src.numel() >= MIN_COMPILED_LOGITS
    return (_accumulate_compiled if big else _accumulate_eager)(dst, src)


class _Scratch:
    """Buffers reused by every chunk: a fresh chunk-sized tensor costs more in page faults
    than the arithmetic done on it (CPU), and churns the caching allocator (CUDA)."""

    def __init__(self, chunk, weight, need_dw):
        acc = _acc(weight.dtype)
        self.logits = torch.empty(chunk, weight.shape[0], dtype=weight.dtype, device=weight.device)
        # 16-bit weights: the weight gradient is accumulated in fp32 from 16-bit products
        self.dw_part = torch.empty_like(weight) if (need_dw and weight.dtype != acc) else None


def _chunk_logits(h, weight, scratch):
    return torch.mm(h, weight.t(), out=scratch.logits[:h.shape[0]])


def _chunk_backprop(g, h, weight, scratch, dh, dw):
    """Push one chunk's logit gradients g through the projection: dh rows, dw accumulated."""
    if dh is not None:
        torch.mm(g, weight, out=dh)
    if dw is not None and scratch.dw_part is None:
        dw.addmm_(g.t(), h)
    elif dw is not None:  # matmul in the weight's dtype (as the reference), sum in fp32
        _accumulate(dw, torch.mm(g.t(), h, out=scratch.dw_part))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, need_dh, need_dw):
        scratch = _Scratch(min(chunk, hidden.shape[0]), weight, need_dw)
        # Summed out of place: under torch.compile, torch 2.11 gives a zero gradient to a
        # Function output that forward mutated in place (`loss += ...`; cf. pytorch#180642).
        loss = hidden.new_zeros((), dtype=_acc(weight.dtype))
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight, dtype=_acc(weight.dtype)) if need_dw else None
        for start in range(0, hidden.shape[0], chunk):
            h, lab = hidden[start:start + chunk], labels[start:start + chunk]
            z = _chunk_logits(h, weight, scratch)
            loss = loss + _softmax_grad_(z, lab, lab != ignore_index).sum()
            _chunk_backprop(z, h, weight, scratch, dh[start:start + chunk] if need_dh else None, dw)
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
    loss = hidden.new_zeros((), dtype=_acc(weight.dtype))
    for start in range(0, hidden.shape[0], chunk):
        h, lab = hidden[start:start + chunk], labels[start:start + chunk]
        loss += _softmax_loss(_chunk_logits(h, weight, scratch), lab, lab != ignore_index).sum()
    return loss


def _balanced(n: int, chunk: int) -> int:
    """Equal chunks no larger than `chunk` (2048 tokens by 671 -> 4 x 512, not 3 x 671 + 35):
    one shape to compile and no runt chunk at the end."""
    pieces = max(1, -(-n // chunk))
    return -(-n // pieces)


def _counted_rows(hidden, labels, ignore_index):
    """Only the tokens that count: ignored rows (padding, fine-tuning prompts) would cost their
    share of all three vocabulary-sized matmuls for nothing. Eager only: the row count is data
    dependent, and a compiled graph keeps one static shape."""
    if is_compiling():
        return hidden, labels
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if keep.numel() in (0, labels.numel()):
        return hidden, labels
    return hidden.index_select(0, keep), labels.index_select(0, keep)  # backward scatters dh


def cross_entropy_fused(hidden, weight, labels, ignore_index=-100, chunk_size=None):
    count = (labels != ignore_index).sum()
    hidden, labels = _counted_rows(hidden, labels, ignore_index)
    chunk = chunk_size or _balanced(hidden.shape[0], default_chunk_size(weight.shape[0]))
    need_dh = hidden.requires_grad and torch.is_grad_enabled()
    need_dw = weight.requires_grad and torch.is_grad_enabled()
    if need_dh or need_dw:
        loss = _FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk,
                                              need_dh, need_dw)
    else:  # evaluation: no gradient work at all
        loss = _chunked_loss_only(hidden, weight, labels, ignore_index, chunk)
    return loss, count


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = -100, chunk_size: int | None = None,
                  impl: str = "auto"):
    """Sum of token cross-entropies of logits = hidden @ weight.T, in fp32.

    hidden [N, D], weight [V, D] (like nn.Linear / lm_head), labels [N] long.
    Returns (loss_sum fp32 scalar (fp64 for fp64 inputs), n_tokens long scalar); labels equal to ignore_index add
    nothing to either. impl: "reference" (full [N, V] fp32 logits and F.cross_entropy),
    "fused" (only the counted tokens, in chunks of chunk_size tokens, by default 2**26 logits at a time, with the
    softmax and its gradient in one compiled kernel per chunk; exact gradients computed in
    the same pass, so backward only scales them and may run once),
    "npu" and "auto" (the fused path, on every device).
    """
    check_impl(impl)
    if impl == "reference":
        return cross_entropy_reference(hidden, weight, labels, ignore_index)
    return cross_entropy_fused(hidden, weight, labels, ignore_index, chunk_size)
