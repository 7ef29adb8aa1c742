import pytest
import torch

import aquila_fn as af
import ops
from aquila_fn.core import pytree
from aquila_fn.core.model import TokenError, init_cache, init_leaf, param_shapes

CFG = af.get_config("tiny").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97,
                                    max_seq_len=64)


def _tokens(b, s, seed=0):
    return torch.randint(0, CFG.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def test_param_paths_and_count():
    params = af.init_params(CFG, seed=0)
    names = list(af.flatten_dict(params))
    assert "layers.1.attn.wq" in names and "layers.0.mlp.w_down" in names and "norm" in names
    assert "lm_head" not in names  # tiny ties embeddings
    assert af.param_count(params) == CFG.num_params()
    untied = CFG.replace(tie_embeddings=False)
    assert af.param_count(af.init_params(untied, 0)) == untied.num_params()


def test_init_is_independent_of_creation_order():
    params = af.init_params(CFG, seed=7)
    shapes = pytree.flatten_dict(param_shapes(CFG))
    for path in reversed(list(shapes)):  # materialise leaves in the opposite order
        leaf = init_leaf(path, shapes[path].shape, CFG, seed=7)
        assert torch.equal(leaf, af.flatten_dict(params)[path]), path
    other = af.init_params(CFG, seed=8)
    assert not torch.equal(params["embed"], other["embed"])


def test_meta_shapes_equal_real_shapes():
    meta = af.flatten_dict(af.init_params(CFG, 0, device="meta"))
    real = af.flatten_dict(af.init_params(CFG, 0))
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    assert all(v.device.type == "meta" for v in meta.values())


def test_decoding_with_cache_equals_full_recompute():
    params = af.init_params(CFG, 0)
    tokens = _tokens(2, 12)
    full, _ = af.forward(params, tokens, CFG)
    cache = init_cache(CFG, batch=2, max_len=CFG.max_seq_len)
    logits, cache = af.forward(params, tokens[:, :5], CFG, cache=cache, start_pos=0)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = af.forward(params, tokens[:, t:t + 1], CFG, cache=cache, start_pos=t)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_at_int_position_attends_to_filled_slots_without_mask(monkeypatch):
    """A prefill or extension at a Python-int position attends only to the filled slots, with the
    op's own causal mask (so the causal kernels run); a tensor position, as in the compiled
    decode step, reads the whole static cache under a mask. All agree with the full forward."""
    params = af.init_params(CFG, 0)
    tokens = _tokens(2, 9)
    full, _ = af.forward(params, tokens, CFG)
    calls, attention = [], ops.attention

    def spy(q, k, v, *, mask=None, **kw):
        calls.append((q.shape[1], k.shape[1], mask is not None))
        return attention(q, k, v, mask=mask, **kw)

    monkeypatch.setattr(ops, "attention", spy)
    cache = init_cache(CFG, batch=2, max_len=32)
    first, cache = af.forward(params, tokens[:, :6], CFG, cache=cache, start_pos=0)
    rest, _ = af.forward(params, tokens[:, 6:], CFG, cache=cache, start_pos=6)
    assert set(calls) == {(6, 6, False), (3, 9, False)}  # (queries, keys, masked) per layer
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)

    calls.clear()
    cache = init_cache(CFG, batch=2, max_len=32)
    _, cache = af.forward(params, tokens[:, :6], CFG, cache=cache, start_pos=0)
    rest, _ = af.forward(params, tokens[:, 6:], CFG, cache=cache, start_pos=torch.tensor(6))
    assert (3, 32, True) in calls
    torch.testing.assert_close(rest, full[:, 6:], rtol=1e-5, atol=1e-5)


def test_tokens_past_the_cache_are_named():
    params = af.init_params(CFG, 0)
    cache = init_cache(CFG, batch=1, max_len=8)
    with pytest.raises(ValueError, match=r"slots 6\.\.9 do not fit a cache of 8 slots"):
        af.forward(params, _tokens(1, 4), CFG, cache=cache, start_pos=6)


def test_padding_mask_left_padded_row_equals_unpadded():
    params = af.init_params(CFG, 0)
    tokens = _tokens(1, 6)
    alone, _ = af.forward(params, tokens, CFG)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out, _ = af.forward(params, padded, CFG, attn_mask=mask, positions=positions)
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-5, atol=1e-5)


def test_merged_projections_give_same_logits():
    params = af.init_params(CFG, 0)
    tokens = _tokens(2, 9)
    ref, _ = af.forward(params, tokens, CFG)
    merged = af.merge_projections(params)
    assert "wqkv" in merged["layers"][0]["attn"] and "w_gate_up" in merged["layers"][0]["mlp"]
    out, _ = af.forward(merged, tokens, CFG)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    back = af.split_projections(merged, CFG)
    for (name, a), (_, b) in zip(af.named_leaves(back), af.named_leaves(params)):
        assert torch.equal(a, b), name


def test_loss_ignores_minus_100_and_is_token_weighted():
    params = af.init_params(CFG, 0)
    x = _tokens(2, 8)
    labels = x.roll(-1, dims=1).clone()
    labels[0, 3:] = -100
    loss, n = af.loss_fn(params, {"input_ids": x, "labels": labels}, CFG)
    assert int(n) == 8 + 3
    logits, _ = af.forward(params, x, CFG)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG.vocab_size), labels.reshape(-1),
                                                 ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_value_and_grad_matches_finite_differences_float64():
    cfg = CFG.replace(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=24, vocab_size=11)
    params = af.init_params(cfg, 3, dtype=torch.float64)
    x = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "labels": x.roll(-1, 1)}

    def loss(p, b):
        return af.loss_fn(p, b, cfg, impl="reference")

    (value, n), grads = af.value_and_grad(loss, has_aux=True)(params, batch)
    assert int(n) == 10
    flat_p, flat_g = af.flatten_dict(params), af.flatten_dict(grads)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for path in ["embed", "layers.0.attn.wq", "layers.0.attn.wk", "layers.0.mlp.w_down", "layers.0.attn_norm", "norm"]:
        leaf = flat_p[path]
        for _ in range(3):
            idx = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in leaf.shape)
            orig = leaf[idx].item()
            leaf[idx] = orig + eps
            up = loss(params, batch)[0].item()
            leaf[idx] = orig - eps
            down = loss(params, batch)[0].item()
            leaf[idx] = orig
            fd = (up - down) / (2 * eps)
            assert abs(fd - flat_g[path][idx].item()) < 1e-6 * max(1.0, abs(fd)), (path, idx)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_recompute_policies_give_identical_gradients(policy):
    params = af.init_params(CFG, 0)
    x = _tokens(2, 8)
    batch = {"input_ids": x, "labels": x.roll(-1, 1)}
    ref_v, ref_g = af.value_and_grad(lambda p: af.loss_fn(p, batch, CFG)[0])(params)
    v, g = af.value_and_grad(lambda p: af.loss_fn(p, batch, CFG, recompute=policy)[0])(params)
    assert torch.equal(v, ref_v)
    for (name, a), (_, b) in zip(af.named_leaves(g), af.named_leaves(ref_g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_compute_close_to_fp32():
    params = af.init_params(CFG, 0)
    x = _tokens(2, 8)
    ref, _ = af.forward(params, x, CFG)
    out, _ = af.forward(params, x, CFG, compute_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_token_outside_vocab_is_named():
    params = af.init_params(CFG, 0)
    bad = torch.tensor([[1, 2, CFG.vocab_size + 5]])
    with pytest.raises(TokenError, match=f"token id {CFG.vocab_size + 5} is outside the model's vocabulary"):
        af.forward(params, bad, CFG)
    with pytest.raises(TokenError, match="token id -1"):
        af.forward(params, torch.tensor([[-1, 2]]), CFG)
