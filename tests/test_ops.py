"""ops/: every fast path equals its reference, forward and backward, in fp32 and bf16.

Tolerances: fp32 1e-5 (same math, different kernel order); bf16 outputs 2e-2 absolute and
relative (a couple of bf16 ulps, 2**-7 at magnitude 1), bf16 gradients 5e-2 (two roundings
more on the way back).
"""
import importlib
import math

import pytest
import torch

import ops
from ops import _dispatch as dispatch
from ops._dispatch import MIN_FUSED_NUMEL, resolve_elementwise
from ops.cross_entropy import CHUNK_LOGITS, MIN_COMPILED_LOGITS, default_chunk_size

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}
DTYPES = [torch.float32, torch.bfloat16]
attention_module = importlib.import_module("ops.attention")  # ops.attention is the function


def _close(a, b, tol):
    torch.testing.assert_close(a.float(), b.float(), **tol)


def _run(fn, inputs, grad_out):
    """Forward value and the gradients of <out, grad_out> w.r.t. the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def _compare(op, inputs, dtype, impl, **kw):
    ref_out = op(*inputs, impl="reference", **kw)
    grad_out = torch.randn_like(ref_out)
    ref, ref_g = _run(lambda *a: op(*a, impl="reference", **kw), inputs, grad_out)
    out, g = _run(lambda *a: op(*a, impl=impl, **kw), inputs, grad_out)
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    _close(out, ref, TOL[dtype])
    for a, b in zip(g, ref_g):
        _close(a, b, GRAD_TOL[dtype])


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_matches_reference(dtype):
    x = torch.randn(3, 7, 200, dtype=dtype)  # odd row count, width not a power of two
    w = (1 + 0.1 * torch.randn(200)).to(dtype)
    _compare(ops.rms_norm, (x, w), dtype, "fused", eps=1e-5)


def test_rms_norm_reference_is_aquila_variant():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.float32)
    xf = x.float()
    want = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(torch.bfloat16)
    got = ops.rms_norm(x, w, 1e-6, impl="reference")
    assert got.dtype == torch.bfloat16
    _close(got, want, dict(atol=0, rtol=0))


# ----------------------------------------------------------------------------- rotary


def test_rope_table_values_and_cache():
    cos, sin = ops.rope_table(16, 8, 10000.0, torch.float32, "cpu")
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    ang = torch.arange(16).float()[:, None] * inv[None, :]
    torch.testing.assert_close(cos, torch.cat([ang.cos(), ang.cos()], -1))
    torch.testing.assert_close(sin, torch.cat([ang.sin(), ang.sin()], -1))
    assert ops.rope_table(16, 8, 10000.0, torch.float32, "cpu")[0] is cos  # cached
    assert ops.rope_table(16, 8, 500.0, torch.float32, "cpu")[0] is not cos
    assert ops.rope_table(16, 8, 10000.0, torch.bfloat16, "cpu")[0].dtype == torch.bfloat16


def test_rotary_scores_depend_on_relative_position_only():
    cos, sin = ops.rope_table(32, 16, 10000.0, torch.float32, "cpu")
    q, k = torch.randn(16), torch.randn(16)

    def score(i, j):
        qi = ops.rotary(q.view(1, 1, 1, 16).expand(1, 32, 1, 16), cos, sin)[0, i, 0]
        kj = ops.rotary(k.view(1, 1, 1, 16).expand(1, 32, 1, 16), cos, sin)[0, j, 0]
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_rotary_fused_matches_reference(dtype, per_batch):
    b, s, h, hd = 2, 13, 3, 32
    cos, sin = ops.rope_table(64, hd, 10000.0, torch.float32, "cpu")
    if per_batch:  # positions [B, S], e.g. left-padded batches
        pos = torch.stack([torch.arange(s), torch.arange(s) + 7])
        cos, sin = cos[pos], sin[pos]
    else:
        cos, sin = cos[:s], sin[:s]
    x = torch.randn(b, s, h, hd, dtype=dtype)
    _compare(lambda x, impl: ops.rotary(x, cos, sin, impl=impl), (x,), dtype, "fused")


# ----------------------------------------------------------------------------- swiglu


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_fused_matches_reference(dtype):
    gate, up = torch.randn(3, 5, 88, dtype=dtype), torch.randn(3, 5, 88, dtype=dtype)
    _compare(ops.swiglu, (gate, up), dtype, "fused")


def test_swiglu_packed_splits_in_halves():
    gu = torch.randn(4, 2 * 24)
    torch.testing.assert_close(ops.swiglu_packed(gu), torch.nn.functional.silu(gu[:, :24]) * gu[:, 24:])


# ----------------------------------------------------------------------------- attention

ATTN_CASES = [  # (Sq, Sk, H, KV): prefill with GQA ratios 1, 2, 8; decode; chunked prefill
    (37, 37, 8, 8), (37, 37, 8, 4), (37, 37, 8, 1), (1, 37, 8, 2), (5, 37, 4, 2)]


def _qkv(sq, sk, h, kv, dtype, b=2, hd=16):
    return (torch.randn(b, sq, h, hd, dtype=dtype), torch.randn(b, sk, kv, hd, dtype=dtype),
            torch.randn(b, sk, kv, hd, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,h,kv", ATTN_CASES)
def test_attention_fused_matches_reference(dtype, sq, sk, h, kv):
    _compare(ops.attention, _qkv(sq, sk, h, kv, dtype), dtype, "fused")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_padding_mask_and_scale(dtype):
    q, k, v = _qkv(11, 11, 4, 2, dtype)
    keep = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    keep[0, ..., :4] = False  # left padding: the first queries of row 0 see no key at all
    _compare(ops.attention, (q, k, v), dtype, "fused", mask=keep, scale=0.3)
    out = ops.attention(q, k, v, mask=keep, impl="fused")
    assert torch.all(out[0, :4] == 0)  # rows with no visible key are zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_decode_with_cache_mask(dtype):
    q, k, v = _qkv(1, 23, 8, 2, dtype)
    keep = torch.ones(2, 1, 1, 23, dtype=torch.bool)
    keep[0, ..., 17:] = False  # unwritten cache slots
    keep[1, ..., :5] = False   # left padding
    _compare(ops.attention, (q, k, v), dtype, "fused", mask=keep, causal=False)
    per_head = torch.rand(2, 8, 1, 23) > 0.3  # a mask with a head dim
    _compare(ops.attention, (q, k, v), dtype, "fused", mask=per_head, causal=False)


def test_attention_reference_is_softmax_attention():
    q, k, v = _qkv(3, 5, 2, 1, torch.float32, b=1, hd=4)
    out = ops.attention(q, k, v, causal=True, impl="reference")
    # query i sits at key position 2 + i (bottom-right causal)
    for i in range(3):
        s = (q[0, i, 0] @ k[0, : 3 + i, 0].T) / 2.0
        torch.testing.assert_close(out[0, i, 0], torch.softmax(s, -1) @ v[0, : 3 + i, 0])


def test_attention_non_causal_and_head_check():
    q, k, v = _qkv(6, 9, 4, 2, torch.float32)
    _close(ops.attention(q, k, v, causal=False, impl="fused"),
           ops.attention(q, k, v, causal=False, impl="reference"), TOL[torch.float32])
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v, impl="reference")


CHUNKED_CASES = [  # (Sq, Sk, H, KV): rows not a multiple of the 128-row block, GQA 1, 2, 8;
    (300, 300, 8, 8), (300, 300, 8, 4), (300, 300, 8, 1), (256, 256, 4, 2),  # exact blocks
    (129, 200, 4, 2)]  # fewer queries than keys: a prefill continuing a cache


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,h,kv", CHUNKED_CASES)
def test_attention_chunked_matches_reference(dtype, sq, sk, h, kv, keep_probs):
    inputs = _qkv(sq, sk, h, kv, dtype)
    grad_out = torch.randn(2, sq, h, 16, dtype=dtype)
    ref, ref_g = _run(lambda *a: ops.attention(*a, impl="reference"), inputs, grad_out)
    out, g = _run(lambda *a: attention_module.attention_chunked(*a, keep_probs=keep_probs), inputs, grad_out)
    assert out.dtype == dtype and out.shape == ref.shape
    _close(out, ref, TOL[dtype])
    for a, b in zip(g, ref_g):
        assert a.dtype == dtype and a.shape == b.shape
        _close(a, b, GRAD_TOL[dtype])


@pytest.mark.parametrize("keep_probs", [True, False], ids=["kept", "recomputed"])
def test_attention_chunked_keeps_float64(keep_probs):
    inputs = _qkv(150, 150, 4, 2, torch.float64)
    grad_out = torch.randn(2, 150, 4, 16, dtype=torch.float64)
    ref, ref_g = _run(lambda *a: ops.attention(*a, impl="reference", scale=0.2), inputs, grad_out)
    out, g = _run(lambda *a: attention_module.attention_chunked(*a, scale=0.2, keep_probs=keep_probs),
                  inputs, grad_out)
    for a, b in zip((out, *g), (ref, *ref_g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_attention_chunked_reads_strided_inputs_and_leaves_them_alone():
    """The model's k and v are views of one fused qkv projection; the kernel reads them in
    place and must not write to them (it pre-scales its own copy of q)."""
    qkv = torch.randn(2, 300, 3 * 4 * 16)
    q, k, v = (t.view(2, 300, 4, 16) for t in qkv.split(64, dim=-1))
    before = qkv.clone()
    grad_out = torch.randn(2, 300, 4, 16)
    ref, ref_g = _run(lambda *a: ops.attention(*a, impl="reference"), (q, k, v), grad_out)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = attention_module.attention_chunked(*leaves, keep_probs=True)
    g = torch.autograd.grad(out, leaves, grad_out)
    assert torch.equal(qkv, before)
    _close(out, ref, TOL[torch.float32])
    for a, b in zip(g, ref_g):
        _close(a, b, GRAD_TOL[torch.float32])


def _saved_bytes(fn, *inputs):
    """Bytes autograd saves for backward while fn runs (what activation checkpointing frees)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*inputs)
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in saved}.values())


def test_attention_chunked_saves_probabilities_through_autograd():
    """Kept probabilities are saved tensors, so torch.utils.checkpoint frees and recomputes
    them; their size is what saved_probs_bytes() reports, and the dispatch budgets."""
    q, k, v = (t.requires_grad_() for t in _qkv(300, 300, 8, 2, torch.float32))
    kept = _saved_bytes(lambda *a: attention_module.attention_chunked(*a, keep_probs=True), q, k, v)
    recomputed = _saved_bytes(lambda *a: attention_module.attention_chunked(*a, keep_probs=False), q, k, v)
    assert kept - recomputed == attention_module.saved_probs_bytes(2, 8, 300, 300)
    assert attention_module.saved_probs_bytes(1, 32, 1024, 1024) == 4 * 32 * 128 * 128 * 36  # 72 MiB
    core = lambda *a: attention_module.attention_chunked(*a, keep_probs=True)  # noqa: E731
    checkpointed = lambda *a: torch.utils.checkpoint.checkpoint(core, *a, use_reentrant=False)  # noqa: E731
    assert _saved_bytes(checkpointed, q, k, v) < recomputed
    grad_out = torch.randn_like(q)
    torch.testing.assert_close(torch.autograd.grad(checkpointed(q, k, v), (q, k, v), grad_out),
                               torch.autograd.grad(core(q, k, v), (q, k, v), grad_out))


def test_attention_chunked_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match=r"at most as many queries as keys.*q \(2, 9, 4, 16\)"):
        attention_module.attention_chunked(*_qkv(9, 8, 4, 2, torch.float32))


def _record_kernels(monkeypatch):
    """Patch the two prefill kernels to log (kernel, dtype, keep_probs) per call."""
    calls = []
    sdpa, chunked = attention_module.attention_sdpa, attention_module.attention_chunked
    monkeypatch.setattr(attention_module, "attention_sdpa",
                        lambda *a, **kw: calls.append(("sdpa", a[0].dtype)) or sdpa(*a, **kw))
    monkeypatch.setattr(attention_module, "attention_chunked",
                        lambda *a, **kw: calls.append(("chunked", a[0].dtype, kw["keep_probs"])) or chunked(*a, **kw))
    return calls


def _train_step(q, k, v, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.grad(ops.attention(*leaves, impl="fused", **kw).sum(), leaves)


def test_attention_fused_takes_chunked_kernel_for_long_bf16_prefill(monkeypatch):
    monkeypatch.setattr(dispatch, "NATIVE_CPU_MATMUL_DTYPES", dispatch.NATIVE_CPU_MATMUL_DTYPES | {torch.bfloat16})
    calls = _record_kernels(monkeypatch)
    n = attention_module.CHUNKED_MIN_QUERIES
    q, k, v = _qkv(n, n, 4, 2, torch.bfloat16, b=1)
    _close(ops.attention(q, k, v, impl="fused", scale=0.3),
           ops.attention(q, k, v, impl="reference", scale=0.3), TOL[torch.bfloat16])
    assert calls == [("chunked", torch.bfloat16, False)]  # inference: nothing to keep
    _train_step(q, k, v)
    assert calls[-1] == ("chunked", torch.bfloat16, True)
    monkeypatch.setattr(attention_module, "SAVED_PROBS_MAX_BYTES", attention_module.saved_probs_bytes(1, 4, n, n) - 1)
    _train_step(q, k, v)
    assert calls[-1] == ("chunked", torch.bfloat16, False)  # over the budget: recomputed
    calls.clear()
    ops.attention(q[:, :-1], k, v, impl="fused", mask=torch.ones(1, 1, 1, n, dtype=torch.bool))
    ops.attention(q[:, : n - 1], k[:, : n - 1], v[:, : n - 1], impl="fused")  # too short
    assert calls == [("sdpa", torch.bfloat16)] * 2
    compiled = torch.compile(lambda q, k, v: ops.attention(q, k, v), fullgraph=True)
    _close(compiled(q, k, v), ops.attention(q, k, v, impl="reference"), TOL[torch.bfloat16])
    assert {c[0] for c in calls} == {"sdpa"}  # inside torch.compile: SDPA, which inductor lowers


def test_attention_fused_fp32_keeps_probabilities_in_training_within_budget(monkeypatch):
    """fp32 prefill: SDPA's fused forward is faster alone, the chunked kernel with kept
    probabilities is faster for forward + backward (its backward skips recomputing them)."""
    calls = _record_kernels(monkeypatch)
    n = attention_module.CHUNKED_MIN_QUERIES
    q, k, v = _qkv(n, n, 4, 2, torch.float32, b=1)
    ops.attention(q, k, v, impl="fused")
    _train_step(q, k, v)
    _train_step(q.double(), k.double(), v.double())
    assert calls == [("sdpa", torch.float32), ("chunked", torch.float32, True), ("sdpa", torch.float64)]
    monkeypatch.setattr(attention_module, "SAVED_PROBS_MAX_BYTES", attention_module.saved_probs_bytes(1, 4, n, n) - 1)
    _train_step(q, k, v)
    assert calls[-1] == ("sdpa", torch.float32)


def test_attention_fused_computes_in_fp32_where_bf16_matmuls_are_emulated(monkeypatch):
    """On a CPU without bf16 matmul instructions, bf16 prefill computes on fp32 copies and picks
    its kernel as fp32 would (the chunked kernel's and SDPA's bf16 matmuls would be emulated,
    17x slower than the reference measured on a Zen 3); outputs and gradients come back in bf16."""
    monkeypatch.setattr(dispatch, "NATIVE_CPU_MATMUL_DTYPES", frozenset({torch.float32, torch.float64}))
    calls = _record_kernels(monkeypatch)
    n = attention_module.CHUNKED_MIN_QUERIES
    inputs = _qkv(n, n, 4, 2, torch.bfloat16, b=1)
    grad_out = torch.randn(1, n, 4, 16, dtype=torch.bfloat16)
    ref, ref_g = _run(lambda *a: ops.attention(*a, impl="reference"), inputs, grad_out)
    out, g = _run(lambda *a: ops.attention(*a, impl="fused"), inputs, grad_out)
    assert calls == [("chunked", torch.float32, True)] and out.dtype == torch.bfloat16
    _close(out, ref, TOL[torch.bfloat16])
    for a, b in zip(g, ref_g):
        assert a.dtype == torch.bfloat16
        _close(a, b, GRAD_TOL[torch.bfloat16])
    ops.attention(*inputs, impl="fused")  # inference: SDPA, on fp32 copies
    assert calls[-1] == ("sdpa", torch.float32)


def test_attention_on_dtensors_runs_the_kernel_on_local_blocks(tmp_path, monkeypatch):
    """Under data/tensor parallelism q, k, v are DTensors split over batch and heads: each rank
    attends over its local blocks with the fast kernel (the result a DTensor with the same
    placements, gradients flowing back); other placements run the reference math on DTensors."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication

    if dist.is_initialized():
        pytest.skip("a process group is already active")
    kernels = []
    sdpa = attention_module.attention_sdpa
    monkeypatch.setattr(attention_module, "attention_sdpa",
                        lambda *a, **kw: kernels.append(type(a[0]).__name__) or sdpa(*a, **kw))
    inputs = _qkv(37, 37, 8, 2, torch.float32)
    grad_out = torch.randn(2, 37, 8, 16)
    ref, ref_g = _run(lambda *a: ops.attention(*a, impl="reference"), inputs, grad_out)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        with implicit_replication():  # masks count as replicated, as in Layout.activate
            for placements, local in (([Shard(0), Shard(2)], True), ([Replicate(), Replicate()], True),
                                      ([Replicate(), Shard(1)], False)):  # a split sequence: not local
                kernels.clear()
                leaves = [distribute_tensor(t, mesh, placements).requires_grad_() for t in inputs]
                out = ops.attention(*leaves)
                assert isinstance(out, DTensor) and out.placements == tuple(placements)
                grads = torch.autograd.grad(out, leaves, distribute_tensor(grad_out, mesh, placements))
                assert kernels == (["Tensor"] if local else []), placements
                _close(out.full_tensor(), ref, TOL[torch.float32])
                for a, b in zip(grads, ref_g):
                    _close(a.full_tensor(), b, GRAD_TOL[torch.float32])
    finally:
        dist.destroy_process_group()


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 2-D (dp, tp) mesh over one gloo process: DTensor placements without peers."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import implicit_replication

    if dist.is_initialized():
        pytest.skip("a process group is already active")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with implicit_replication():  # plain tables count as replicated, as in Layout.activate
            yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    finally:
        dist.destroy_process_group()


def _record_kernel(monkeypatch, module, name, calls):
    kernel = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(type(a[0]).__name__) or kernel(*a, **kw))


def test_elementwise_ops_on_dtensors_run_the_kernel_on_local_blocks(one_rank_mesh, monkeypatch):
    """rms_norm, rotary and swiglu on DTensors split where they act independently (rows; heads
    for rotary) run the fused kernel on each rank's block and return a DTensor placed like
    their input; a replicated weight gets a partial gradient over the mesh dims that split
    the rows (each rank's share); other splits keep the reference math on DTensors."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh, calls = one_rank_mesh, []
    for module, name in (("ops.norm", "rms_norm_fused"), ("ops.rotary", "rotary_fused"), ("ops.swiglu", "swiglu_fused")):
        _record_kernel(monkeypatch, importlib.import_module(module), name, calls)
    x, w = torch.randn(2, 5, 16), 1 + 0.1 * torch.randn(16)
    q = torch.randn(2, 5, 4, 16)
    cos, sin = ops.rope_table(8, 16, 10000.0, torch.float32, "cpu")
    cos, sin = cos[:5], sin[:5]
    gate, up = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    cases = [  # (op, inputs, placements of the first input, local?)
        (lambda a, b, impl: ops.rms_norm(a, b, 1e-5, impl=impl), (x, w), [Shard(0), Shard(1)], True),
        (lambda a, b, impl: ops.rms_norm(a, b, 1e-5, impl=impl), (x, w), [Replicate(), Shard(2)], False),
        (lambda a, impl: ops.rotary(a, cos, sin, impl=impl), (q,), [Shard(0), Shard(2)], True),
        (lambda a, impl: ops.rotary(a, cos, sin, impl=impl), (q,), [Replicate(), Shard(1)], False),
        (lambda a, b, impl: ops.swiglu(a, b, impl=impl), (gate, up), [Shard(0), Shard(2)], True),
    ]
    for op, inputs, placements, local in cases:
        ref_out, ref_g = _run(lambda *a: op(*a, impl="reference"), inputs, torch.ones_like(inputs[0]))
        placed = [distribute_tensor(t, mesh, placements if t.dim() == inputs[0].dim() else [Replicate()] * 2)
                  .requires_grad_() for t in inputs]
        calls.clear()
        out = op(*placed, impl="fused")
        assert isinstance(out, DTensor) and out.placements == tuple(placements)
        assert calls == (["Tensor"] if local else []), (placements, calls)
        out.backward(distribute_tensor(torch.ones_like(inputs[0]), mesh, placements))
        _close(out.full_tensor(), ref_out, TOL[torch.float32])
        for leaf, want in zip(placed, ref_g):
            _close(leaf.grad.full_tensor(), want, GRAD_TOL[torch.float32])
        if local and len(inputs) == 2 and inputs[1].dim() == 1:  # the replicated norm weight
            assert [p.is_partial() for p in placed[1].grad.placements] == [p.is_shard() for p in placements]


# ----------------------------------------------------------------------------- cross_entropy


def _ce_inputs(n, v, d, dtype):
    hidden, weight = torch.randn(n, d, dtype=dtype), torch.randn(v, d, dtype=dtype) / math.sqrt(d)
    labels = torch.randint(0, v, (n,))
    labels[::5] = -100
    labels[8:16] = -100  # one whole chunk of 8 ignored
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", [8, 7, None])
def test_cross_entropy_fused_matches_reference(dtype, chunk):
    hidden, weight, labels = _ce_inputs(37, 53, 24, dtype)
    ref = ops.cross_entropy(hidden, weight, labels, impl="reference")
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_r, n_r = ops.cross_entropy(h1, w1, labels, impl="reference")
    loss_f, n_f = ops.cross_entropy(h2, w2, labels, chunk_size=chunk, impl="fused")
    assert loss_f.dtype == torch.float32 and n_f.dtype == torch.int64 and n_f.item() == n_r.item()
    _close(loss_f, ref[0], dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else TOL[dtype])
    g_r = torch.autograd.grad(loss_r * 0.37, (h1, w1))
    g_f = torch.autograd.grad(loss_f * 0.37, (h2, w2))
    for a, b in zip(g_f, g_r):
        assert a.dtype == dtype
        _close(a, b, GRAD_TOL[dtype])


def test_cross_entropy_all_ignored_and_no_grad():
    hidden, weight, _ = _ce_inputs(10, 11, 8, torch.float32)
    labels = torch.full((10,), -100)
    h = hidden.clone().requires_grad_()
    loss, n = ops.cross_entropy(h, weight, labels)
    (g,) = torch.autograd.grad(loss, h)
    assert loss.item() == 0 and n.item() == 0 and torch.all(g == 0)
    labels = torch.randint(0, 11, (10,))
    with torch.no_grad():  # evaluation path: no gradient work
        torch.testing.assert_close(ops.cross_entropy(hidden, weight, labels)[0],
                                   ops.cross_entropy(hidden, weight, labels, impl="reference")[0])


def test_cross_entropy_default_chunk_bounds_logits():
    assert default_chunk_size(100_008) * 100_008 <= CHUNK_LOGITS
    assert default_chunk_size(10) >= 16


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_compiled_chunks_match_reference(dtype, monkeypatch):
    """Chunks of >= MIN_COMPILED_LOGITS logits take the compiled softmax kernels, which
    overwrite the logits with their gradient in place: the loss must still be read from the
    logits as they were (torch 2.11's inductor ordered an indirect read after that write)."""
    vocab, chunk = 4096, MIN_COMPILED_LOGITS // 4096
    # 2 * chunk + 37 rows, of which ~80% count: one full compiled chunk, one eager remainder
    hidden, weight, labels = _ce_inputs(2 * chunk + 37, vocab, 32, dtype)
    ce = importlib.import_module("ops.cross_entropy")
    calls, kernel = [], ce._softmax_grad_compiled_
    monkeypatch.setattr(ce, "_softmax_grad_compiled_", lambda *a: calls.append(a[0].shape) or kernel(*a))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_r, _ = ops.cross_entropy(h1, w1, labels, impl="reference")
    loss_f, _ = ops.cross_entropy(h2, w2, labels, chunk_size=chunk, impl="fused")
    assert calls == [(chunk, vocab)]  # the first chunk went through the compiled kernel
    _close(loss_f, loss_r, dict(atol=1e-3, rtol=1e-5) if dtype == torch.float32 else TOL[dtype])
    for a, b in zip(torch.autograd.grad(loss_f, (h2, w2)), torch.autograd.grad(loss_r, (h1, w1))):
        _close(a, b, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_fused_under_torch_compile_matches_reference(dtype):
    """The fused loss is a custom autograd.Function traced by dynamo when the loss is compiled
    (pretrain.py --compile). torch 2.11 gave a zero gradient to a Function output that its
    forward had mutated in place, on every backend; the Function must not rely on that."""
    hidden, weight, labels = _ce_inputs(37, 53, 24, dtype)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_r, _ = ops.cross_entropy(h1, w1, labels, impl="reference")
    torch._dynamo.reset()  # backend "eager" is enough: dynamo's tracing of the Function was at fault
    fused = torch.compile(lambda h, w, y: ops.cross_entropy(h, w, y, chunk_size=7, impl="fused"),
                          backend="eager", fullgraph=True)
    loss_f, n_f = fused(h2, w2, labels)
    assert n_f.item() == int((labels != -100).sum())
    _close(loss_f, loss_r, dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else TOL[dtype])
    g_r = torch.autograd.grad(loss_r * 0.37, (h1, w1))
    g_f = torch.autograd.grad(loss_f * 0.37, (h2, w2))
    for a, b in zip(g_f, g_r):
        assert a.abs().sum() > 0
        _close(a, b, GRAD_TOL[dtype])


def test_cross_entropy_on_dtensors_runs_the_fused_kernel_per_rank(one_rank_mesh, monkeypatch):
    """Rows split over a mesh dim (data parallel) and the weight's vocabulary split over another
    (tensor parallel) run the fused loss on local blocks: a partial sum over the row split,
    the whole loss over the vocabulary split. Other placements take the reference math."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    ce = importlib.import_module("ops.cross_entropy")
    calls = []
    _record_kernel(monkeypatch, ce, "cross_entropy_fused", calls)
    hidden, weight, labels = _ce_inputs(12, 10, 8, torch.float32)
    ref, n_ref = ops.cross_entropy(hidden, weight, labels, impl="reference")
    for h_pl, w_pl, local in (([Shard(0), Replicate()], [Replicate(), Shard(0)], True),
                              ([Shard(1), Replicate()], [Replicate(), Replicate()], False)):
        calls.clear()
        h = distribute_tensor(hidden, one_rank_mesh, h_pl)
        w = distribute_tensor(weight, one_rank_mesh, w_pl)
        lab = distribute_tensor(labels, one_rank_mesh, [p if p.is_replicate() else Shard(0) for p in h_pl])
        loss, n = ops.cross_entropy(h, w, lab)
        assert isinstance(loss, DTensor) and calls == (["Tensor"] if local else [])
        if local:
            assert [p.is_partial() for p in loss.placements] == [True, False]
        _close(loss.full_tensor(), ref, dict(atol=1e-4, rtol=1e-5))
        assert n.full_tensor().item() == n_ref.item()


class _ThreadRanks:
    """`torch.distributed.all_reduce` among threads, one per simulated rank of a group."""

    def __init__(self, n: int):
        import threading

        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n
        self.local = threading.local()

    def all_reduce(self, t, op=None, group=None):
        import torch.distributed as dist

        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        result = stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0)
        self.barrier.wait()  # every rank has read the slots before they are written again
        t.copy_(result)

    def run(self, fn):
        """[fn(rank) for each rank], run concurrently."""
        import threading

        out = [None] * self.n

        def one(rank):
            self.local.rank = rank
            out[rank] = fn(rank)

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


@pytest.mark.parametrize("chunk", [5, None])
def test_vocab_parallel_cross_entropy_matches_reference(monkeypatch, chunk):
    """The weight's vocabulary split over two ranks (unevenly: 37 = 19 + 18, as DTensor splits):
    every rank gets the whole loss, the hidden state's gradients add up over the ranks and each
    weight block's gradient is its rows of the reference's, in training and in evaluation."""
    import torch.distributed as dist

    ce = importlib.import_module("ops.cross_entropy")
    ranks = _ThreadRanks(2)
    monkeypatch.setattr(dist, "all_reduce", ranks.all_reduce)
    hidden, weight, labels = _ce_inputs(23, 37, 16, torch.float32)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref, n_ref = ops.cross_entropy(h_ref, w_ref, labels, impl="reference")
    dh_ref, dw_ref = torch.autograd.grad(ref * 0.5, (h_ref, w_ref))
    blocks = weight.chunk(2)

    def rank_fn(rank):
        h, w = hidden.clone().requires_grad_(), blocks[rank].clone().requires_grad_()
        vocab = ce.VocabShard(None, rank * blocks[0].shape[0], blocks[0].shape[0])
        loss, n = ce.cross_entropy_fused(h, w, labels, chunk_size=chunk, vocab=vocab)
        with torch.no_grad():
            evaluated, _ = ce.cross_entropy_fused(hidden, blocks[rank], labels, chunk_size=chunk, vocab=vocab)
        return (loss.detach(), n, evaluated, *torch.autograd.grad(loss * 0.5, (h, w)))

    results = ranks.run(rank_fn)
    for loss, n, evaluated, _, _ in results:
        _close(loss, ref, dict(atol=1e-4, rtol=1e-5))
        _close(evaluated, ref, dict(atol=1e-4, rtol=1e-5))
        assert n.item() == n_ref.item()
    _close(sum(r[3] for r in results), dh_ref, GRAD_TOL[torch.float32])
    _close(torch.cat([r[4] for r in results]), dw_ref, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_parallel_compiled_kernels_match_eager(dtype):
    """Chunks of >= MIN_COMPILED_LOGITS logits run the vocabulary-parallel softmax pieces compiled."""
    ce = importlib.import_module("ops.cross_entropy")
    z = torch.randn(64, 300, dtype=dtype)
    local = torch.randint(-50, 350, (64,))
    valid = torch.rand(64) > 0.2
    mine = valid & (local >= 0) & (local < 300)
    top = z.float().amax(1, keepdim=True) + 0.5
    _close(ce._vocab_sums_compiled(z, top, local, mine), ce._vocab_sums(z, top, local, mine), TOL[dtype])
    lse = top + 2.0
    a, b = z.clone(), z.clone()
    ce._vocab_grad_compiled_(a, lse, local, mine, valid)
    ce._vocab_grad_(b, lse, local, mine, valid)
    _close(a, b, TOL[dtype])


# ----------------------------------------------------------------------------- adamw


def _adam_state(shapes, dtype=torch.float32):
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_adamw_matches_torch_optim(impl):
    shapes = [(7, 5), (13,), (3, 4, 2)]
    params, grads = _adam_state(shapes)
    wds = [0.1, 0.0, 0.1]
    mine = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW([{"params": [theirs[0], theirs[2]], "weight_decay": 0.1},
                             {"params": [theirs[1]], "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step, gs in enumerate(grads, start=1):
        ops.adamw(mine, gs, m, v, step=step, lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                  weight_decay=wds, impl=impl)
        for t, g in zip(theirs, gs):
            t.grad = g.clone()
        opt.step()
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=1e-6)


def test_adamw_mixed_dtypes_and_foreach():
    from ops.adamw import adamw_foreach
    params, grads = _adam_state([(6, 3), (5,)])
    ref = [p.clone() for p in params]
    fe = [p.clone() for p in params]
    m1, v1 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    m2, v2 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ops.adamw(ref, grads[0], m1, v1, step=1, lr=1e-2, weight_decay=0.1, impl="reference")
    adamw_foreach(fe, grads[0], m2, v2, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1)
    for a, b in zip(fe, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # bf16 params with fp32 grads and fp32 moments: the grouped fused path still works
    p16 = [p.to(torch.bfloat16) for p in params]
    m, v = [torch.zeros_like(p, dtype=torch.float32) for p in params], [torch.zeros_like(p) for p in params]
    ops.adamw(p16, grads[0], m, v, step=1, lr=1e-2, weight_decay=0.1, impl="fused")
    for a, b in zip(p16, ref):
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2)


def test_adamw_argument_checks():
    p = [torch.zeros(2)]
    with pytest.raises(ValueError, match="equal lengths"):
        ops.adamw(p, [], p, p, step=1, lr=1.0)
    with pytest.raises(ValueError, match="weight decays"):
        ops.adamw(p, p, [torch.zeros(2)], [torch.zeros(2)], step=1, lr=1.0, weight_decay=[0.1, 0.2])


# ----------------------------------------------------------------------------- dispatch


def test_impl_validation_and_auto_choice():
    small, large = torch.zeros(8), torch.zeros(MIN_FUSED_NUMEL)
    assert resolve_elementwise("auto", small) == "reference"
    assert resolve_elementwise("auto", large) == "fused"
    assert resolve_elementwise("npu", small) == "npu"
    with pytest.raises(ValueError, match="impl"):
        ops.rms_norm(small, small, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        ops.attention(*_qkv(2, 2, 1, 1, torch.float32), impl="flash")


def test_cross_entropy_fused_backward_runs_once():
    hidden, weight, labels = _ce_inputs(12, 9, 8, torch.float32)
    h = hidden.requires_grad_()
    loss, _ = ops.cross_entropy(h, weight, labels, impl="fused")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_float64_stays_float64():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert ops.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6).dtype == torch.float64
    q, k, v = (t.double() for t in _qkv(4, 4, 2, 1, torch.float32))
    want = ops.attention(q, k, v, impl="reference")
    torch.testing.assert_close(ops.attention(q, k, v, impl="fused"), want, atol=1e-12, rtol=1e-12)
    hidden, weight, labels = (t.double() if t.is_floating_point() else t
                              for t in _ce_inputs(9, 7, 4, torch.float32))
    ref, fused = (ops.cross_entropy(hidden, weight, labels, impl=i)[0] for i in ("reference", "fused"))
    assert ref.dtype == fused.dtype == torch.float64
    torch.testing.assert_close(fused, ref, atol=1e-12, rtol=1e-12)
