"""Weight-only int8: rounding bound, tree structure, and perplexity within 1% of fp32."""

import pytest
import torch

from aquila_fn import forward, get_config, init_params
from aquila_fn.inference.generate import ASSETS, Decoder, load_model
from aquila_fn.core.quantize import (dequantize_params, dequantize_weight, is_quantized, perplexity,
                                quantize_params, quantize_weight, weight_bytes)


pytestmark = pytest.mark.usefixtures("one_thread")


RANDOM = get_config("tiny", n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, init_std=0.1)


def test_quantize_weight_rounding_bound():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row must not divide by zero
    q = quantize_weight(w)
    assert q["int8"].dtype == torch.int8 and q["scale"].shape == (64,)
    assert q["int8"].abs().max() <= 127
    err = (dequantize_weight(q) - w).abs()
    assert (err <= q["scale"][:, None] / 2 + 1e-7).all()
    assert torch.equal(dequantize_weight(q)[3], torch.zeros(96))


def test_structure_and_bytes():
    params = init_params(RANDOM, seed=0)
    q = quantize_params(params)
    layer = q["layers"][0]
    assert all(is_quantized(layer["attn"][k]) for k in ("wq", "wk", "wv", "wo"))
    assert all(is_quantized(layer["mlp"][k]) for k in ("w_gate", "w_up", "w_down"))
    assert not is_quantized(q["embed"]) and is_quantized(q["lm_head"])  # tied: int8 copy of the head
    assert weight_bytes(q) < 0.3 * weight_bytes(params)
    back = dequantize_params(q, RANDOM)
    assert "lm_head" not in back and back["layers"][1]["mlp"]["w_up"].shape == (256, 128)


def test_export_refuses_int8(tmp_path):
    from aquila_fn.interop.hf import save_hf
    params = quantize_params(init_params(RANDOM, seed=0))
    with pytest.raises(ValueError, match="int8"):
        save_hf(tmp_path, RANDOM, params)


def test_logits_close_and_decoder_runs():
    params = init_params(RANDOM, seed=1)
    q = quantize_params(params)
    x = torch.randint(0, RANDOM.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, _ = forward(params, x, RANDOM)
    out, _ = forward(q, x, RANDOM)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    [o] = Decoder(q, RANDOM).generate([[1, 2, 3]], max_new_tokens=5)
    assert len(o.tokens) == 5


def _relative_gap(params, config, tokens, **kw):
    fp32 = perplexity(params, config, tokens, **kw)
    int8 = perplexity(quantize_params(params), config, tokens, **kw)
    return fp32, int8, abs(int8 / fp32 - 1)


def test_perplexity_stories260k_tinystories_within_1_percent():
    config, params, tok = load_model()
    text = (ASSETS / "tinystories.txt").read_text()[:12000]
    tokens = torch.tensor(tok.encode(text))[:4097]
    fp32, int8, gap = _relative_gap(params, config, tokens, seq_len=256)
    assert fp32 < 6.0  # a trained model: NLL ~1.5 on TinyStories
    assert gap < 0.01, (fp32, int8)


def test_perplexity_random_model_within_1_percent():
    params = init_params(RANDOM, seed=2)
    tokens = torch.randint(0, RANDOM.vocab_size, (2049,), generator=torch.Generator().manual_seed(1))
    fp32, int8, gap = _relative_gap(params, RANDOM, tokens, seq_len=256)
    assert gap < 0.01, (fp32, int8)


def test_bf16_int8_perplexity_close():
    config, params, tok = load_model()
    tokens = torch.tensor(tok.encode((ASSETS / "tinystories.txt").read_text()[:2000]))[:513]
    fp32 = perplexity(params, config, tokens)
    bf16_int8 = perplexity(quantize_params(params), config, tokens, compute_dtype=torch.bfloat16)
    assert abs(bf16_int8 / fp32 - 1) < 0.02
