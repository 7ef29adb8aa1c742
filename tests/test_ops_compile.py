"""aquila_fn.core.compile: backend choice, fullgraph model forward (no graph break), and the ops'
compiled kernels falling back to eager when a backend fails."""
import warnings

import pytest
import torch

import aquila_fn as af
import ops
from aquila_fn.core import pytree
from aquila_fn.core.compile import compile as af_compile
from ops._dispatch import LazyCompiled


@pytest.fixture(scope="module")
def small():
    config = af.get_config("tiny").replace(n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
                                           ffn_dim=96, vocab_size=96, max_seq_len=32)
    return config, af.init_params(config, 0)


def test_model_forward_has_no_graph_break(small):
    config, params = small
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(af.forward)(params, tokens, config)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # and fullgraph=True compiles it (dynamo capture, eager kernels: the capture is the test)
    logits, _ = af_compile(af.forward, backend="eager", fullgraph=True)(params, tokens, config)
    torch.testing.assert_close(logits, af.forward(params, tokens, config)[0])


def test_compiled_loss_with_fused_cross_entropy_matches_eager(small):
    config, params = small
    params = af.tree_map(lambda t: t.detach().requires_grad_(), params)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    labels = tokens.clone()
    labels[0, :4] = -100
    batch = {"input_ids": tokens, "labels": labels}
    leaves = pytree.leaves(params)
    torch._dynamo.reset()
    loss_c, n_c = af_compile(af.loss_sum_fn, backend="aot_eager", fullgraph=True)(params, batch, config)
    loss_e, n_e = af.loss_sum_fn(params, batch, config, impl="reference")
    assert n_c.item() == n_e.item() == 14
    torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(loss_c, leaves), torch.autograd.grad(loss_e, leaves)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_auto_backend_is_inductor_off_npu(monkeypatch):
    seen = []

    def fake_compile(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    f = af_compile(lambda x: x * 3, fullgraph=True)
    assert f(torch.ones(2)).tolist() == [3.0, 3.0]
    f(torch.ones(2))  # built once, then reused
    assert len(seen) == 1
    assert seen[0]["backend"] == "inductor" and seen[0]["fullgraph"] is True
    with pytest.raises(ValueError, match="backend"):
        af_compile(lambda x: x, backend="tensorrt")


def test_lazy_compiled_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    double = LazyCompiled(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert double(torch.ones(1)).item() == 2.0
    assert double.broken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert double(torch.ones(1)).item() == 2.0  # silently eager from now on

    strict = LazyCompiled(lambda x: x @ x)  # a genuine user error still raises
    with pytest.raises(RuntimeError):
        strict(torch.ones(2, 3))
    assert not strict.broken


def test_ops_inside_compiled_region_use_reference_math():
    x, w = torch.randn(4, 1 << 14), torch.randn(1 << 14)

    @af_compile(backend="eager", fullgraph=True)
    def norm(x, w):
        return ops.rms_norm(x, w, 1e-6)

    torch._dynamo.reset()
    torch.testing.assert_close(norm(x, w), ops.rms_norm(x, w, 1e-6, impl="reference"))
