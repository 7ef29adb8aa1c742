import math

import pytest
import torch

from aquila_fn import get_config, init_params
from aquila_fn.core import pytree
from aquila_fn.training import optim

CFG = get_config("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64,
                 tie_embeddings=False)


def _params_and_grads(seed=0, scale=1.0):
    params = init_params(CFG, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grads = pytree.tree_map(lambda p: torch.randn(p.shape, generator=g) * scale, params)
    return params, grads


def _clone(tree):
    return pytree.tree_map(torch.clone, tree)


def _torch_adamw(params, grads_seq, *, lr, betas, eps, wd, mask, max_norm):
    """torch.optim.AdamW with clip_grad_norm_ and two param groups: the reference."""
    leaves = [p.clone().requires_grad_(True) for p in pytree.leaves(params)]
    flags = pytree.leaves(mask)
    groups = [{"params": [p for p, f in zip(leaves, flags) if f], "weight_decay": wd},
              {"params": [p for p, f in zip(leaves, flags) if not f], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    for grads in grads_seq:
        for p, g in zip(leaves, pytree.leaves(grads)):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(leaves, max_norm)
        opt.step()
    return [p.detach() for p in leaves]


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_torch_adamw(fused):
    params, _ = _params_and_grads()
    grads_seq = [_params_and_grads(seed=s, scale=0.5)[1] for s in range(3)]
    opt = optim.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
    state = opt.init(params)
    p = _clone(params)
    for grads in grads_seq:
        if fused:
            p, state = optim.step(opt, p, _clone(grads), state)
        else:
            updates, state = opt.update(grads, state, p)
            p = optim.apply_updates(p, updates)
    expected = _torch_adamw(params, grads_seq, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, wd=0.1,
                            mask=optim.decay_mask(params), max_norm=1.0)
    for got, want in zip(pytree.leaves(p), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert optim.update_count(state) == 3


def test_fused_and_chain_share_state_layout():
    params, grads = _params_and_grads()
    opt = optim.adamw(1e-3)
    s_chain = opt.init(params)
    s_fused = opt.init(params)
    _, s_chain = opt.update(grads, s_chain, params)
    _, s_fused = optim.step(opt, _clone(params), _clone(grads), s_fused)
    a, b = pytree.flatten_dict(s_chain), pytree.flatten_dict(s_fused)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_clip_by_global_norm_clips_to_max_and_leaves_small_alone():
    _, grads = _params_and_grads(scale=10.0)
    clip = optim.clip_by_global_norm(1.0)
    assert optim.global_norm(grads) > 1.0
    clipped, _ = clip.update(grads, clip.init(grads))
    torch.testing.assert_close(optim.global_norm(clipped), torch.tensor(1.0))
    # direction is kept
    ratio = pytree.leaves(clipped)[0] / pytree.leaves(grads)[0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0])))
    small = pytree.tree_map(lambda g: g * 1e-4, grads)
    same, _ = clip.update(small, {})
    for x, y in zip(pytree.leaves(same), pytree.leaves(small)):
        assert torch.equal(x, y)


def test_global_norm_value():
    tree = {"a": torch.tensor([3.0]), "b": [torch.tensor([[4.0]])]}
    assert float(optim.global_norm(tree)) == pytest.approx(5.0)


def test_decay_mask_excludes_norms_and_configures_embeddings():
    params = init_params(CFG, 0)
    params["layers"][0]["attn"]["bias"] = torch.zeros(4)
    mask = pytree.flatten_dict(optim.decay_mask(params))
    assert mask["embed"] is True and mask["lm_head"] is True
    assert mask["layers.0.attn.wq"] is True and mask["layers.1.mlp.w_down"] is True
    assert mask["norm"] is False and mask["layers.0.attn_norm"] is False
    assert mask["layers.1.mlp_norm"] is False and mask["layers.0.attn.bias"] is False
    no_embed = pytree.flatten_dict(optim.decay_mask(params, decay_embeddings=False))
    assert no_embed["embed"] is False and no_embed["lm_head"] is True


@pytest.mark.parametrize("fused", [False, True])
def test_weight_decay_follows_the_mask(fused):
    # Zero gradients: Adam's direction is 0, so the only change is the decoupled decay.
    params = init_params(CFG, 0)
    params = pytree.tree_map(lambda p: p + 1.0, params)  # norms are 2.0, nonzero everywhere
    zeros = pytree.tree_map(torch.zeros_like, params)
    mask = lambda p: optim.decay_mask(p, decay_embeddings=False)
    opt = optim.adamw(0.1, weight_decay=0.5, mask=mask, max_grad_norm=None)
    if fused:
        new, _ = optim.step(opt, _clone(params), zeros, opt.init(params))
    else:
        updates, _ = opt.update(zeros, opt.init(params), params)
        new = optim.apply_updates(params, updates)
    flags = pytree.flatten_dict(mask(params))
    for path, before in pytree.flatten_dict(params).items():
        after = pytree.flatten_dict(new)[path]
        expected = before * (1 - 0.1 * 0.5) if flags[path] else before
        torch.testing.assert_close(after, expected, msg=path)
    assert not flags["embed"] and not flags["norm"] and flags["layers.0.mlp.w_up"]


def test_mask_with_wrong_structure_is_an_error():
    params, grads = _params_and_grads()
    opt = optim.adamw(1e-3, mask={"embed": True})
    with pytest.raises(ValueError, match="mask has 1 leaves"):
        opt.update(grads, opt.init(params), params)


def test_warmup_cosine_schedule():
    s = optim.warmup_cosine(1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert s(0) == pytest.approx(0.1)          # update 1 of 10 warmup steps
    assert s(9) == pytest.approx(1.0)          # end of warmup: the peak
    assert s(59) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert s(109) == pytest.approx(0.1)        # the last decay step reaches min_lr
    assert s(500) == pytest.approx(0.1)
    values = [s(i) for i in range(9, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_linear_schedule():
    s = optim.warmup_linear(2.0, warmup_steps=0, total_steps=100, min_lr=0.0)
    assert s(0) == pytest.approx(2.0 * (1 - 1 / 100))
    assert s(49) == pytest.approx(1.0)
    assert s(99) == pytest.approx(0.0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="shorter than warmup"):
        optim.warmup_cosine(1.0, 10, 5)
    with pytest.raises(ValueError, match="unknown lr decay style"):
        optim.make_schedule("step", 1.0, 0, 10)
    with pytest.raises(ValueError, match="min_lr"):
        optim.warmup_linear(1e-4, 0, 10, min_lr=1e-3)


def test_chain_of_small_transforms_and_schedule_scaling():
    params, grads = _params_and_grads()
    opt = optim.chain(optim.scale_by_schedule(lambda c: 2.0 ** c))
    state = opt.init(params)
    u1, state = opt.update(grads, state)
    u2, state = opt.update(grads, state)
    torch.testing.assert_close(pytree.leaves(u1)[0], pytree.leaves(grads)[0])
    torch.testing.assert_close(pytree.leaves(u2)[0], 2 * pytree.leaves(grads)[0])
    assert int(state[0]["count"]) == 2


def test_state_is_a_pytree_of_tensors_with_fp32_moments():
    params = pytree.tree_map(lambda p: p.to(torch.bfloat16), init_params(CFG, 0))
    state = optim.adamw(optim.constant(1e-3)).init(params)
    flat = pytree.flatten_dict(state)
    assert all(isinstance(v, torch.Tensor) for v in flat.values())
    assert flat["1.mu.embed"].dtype == torch.float32
    assert flat["1.count"].dtype == torch.int64


def test_learning_rate_reports_the_next_update():
    params, grads = _params_and_grads()
    opt = optim.adamw(optim.warmup_linear(1.0, 4, 8))
    state = opt.init(params)
    assert optim.learning_rate(opt, state) == pytest.approx(0.25)
    _, state = optim.step(opt, params, grads, state)
    assert optim.learning_rate(opt, state) == pytest.approx(0.5)
    assert math.isnan(optim.learning_rate(optim.chain(), []))
