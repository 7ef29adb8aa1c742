"""AdamW update over lists of tensors, in place, with torch.optim.AdamW's exact semantics:

    p  <- p * (1 - lr * wd)
    m  <- beta1 * m + (1 - beta1) * g
    v  <- beta2 * v + (1 - beta2) * g * g
    p  <- p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch

from ._dispatch import check_impl, is_npu, torch_npu


def _per_tensor(value, n):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} per-tensor weight decays, got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * n


def _scalar(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


@torch.no_grad()
def adamw_reference(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, wds):
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    for p, g, m, v, wd in zip(params, grads, exp_avgs, exp_avg_sqs, wds):
        g = g.to(m.dtype)
        p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / bc1)


@torch.no_grad()
def adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, wd):
    """One weight decay for the whole list; every tensor of one dtype and device."""
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(bc2))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / bc1)


@torch.no_grad()
def adamw_fused(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, wd):
    """torch._fused_adamw_: one pass over memory per tensor (CPU, CUDA kernels)."""
    steps = [torch.tensor(float(step), device=params[0].device)] * len(params)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


@torch.no_grad()
def adamw_npu(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, wds):
    """torch_npu.npu_apply_adam_w per tensor; it takes beta**(step - 1) and raises the power
    itself, and updates (var, m, v) given as out= in place."""
    apply = torch_npu().npu_apply_adam_w
    b1p, b2p = beta1 ** (step - 1), beta2 ** (step - 1)
    for p, g, m, v, wd in zip(params, grads, exp_avgs, exp_avg_sqs, wds):
        apply(b1p, b2p, lr, wd, beta1, beta2, eps, g.to(p.dtype), None, False, False,
              out=(p, m, v))


def _groups(params, grads, exp_avgs, exp_avg_sqs, wds):
    """Indices grouped by what one foreach/fused call needs to share: device, dtypes, wd."""
    groups = defaultdict(list)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        groups[(p.device, p.dtype, g.dtype, m.dtype, v.dtype, wds[i])].append(i)
    return groups


def _fused_supported(device: torch.device) -> bool:
    # meta: parallel.plan's dry run plans the kernel a real run takes (no foreach temporaries)
    return device.type in ("cpu", "cuda", "xpu", "mps", "meta")


def adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
          exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *,
          step: int | torch.Tensor, lr: float | torch.Tensor, beta1: float = 0.9,
          beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float | Sequence[float] = 0.0, impl: str = "auto") -> None:
    """One AdamW step; updates params, exp_avgs and exp_avg_sqs in place, returns None.

    params, grads, exp_avgs, exp_avg_sqs: equal-length lists of same-shaped tensors (grads
      may have another dtype; they are cast). step: the step number counting this update
      (1 on the first call), used for bias correction. lr: learning rate for this step.
    weight_decay: decoupled decay, one float for all tensors or a list with one per tensor
      (0.0 for norms and biases), applied as p *= 1 - lr * wd.
    impl: "reference" (per-tensor torch ops), "fused" (torch._fused_adamw_ per group of
      tensors sharing device, dtypes and decay; torch._foreach_* where that kernel is
      missing or dtypes differ), "npu" (torch_npu.npu_apply_adam_w per tensor),
      "auto" (npu on NPU, else fused).
    """
    check_impl(impl)
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("params, grads, exp_avgs and exp_avg_sqs must have equal lengths")
    if n == 0:
        return
    step, lr, wds = _scalar(step), _scalar(lr), _per_tensor(weight_decay, n)
    kw = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    if impl == "auto":
        impl = "npu" if is_npu(params[0]) else "fused"
    if impl == "npu":
        return adamw_npu(params, grads, exp_avgs, exp_avg_sqs, wds=wds, **kw)
    if impl == "reference":
        return adamw_reference(params, grads, exp_avgs, exp_avg_sqs, wds=wds, **kw)
    for (device, p_dt, g_dt, m_dt, v_dt, wd), idx in _groups(
            params, grads, exp_avgs, exp_avg_sqs, wds).items():
        lists = [[t[i] for i in idx] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        if not p_dt == g_dt == m_dt == v_dt:
            adamw_reference(*lists, wds=[wd] * len(idx), **kw)
        elif _fused_supported(device) and p_dt.is_floating_point:
            adamw_fused(*lists, wd=wd, **kw)
        else:
            adamw_foreach(*lists, wd=wd, **kw)


adamw_ = adamw  # the in-place spelling
