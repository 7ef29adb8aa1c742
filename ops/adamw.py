"""AdamW update over lists of tensors, in place (torch.optim.AdamW semantics)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._dispatch import check_impl


def _per_tensor(value, n):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-tensor values, got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * n


@torch.no_grad()
def adamw_reference(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
                    weight_decay):
    wds = _per_tensor(weight_decay, len(params))
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    for p, g, m, v, wd in zip(params, grads, exp_avgs, exp_avg_sqs, wds):
        g = g.to(m.dtype)
        p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / bc1)


def adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
          exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
          step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float | Sequence[float] = 0.0, impl: str = "auto") -> None:
    """One AdamW step, updating params, exp_avgs and exp_avg_sqs in place."""
    check_impl(impl)
    adamw_reference(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=lr, beta1=beta1,
                    beta2=beta2, eps=eps, weight_decay=weight_decay)


adamw_ = adamw
