"""The NPU code paths, run on CPU against a stand-in torch_npu (tests/npu_standin.py) that
computes each op's documented semantics: checks the argument plumbing (layouts, mask
meaning, scale, head counts, sparse modes, adamw powers) against the references.
Tolerances as in test_ops.py."""
import sys

import pytest
import torch

import ops
from aquila_fn.core.compile import compile as af_compile
from npu_standin import make_torch_npu, make_torchair

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture
def fake_npu(monkeypatch):
    mod = make_torch_npu()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return mod


def _calls(mod, name):
    return [info for n, info in mod.calls if n == name]


def _close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), **tol)


def _compare(op, inputs, dtype, **kw):
    """impl="npu" against impl="reference": forward and input gradients."""
    results = []
    grad_out = None
    for impl in ("reference", "npu"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = op(*leaves, impl=impl, **kw)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad_out)))
    (ref, ref_g), (out, g) = results
    assert out.dtype == ref.dtype and out.shape == ref.shape
    _close(out, ref, TOL[dtype])
    for a, b in zip(g, ref_g):
        _close(a, b, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", [None, torch.float32])
def test_rms_norm_npu(fake_npu, dtype, weight_dtype):
    x = torch.randn(2, 5, 48, dtype=dtype)
    w = (1 + 0.1 * torch.randn(48)).to(weight_dtype or dtype)
    _compare(ops.rms_norm, (x, w), dtype, eps=1e-5)
    assert _calls(fake_npu, "npu_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_rotary_npu(fake_npu, dtype, per_batch):
    cos, sin = ops.rope_table(32, 16, 10000.0, torch.float32, "cpu")
    if per_batch:
        pos = torch.stack([torch.arange(9), torch.arange(9) + 3])
        cos, sin = cos[pos], sin[pos]
    else:
        cos, sin = cos[:9], sin[:9]
    x = torch.randn(2, 9, 3, 16, dtype=dtype)
    _compare(lambda x, impl: ops.rotary(x, cos, sin, impl=impl), (x,), dtype)
    (call,) = _calls(fake_npu, "npu_rotary_mul")[:1]
    assert call["rotary_mode"] == "half" and call["r_shape"] == ((2 if per_batch else 1), 9, 1, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_npu(fake_npu, dtype):
    gate, up = torch.randn(2, 3, 40, dtype=dtype), torch.randn(2, 3, 40, dtype=dtype)
    _compare(ops.swiglu, (gate, up), dtype)
    assert _calls(fake_npu, "npu_swiglu")[0]["dim"] == -1
    gu = torch.cat([gate, up], -1)
    _close(ops.swiglu_packed(gu, impl="npu"), ops.swiglu(gate, up, impl="reference"), TOL[dtype])


ATTN_CASES = [  # (Sq, Sk, H, KV, padded)
    (13, 13, 8, 8, False), (13, 13, 8, 4, False), (13, 13, 8, 1, False),  # GQA 1, 2, 8
    (1, 13, 4, 2, False),   # decode: one query against a cache
    (4, 13, 4, 2, False),   # chunked prefill: bottom-right causal
    (13, 13, 4, 2, True),   # padding mask merged with causality
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,h,kv,padded", ATTN_CASES)
def test_attention_npu(fake_npu, dtype, sq, sk, h, kv, padded):
    b, hd = 2, 16
    q = torch.randn(b, sq, h, hd, dtype=dtype)
    k, v = torch.randn(b, sk, kv, hd, dtype=dtype), torch.randn(b, sk, kv, hd, dtype=dtype)
    mask = None
    if padded:  # left padding; every query keeps at least one key (as the model builds it)
        mask = torch.ones(b, 1, sq, sk, dtype=torch.bool)
        mask[0, :, :, :3] = False
        mask[0, :, torch.arange(3), torch.arange(3)] = True
    _compare(ops.attention, (q, k, v), dtype, mask=mask, scale=0.2)
    call = _calls(fake_npu, "npu_fusion_attention")[0]
    assert call["input_layout"] == "BSND" and call["head_num"] == h and call["scale"] == 0.2
    if padded:
        assert call["sparse_mode"] == 0 and call["atten_mask_shape"] == (b, 1, sq, sk)
    elif sq == 1:
        assert call["sparse_mode"] == 0 and call["atten_mask_shape"] is None
    else:
        assert call["sparse_mode"] == 3 and call["atten_mask_shape"] == (2048, 2048)


def test_attention_npu_mask_means_masked(fake_npu):
    """Our mask says True = attend; the NPU's says True = masked: one key kept must win."""
    q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    keep = torch.zeros(1, 1, 1, 5, dtype=torch.bool)
    keep[..., 2] = True
    out = ops.attention(q, k, v, causal=False, mask=keep, impl="npu")
    torch.testing.assert_close(out[0, 0], v[0, 2])


def test_adamw_npu(fake_npu):
    shapes = [(6, 4), (9,)]
    params = [torch.randn(s) for s in shapes]
    mine, ref = [p.clone() for p in params], [p.clone() for p in params]
    state = {k: ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes])
             for k in ("npu", "reference")}
    for step in (1, 2, 3):
        grads = [torch.randn(s) for s in shapes]
        for impl, ps in (("npu", mine), ("reference", ref)):
            ops.adamw(ps, grads, *state[impl], step=step, lr=1e-2, beta1=0.9, beta2=0.95,
                      eps=1e-8, weight_decay=[0.1, 0.0], impl=impl)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert len(_calls(fake_npu, "npu_apply_adam_w")) == 6


@pytest.mark.parametrize("call", [
    lambda: ops.rms_norm(torch.ones(4), torch.ones(4), impl="npu"),
    lambda: ops.rotary(torch.ones(1, 2, 1, 4), torch.ones(2, 4), torch.ones(2, 4), impl="npu"),
    lambda: ops.swiglu(torch.ones(4), torch.ones(4), impl="npu"),
    lambda: ops.attention(torch.ones(1, 2, 1, 16), torch.ones(1, 2, 1, 16),
                          torch.ones(1, 2, 1, 16), impl="npu"),
    lambda: ops.adamw([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], [torch.zeros(2)],
                      step=1, lr=0.1, impl="npu"),
    lambda: af_compile(lambda x: x + 1, backend="npu")(torch.ones(2)),
])
def test_missing_torch_npu_names_the_install_extra(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    with pytest.raises(ImportError, match=r"torch_npu.*pip install 'aquila-fn\[npu\]'"):
        call()


def test_compile_npu_backend_is_torchair(fake_npu, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchair", make_torchair())
    torch._dynamo.reset()
    f = af_compile(lambda x: torch.sin(x) * 2, backend="npu", fullgraph=True)
    torch.testing.assert_close(f(torch.ones(3)), torch.sin(torch.ones(3)) * 2)
    assert _calls(fake_npu, "torchair_backend")
