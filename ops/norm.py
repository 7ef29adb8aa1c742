"""RMSNorm, Aquila/LLaMA variant: normalise in fp32, multiply the weight in fp32, then cast.
(fp64 inputs stay fp64 throughout.)"""
from __future__ import annotations

import torch

from ._dispatch import LazyCompiled, is_dtensor, on_local_blocks, resolve_elementwise, torch_npu


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def _rms_norm_forward(x, weight, eps):
    """(y, rstd [..., 1] in fp32), y computed as in the reference."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype), rstd


def _rms_norm_backward(grad, x, weight, rstd):
    acc = rstd.dtype
    xhat = x.to(acc) * rstd
    gw = grad.to(acc) * weight.to(acc)
    dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    dw = (grad.to(acc) * xhat).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# One inductor kernel per pass instead of five eager ones (~4x forward, ~4x backward on CPU).
_forward_kernel = LazyCompiled(_rms_norm_forward)
_backward_kernel = LazyCompiled(_rms_norm_backward)


class _FusedRMSNorm(torch.autograd.Function):
    """A compiled kernel each way. What backward needs (x, the weight, rstd) is saved here,
    explicitly, so every way of running the op keeps the same tensors: compiled, eager under
    a dispatch mode (which disables compiled code) or on meta tensors (parallel.plan)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _forward_kernel(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        return (*_backward_kernel(grad, *ctx.saved_tensors), None)


def rms_norm_fused(x, weight, eps):
    return _FusedRMSNorm.apply(x, weight, eps)


def rms_norm_npu(x, weight, eps):
    # npu_rms_norm wants gamma in x's dtype and returns (y, rstd). When the weight has
    # another dtype (fp32 weight, bf16 activations) run it in fp32 so the weight is
    # multiplied in fp32 exactly as in the reference.
    if weight.dtype == x.dtype:
        return torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]
    y, _ = torch_npu().npu_rms_norm(x.float(), weight.float(), epsilon=eps)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             impl: str = "auto") -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight; math in fp32, result in x.dtype.

    impl: "reference" (eager torch), "fused" (one compiled kernel), "npu"
    (torch_npu.npu_rms_norm), "auto" (npu on NPU, fused for large tensors, else reference).
    A DTensor x split over any dim but the last runs the kernel on each rank's rows.
    """
    if is_dtensor(x) and impl != "reference":
        out = on_local_blocks(lambda a, w: rms_norm(a, w, eps, impl=impl), x, weight,
                              free_dims=tuple(range(x.dim() - 1)))
        if out is not None:
            return out
    impl = resolve_elementwise(impl, x)
    if impl == "npu":
        return rms_norm_npu(x, weight, eps)
    if impl == "fused":
        return rms_norm_fused(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
