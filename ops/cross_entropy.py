"""Cross-entropy fused with the output projection: loss over hidden @ weight.T."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import check_impl


def cross_entropy_reference(hidden, weight, labels, ignore_index=-100):
    logits = (hidden @ weight.t()).float()  # the full [N, V] fp32 logits
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                  ignore_index: int = -100, chunk_size: int | None = None,
                  impl: str = "auto"):
    """hidden [N, D], weight [V, D], labels [N] -> (loss_sum fp32 scalar, n_tokens long scalar)."""
    check_impl(impl)
    return cross_entropy_reference(hidden, weight, labels, ignore_index)
