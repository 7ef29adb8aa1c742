"""LoRA as a pytree transform: initialisation, gradients to adapters only, merge, save/load, and
fine-tuning stories260K on the shipped Alpaca records."""

import math

import pytest
import torch

from aquila_fn.core import pytree
from aquila_fn.training import lora
from aquila_fn.core.config import get_config
from aquila_fn.jobs.finetune import FinetuneConfig, finetune, load_instruction_examples, mean_loss
from aquila_fn.interop.llama2c import load_llama2c
from aquila_fn.core.model import forward, init_params, loss_fn
from aquila_fn.data.tokenizer import load_tokenizer
from aquila_fn.core.transforms import value_and_grad


@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    return config, init_params(config, seed=0)


def snapshot(params):
    return {k: v.clone() for k, v in pytree.flatten_dict(params).items()}


def bitwise_equal(params, snap):
    flat = pytree.flatten_dict(params)
    return flat.keys() == snap.keys() and all(torch.equal(flat[k], snap[k]) for k in snap)


def randomise(adapters, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda x: torch.randn(x.shape, generator=gen) * 0.05, adapters)


def test_init_shapes_targets_and_determinism(tiny):
    config, params = tiny
    adapters = lora.lora_init(params, rank=4, alpha=8, targets=r"attn\.(wq|wv)$", seed=3)
    pairs = lora.adapter_pairs(adapters)
    assert sorted(pairs) == sorted(f"layers.{i}.attn.{w}" for i in range(config.n_layers) for w in ("wq", "wv"))
    for path, (a, b) in pairs.items():
        out_dim, in_dim = pytree.flatten_dict(params)[path].shape
        assert a.shape == (4, in_dim) and b.shape == (out_dim, 4)
        assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / math.sqrt(in_dim)
    again = lora.lora_init(params, 4, 8, r"attn\.(wq|wv)$", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(adapters), pytree.leaves(again)))
    other = lora.lora_init(params, 4, 8, r"attn\.(wq|wv)$", seed=4)
    assert not torch.equal(pytree.leaves(adapters)[0], pytree.leaves(other)[0])
    one = lora.lora_init(params, 2, 4, targets=[r"layers\.1\.mlp\.w_up"])
    assert list(lora.adapter_pairs(one)) == ["layers.1.mlp.w_up"] and lora.lora_rank(one) == 2


def test_init_errors(tiny):
    _, params = tiny
    with pytest.raises(lora.LoraError, match="match no parameter"):
        lora.lora_init(params, 4, 8, targets=r"attn\.wz")
    with pytest.raises(lora.LoraError, match="attn_norm has shape"):
        lora.lora_init(params, 4, 8, targets=r"attn_norm")
    with pytest.raises(lora.LoraError, match="rank must be a positive integer"):
        lora.lora_init(params, 0, 8)


def test_apply_starts_at_the_base_and_adds_the_low_rank_update(tiny):
    config, params = tiny
    adapters = lora.lora_init(params, 4, 8)
    start = lora.lora_apply(params, adapters, alpha=8)
    assert bitwise_equal(start, snapshot(params))  # B = 0: exactly the base model
    adapters = randomise(adapters)
    eff = pytree.flatten_dict(lora.lora_apply(params, adapters, alpha=8))
    a, b = lora.adapter_pairs(adapters)["layers.0.attn.wq"]
    w = pytree.flatten_dict(params)["layers.0.attn.wq"]
    assert torch.allclose(eff["layers.0.attn.wq"], w + (8 / 4) * b @ a)
    assert eff["layers.0.attn.wk"] is pytree.flatten_dict(params)["layers.0.attn.wk"]
    # the effective weight acts as base + low-rank path: x W'^T = x W^T + s (x A^T) B^T
    x = torch.randn(3, w.shape[1])
    assert torch.allclose(x @ eff["layers.0.attn.wq"].T, x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-5)


def test_gradients_reach_only_the_adapters(tiny):
    config, params = tiny
    before = snapshot(params)
    adapters = lora.lora_init(params, 4, 8)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    loss = lora.lora_loss(loss_fn, params, alpha=8)
    (value, n), grads = value_and_grad(loss, has_aux=True)(adapters, batch, config)
    assert pytree.structure(grads) == pytree.structure(adapters)
    base_loss, _ = loss_fn(params, batch, config)
    assert torch.allclose(value, base_loss)
    for path, (ga, gb) in lora.adapter_pairs(grads).items():
        assert torch.count_nonzero(ga) == 0  # dL/dA = s·B^T(...) and B = 0 at the start
        assert torch.count_nonzero(gb) > 0, path
    assert bitwise_equal(params, before)
    assert all(not x.requires_grad for x in pytree.leaves(params))


def test_merged_weights_give_the_same_logits(tiny):
    config, params = tiny
    adapters = randomise(lora.lora_init(params, 4, 16, targets=r"attn\.(wq|wk|wv|wo)|mlp\.w_up"))
    before = snapshot(params)
    merged = lora.lora_merge(params, adapters, alpha=16)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        via_adapter, _ = forward(lora.lora_apply(params, adapters, 16), tokens, config)
        via_merged, _ = forward(merged, tokens, config)
        base, _ = forward(params, tokens, config)
    assert torch.allclose(via_merged, via_adapter, atol=1e-6)
    assert not torch.allclose(via_merged, base, atol=1e-3)  # the adapters did change the model
    assert all(not x.requires_grad for x in pytree.leaves(merged))
    assert bitwise_equal(params, before)


def test_save_and_load_adapters_alone(tiny, tmp_path):
    config, params = tiny
    adapters = randomise(lora.lora_init(params, 4, 8))
    path = lora.save_adapters(tmp_path / "adapters", adapters, alpha=8, targets=r"attn\.(wq|wv)$", step=7)
    loaded, info = lora.load_adapters(path)
    assert info["rank"] == 4 and info["alpha"] == 8 and info["step"] == 7
    assert info["targets"] == r"attn\.(wq|wv)$" and len(info["paths"]) == 2 * config.n_layers
    assert pytree.structure(loaded) == pytree.structure(adapters)
    assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(loaded), pytree.leaves(adapters)))
    # the file holds the adapters only: far smaller than the model
    size = sum(f.stat().st_size for f in (tmp_path / "adapters").rglob("*") if f.is_file())
    assert size < pytree.tree_bytes(params) / 4
    loaded_dir, _ = lora.load_adapters(tmp_path / "adapters")  # the run dir: its latest checkpoint
    assert pytree.structure(loaded_dir) == pytree.structure(adapters)


@pytest.mark.slow
def test_lora_lowers_alpaca_loss_and_leaves_the_base_bitwise_equal(assets):
    config, params = load_llama2c(assets / "stories260K.bin")
    tok = load_tokenizer(assets / "tok512.model")
    examples = load_instruction_examples(assets / "alpaca_data_1k.json", tok, seq_len=512)
    # the shortest records keep the test quick; ModelLink's Alpaca prompt alone is ~180 tokens
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))[:32]
    before = snapshot(params)
    loss_before = mean_loss(config, params, examples)
    cfg = FinetuneConfig(lora_rank=8, lora_alpha=16, steps=40, lr=1e-2, batch_size=4, seq_len=512, seed=0)
    result = finetune(config, params, examples, cfg)
    assert bitwise_equal(params, before)
    merged = lora.lora_merge(params, result["trainable"], 16)
    loss_after = mean_loss(config, merged, examples)
    print(f"LoRA on {len(examples)} Alpaca records: response loss {loss_before:.3f} -> {loss_after:.3f}")
    assert loss_after < loss_before - 1.0
    assert len(result["metrics"]) == 40 and all(math.isfinite(m["loss"]) for m in result["metrics"])
