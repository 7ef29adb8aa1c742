"""A stand-in `torch_npu` (and `torchair`) for machines without an Ascend device.

Each function computes the documented semantics of the torch_npu op with plain torch math on
whatever device its inputs are on, and checks the documented argument contract (layouts,
dtypes, mask meaning and shapes, sparse modes), so the NPU code paths in ops/ can be run and
compared with the references. Sources: the torch_npu API reference (npu_fusion_attention,
npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_apply_adam_w) and the ApplyAdamW op definition.

`make_torch_npu()` returns a fresh module whose `calls` list records which ops ran.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

MAX_TOKENS = 2147483647
COMPRESSED_CAUSAL = 2048  # sparse modes 2-4 take this compressed triangle as atten_mask


# ----------------------------------------------------------------------------- attention


def _to_bnsd(x, layout, heads):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        b, s, hid = x.shape
        return x.view(b, s, heads, hid // heads).transpose(1, 2)
    if layout == "SBH":
        s, b, hid = x.shape
        return x.view(s, b, heads, hid // heads).permute(1, 2, 0, 3)
    raise ValueError(f"input_layout {layout!r} not supported by the stand-in")


def _from_bnsd(x, layout):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    return x.permute(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def _kv_heads(key, layout, head_dim):
    if layout in ("BSND",):
        return key.shape[2]
    if layout == "BNSD":
        return key.shape[1]
    return key.shape[-1] // head_dim  # BSH / SBH


def _band_mask(sq, sk, pre, nxt, device):
    """True = masked: keys more than nxt after or pre before the query's own index."""
    i = torch.arange(sq, device=device).unsqueeze(-1)
    j = torch.arange(sk, device=device)
    return (j > i + nxt) | (j < i - pre)


def _expand_compressed(atten_mask, sparse_mode, sq, sk, device):
    n = COMPRESSED_CAUSAL
    expected = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)
    if atten_mask is None or tuple(atten_mask.shape) != (n, n) or not torch.equal(
            atten_mask.bool(), expected):
        raise ValueError(f"sparse_mode {sparse_mode} needs the compressed {n}x{n} upper "
                         "triangle (True above the diagonal) as atten_mask")
    i = torch.arange(sq, device=device).unsqueeze(-1)
    j = torch.arange(sk, device=device)
    if sparse_mode == 2:  # leftUpCausal
        return j > i
    return j > i + (sk - sq)  # 3: rightDownCausal


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=MAX_TOKENS,
                         next_tockens=MAX_TOKENS, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    """softmax(scale * Q K^T masked where atten_mask is True) V, per the torch_npu reference.

    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels).
    """
    _record("npu_fusion_attention", input_layout=input_layout, head_num=head_num,
            sparse_mode=sparse_mode, scale=scale,
            atten_mask_shape=None if atten_mask is None else tuple(atten_mask.shape))
    if keep_prob != 1.0 or pse is not None or padding_mask is not None or prefix is not None:
        raise NotImplementedError("stand-in: dropout, pse, padding_mask and prefix unsupported")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query dtype {query.dtype} unsupported")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError("query, key and value must share a dtype")
    q = _to_bnsd(query, input_layout, head_num)
    if q.shape[1] != head_num:
        raise ValueError(f"head_num={head_num} but the query has {q.shape[1]} heads")
    d = q.shape[-1]
    n2 = _kv_heads(key, input_layout, d)
    if head_num % n2:
        raise ValueError(f"kv heads {n2} must divide head_num {head_num}")
    k = _to_bnsd(key, input_layout, n2).repeat_interleave(head_num // n2, dim=1)
    v = _to_bnsd(value, input_layout, n2).repeat_interleave(head_num // n2, dim=1)
    b, _, sq, _ = q.shape
    sk = k.shape[2]

    if sparse_mode in (2, 3):
        masked = _expand_compressed(atten_mask, sparse_mode, sq, sk, q.device)
    elif sparse_mode in (0, 1):
        masked = _band_mask(sq, sk, pre_tockens, next_tockens, q.device) if sparse_mode == 0 \
            else torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
        if atten_mask is not None:
            if atten_mask.dtype not in (torch.bool, torch.uint8):
                raise TypeError("atten_mask must be bool or uint8 (1 = masked)")
            if atten_mask.dim() not in (2, 4) or tuple(atten_mask.shape[-2:]) != (sq, sk):
                raise ValueError(f"atten_mask shape {tuple(atten_mask.shape)} is not SS, 11SS, "
                                 f"B1SS or BNSS for Sq={sq}, Sk={sk}")
            if atten_mask.dim() == 4 and (atten_mask.shape[0] not in (1, b)
                                          or atten_mask.shape[1] not in (1, head_num)):
                raise ValueError(f"atten_mask shape {tuple(atten_mask.shape)} is not 11SS, "
                                 "B1SS or BNSS")
            masked = masked | atten_mask.bool()
    else:
        raise NotImplementedError(f"stand-in: sparse_mode {sparse_mode}")

    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    # A large finite fill as in the reference implementation: a row with every key masked
    # averages all values instead of producing NaN.
    scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
    smax = scores.amax(-1, keepdim=True)
    ssum = (scores - smax).exp().sum(-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float()).to(query.dtype)
    return (_from_bnsd(out, input_layout), smax.expand(-1, -1, -1, 8), ssum.expand(-1, -1, -1, 8),
            torch.empty(0), 0, 0, 0)


# ----------------------------------------------------------------------------- elementwise


def npu_rms_norm(self, gamma, epsilon=1e-6):
    """(y, rstd): y = x * rstd * gamma, rstd = 1/sqrt(mean(x^2) + eps), fp32 inside."""
    _record("npu_rms_norm", dtype=self.dtype)
    if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"npu_rms_norm: dtype {self.dtype} unsupported")
    if gamma.dtype != self.dtype:
        raise TypeError("npu_rms_norm: gamma must have the input's dtype")
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
    """r1 * x + r2 * rotate(x); 4-D x and tables (1S1D/BS1D/BSND against BSND x)."""
    _record("npu_rotary_mul", rotary_mode=rotary_mode, r_shape=tuple(r1.shape))
    if input.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
        raise ValueError("npu_rotary_mul takes 4-D input, r1 and r2")
    if not (input.dtype == r1.dtype == r2.dtype):
        raise TypeError("npu_rotary_mul: input, r1 and r2 must share a dtype")
    for a, r in zip(input.shape, r1.shape):
        if r not in (1, a):
            raise ValueError(f"tables {tuple(r1.shape)} do not broadcast to {tuple(input.shape)}")
    if r1.shape[-1] != input.shape[-1]:
        raise ValueError("tables must cover the whole head dim")
    if rotary_mode == "half":
        x1, x2 = input.float().chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    elif rotary_mode == "interleave":
        x = input.float()
        rot = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    else:
        raise ValueError(f"rotary_mode {rotary_mode!r}")
    return (r1.float() * input.float() + r2.float() * rot).to(input.dtype)


def npu_swiglu(input, dim=-1):
    """swish(A) * B where A, B are the two halves of input along dim."""
    _record("npu_swiglu", dim=dim)
    if not input.is_contiguous():
        raise ValueError("npu_swiglu does not take non-contiguous tensors")
    if input.shape[dim] % 2:
        raise ValueError("npu_swiglu: the split dim must be even")
    a, b = input.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(input.dtype)


# ----------------------------------------------------------------------------- optimizer


@torch.no_grad()
def npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
                     max_grad_norm=None, amsgrad=False, maximize=False, *, out):
    """ApplyAdamW: beta*_power are beta**(step-1); updates out=(var, m, v) in place."""
    _record("npu_apply_adam_w")
    var, m, v = out
    if not (var.shape == m.shape == v.shape == grad.shape):
        raise ValueError("var, m, v and grad must share a shape")
    g = -grad if maximize else grad
    gf = g.float()
    m_out = m.float() * beta1 - (beta1 - 1) * gf
    v_out = v.float() * beta2 - (beta2 - 1) * gf * gf
    var_t = var.float() * (1 - lr * weight_decay)
    b1p, b2p = beta1_power * beta1, beta2_power * beta2
    src = torch.maximum(max_grad_norm.float(), v_out) if amsgrad else v_out
    denom = torch.sqrt(src / (1 - b2p)) + epsilon
    var.copy_(var_t - lr * m_out / (1 - b1p) / denom)
    m.copy_(m_out)
    v.copy_(v_out)
    return var, m, v


# ----------------------------------------------------------------------------- modules

_CALLS: list = []


def _record(name, **info):
    _CALLS.append((name, info))


def make_torch_npu() -> types.ModuleType:
    mod = types.ModuleType("torch_npu")
    _CALLS.clear()
    mod.calls = _CALLS
    for fn in (npu_fusion_attention, npu_rms_norm, npu_rotary_mul, npu_swiglu, npu_apply_adam_w):
        setattr(mod, fn.__name__, fn)
    return mod


def make_torchair() -> types.ModuleType:
    """torchair with get_npu_backend returning an eager-running backend that records use."""
    mod = types.ModuleType("torchair")

    class CompilerConfig:
        pass

    def get_npu_backend(*, compiler_config=None, custom_decompositions=None):
        def npu_backend(gm, example_inputs):
            _record("torchair_backend", n_nodes=len(gm.graph.nodes),
                    mode=getattr(compiler_config, "mode", None))
            return gm.forward
        return npu_backend

    mod.CompilerConfig = CompilerConfig
    mod.get_npu_backend = get_npu_backend
    return mod
