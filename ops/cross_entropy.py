"""Cross-entropy fused with the output projection: loss over logits = hidden @ weight.T.

The fused path walks the tokens in chunks, so only [chunk, V] logits exist at a time, and
computes the exact gradients for hidden and weight in the same pass (the chunk's logits are
at hand then); backward only scales them by the incoming gradient. With the weight's
vocabulary split over a process group (tensor parallelism), each rank holds [chunk, V / n]
logits and the softmax statistics are all-reduced over the group (Megatron's
vocabulary-parallel cross-entropy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._dispatch import LazyCompiled, check_impl, is_compiling, is_dtensor

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


@dataclass(frozen=True)
class VocabShard:
    """This rank's block of a vocabulary split over a process group: rows start.. of the
    weight; `padded` = the largest block's rows (equal on every rank, so is the chunking)."""

    group: Any
    start: int
    padded: int


def _vocab_sums(z, top, local, mine):
    """[c, 2]: the sum of exp(z - top) over this rank's vocabulary block, and the target logit
    where this rank holds the label (`mine`; `local` = label - the block's first row), else 0."""
    zf = z.to(_acc(z.dtype))
    target = zf.gather(1, torch.where(mine, local, 0).unsqueeze(1)).squeeze(1)
    return torch.stack([(zf - top).exp().sum(1), torch.where(mine, target, 0.0)], dim=1)


def _vocab_grad_(z, lse, local, mine, valid):
    """Overwrites z with this block's d loss_sum / d z (see _softmax_grad_eager_)."""
    zf = z.to(_acc(z.dtype))
    onehot = (torch.arange(z.shape[1], device=z.device).unsqueeze(0) == local.unsqueeze(1)) & mine.unsqueeze(1)
    z.copy_(torch.where(valid.unsqueeze(1), (zf - lse).exp() - onehot.to(zf.dtype), 0.0))


_vocab_sums_compiled = LazyCompiled(_vocab_sums, dynamic=False)
_vocab_grad_compiled_ = LazyCompiled(_vocab_grad_, dynamic=False)


def _vocab_parallel_loss(z, labels, valid, vocab: VocabShard, grad: bool):
    """Per-token losses of logits whose vocabulary is split over vocab.group (z: this rank's
    block): the max, then the sum of exponentials and the target logit, are all-reduced over
    the group. With `grad`, z is overwritten with its gradient, as _softmax_grad_ does."""
    import torch.distributed as dist

    big = z.numel() >= MIN_COMPILED_LOGITS
    local = labels - vocab.start
    mine = valid & (local >= 0) & (local < z.shape[1])
    top = z.amax(1, keepdim=True).to(_acc(z.dtype))
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=vocab.group)
    sums = (_vocab_sums_compiled if big else _vocab_sums)(z, top, local, mine)
    dist.all_reduce(sums, group=vocab.group)
    lse = top + sums[:, :1].log()
    if grad:
        (_vocab_grad_compiled_ if big else _vocab_grad_)(z, lse, local, mine, valid)
    return torch.where(valid, lse.squeeze(1) - sums[:, 1], 0.0)


def _softmax_loss(z, labels, valid, vocab: VocabShard | None = None):
    if vocab is not None:
        return _vocab_parallel_loss(z, labels, valid, vocab, grad=False)
    big = z.numel() >= MIN_COMPILED_LOGITS
    target, _ = _label_logits(z, labels, valid)
    return (_softmax_loss_compiled if big else _softmax_loss_eager)(z, target, valid)


def _softmax_grad_(z, labels, valid, vocab: VocabShard | None = None):
    if vocab is not None:
        return _vocab_parallel_loss(z, labels, valid, vocab, grad=True)
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
    def forward(ctx, hidden, weight, labels, ignore_index, chunk, need_dh, need_dw, vocab):
        scratch = _Scratch(min(chunk, hidden.shape[0]), weight, need_dw)
        # Summed out of place: under torch.compile, torch 2.11 gives a zero gradient to a
        # Function output that forward mutated in place (`loss += ...`; cf. pytorch#180642).
        loss = hidden.new_zeros((), dtype=_acc(weight.dtype))
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight, dtype=_acc(weight.dtype)) if need_dw else None
        for start in range(0, hidden.shape[0], chunk):
            h, lab = hidden[start:start + chunk], labels[start:start + chunk]
            z = _chunk_logits(h, weight, scratch)
            loss = loss + _softmax_grad_(z, lab, lab != ignore_index, vocab).sum()
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
        return dh, dw, None, None, None, None, None, None


@torch.no_grad()
def _chunked_loss_only(hidden, weight, labels, ignore_index, chunk, vocab):
    scratch = _Scratch(min(chunk, hidden.shape[0]), weight, need_dw=False)
    loss = hidden.new_zeros((), dtype=_acc(weight.dtype))
    for start in range(0, hidden.shape[0], chunk):
        h, lab = hidden[start:start + chunk], labels[start:start + chunk]
        loss += _softmax_loss(_chunk_logits(h, weight, scratch), lab, lab != ignore_index, vocab).sum()
    return loss


def _balanced(n: int, chunk: int) -> int:
    """Equal chunks no larger than `chunk` (2048 tokens by 671 -> 4 x 512, not 3 x 671 + 35):
    one shape to compile and no runt chunk at the end."""
    pieces = max(1, -(-n // chunk))
    return -(-n // pieces)


def _counted_rows(hidden, labels, ignore_index):
    """Only the tokens that count: ignored rows (padding, fine-tuning prompts) would cost their
    share of all three vocabulary-sized matmuls for nothing. Eager only: the row count is data
    dependent, and a compiled graph keeps one static shape; meta tensors (parallel.plan's dry
    run) have no values: all rows count."""
    if is_compiling() or labels.is_meta:
        return hidden, labels
    keep = (labels != ignore_index).nonzero().squeeze(1)
    if keep.numel() in (0, labels.numel()):
        return hidden, labels
    return hidden.index_select(0, keep), labels.index_select(0, keep)  # backward scatters dh


def cross_entropy_fused(hidden, weight, labels, ignore_index=-100, chunk_size=None,
                        vocab: VocabShard | None = None):
    """See cross_entropy; `vocab`: weight holds this rank's block of a split vocabulary (the
    loss is then the whole vocabulary's, equal on every rank of vocab.group, and hidden's
    gradient this block's share)."""
    count = (labels != ignore_index).sum()
    hidden, labels = _counted_rows(hidden, labels, ignore_index)
    rows = vocab.padded if vocab is not None else weight.shape[0]
    chunk = chunk_size or _balanced(hidden.shape[0], default_chunk_size(rows))
    need_dh = hidden.requires_grad and torch.is_grad_enabled()
    need_dw = weight.requires_grad and torch.is_grad_enabled()
    if need_dh or need_dw:
        loss = _FusedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk,
                                              need_dh, need_dw, vocab)
    else:  # evaluation: no gradient work at all
        loss = _chunked_loss_only(hidden, weight, labels, ignore_index, chunk, vocab)
    return loss, count


def _split_roles(hidden, weight, labels) -> list | None:
    """Per mesh dim of DTensor inputs, how the loss splits there: "rows" (hidden and labels
    split by rows, the weight whole), "vocab" (the weight split by vocabulary rows, hidden and
    labels whole), None (all whole); None if the placements are none of these (or the
    vocabulary is split over more than one mesh dim)."""
    if not (is_dtensor(weight) and is_dtensor(labels)) or \
            not (hidden.device_mesh == weight.device_mesh == labels.device_mesh):
        return None
    roles = []
    for h, w, lab in zip(hidden.placements, weight.placements, labels.placements):
        if h.is_shard(0) and lab.is_shard(0) and w.is_replicate():
            roles.append("rows")
        elif h.is_replicate() and lab.is_replicate() and (w.is_replicate() or w.is_shard(0)):
            roles.append("vocab" if w.is_shard(0) else None)
        else:
            return None
    return roles if roles.count("vocab") <= 1 else None


def _cross_entropy_dtensor(hidden, weight, labels, ignore_index, chunk_size):
    """The fused loss on each rank's blocks of DTensor inputs (data parallel rows, a
    vocabulary-parallel weight), as (loss, count) DTensors: partial sums over the mesh dims
    that split the rows, whole over the others. None where the placements do not allow it."""
    roles = _split_roles(hidden, weight, labels)
    if roles is None:
        return None
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = hidden.device_mesh
    # gradients: a row split's replicated weight gets each rank's partial sum; so does the
    # whole hidden state from each vocabulary block
    h = hidden.to_local(grad_placements=[Partial() if r == "vocab" else p for r, p in zip(roles, hidden.placements)])
    w = weight.to_local(grad_placements=[Partial() if r == "rows" else p for r, p in zip(roles, weight.placements)])
    vocab = None
    if "vocab" in roles:
        d = roles.index("vocab")
        padded = -(-weight.shape[0] // mesh.size(d))  # torch.chunk's block size, as DTensor's Shard
        vocab = VocabShard(mesh.get_group(d), mesh.get_local_rank(d) * padded, padded)
    loss, count = cross_entropy_fused(h, w, labels.to_local(), ignore_index, chunk_size, vocab)
    placements = [Partial() if r == "rows" else Replicate() for r in roles]
    return tuple(DTensor.from_local(t, mesh, placements, run_check=False, shape=(), stride=())
                 for t in (loss, count))


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
    "npu" and "auto" (the fused path, on every device). DTensor inputs split by rows and/or
    with the weight split by vocabulary rows (tensor parallelism) run the fused path on each
    rank's blocks, vocabulary-parallel where the vocabulary is split; other placements run
    the reference math on the DTensors.
    """
    check_impl(impl)
    if impl != "reference" and is_dtensor(hidden):
        out = _cross_entropy_dtensor(hidden, weight, labels, ignore_index, chunk_size)
        if out is not None:
            return out
    if impl == "reference" or is_dtensor(hidden):
        return cross_entropy_reference(hidden, weight, labels, ignore_index)
    return cross_entropy_fused(hidden, weight, labels, ignore_index, chunk_size)
