import json

import pytest

from aquila_fn import ConfigError, ModelConfig, PRESETS, get_config


def test_presets_have_documented_shapes():
    a7 = get_config("aquila-7b")
    assert (a7.dim, a7.n_layers, a7.n_heads, a7.ffn_dim, a7.vocab_size, a7.max_seq_len) == \
        (4096, 32, 32, 11008, 100008, 2048)
    assert a7.norm_eps == 1e-6 and not a7.tie_embeddings
    a34 = get_config("aquila2-34b")
    assert (a34.dim, a34.n_layers, a34.n_heads, a34.n_kv_heads, a34.ffn_dim, a34.max_seq_len) == \
        (6144, 60, 48, 8, 24576, 4096)
    small = get_config("small")
    assert (small.dim, small.n_layers, small.n_heads, small.ffn_dim, small.vocab_size) == \
        (512, 8, 8, 1376, 32000)
    s = get_config("stories260k")
    assert (s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.ffn_dim, s.vocab_size) == (64, 5, 8, 4, 172, 512)
    assert 1e6 < get_config("tiny").num_params() < 1e7
    assert 7.2e9 < a7.num_params() < 7.4e9  # 100,008-token untied vocabulary adds 0.8B
    assert {"tiny", "small", "stories260k", "aquila-7b", "aquila2-7b", "aquila2-34b", "llama-2-7b"} <= set(PRESETS)


def test_unknown_preset_names_itself():
    with pytest.raises(ConfigError, match="unknown config preset 'aquila-9b'"):
        get_config("aquila-9b")


@pytest.mark.parametrize("changes, field", [
    ({"n_heads": 5}, "n_heads=5"),
    ({"n_kv_heads": 3}, "n_kv_heads=3"),
    ({"dim": 0}, "dim=0"),
])
def test_invalid_config_names_field_and_value(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_config("tiny", **changes)


def test_unknown_field_is_refused():
    with pytest.raises(ConfigError, match="hidden"):
        get_config("tiny").replace(hidden=3)


def test_vocab_follows_tokenizer_padded_unless_pinned():
    assert get_config("tiny").with_vocab(50257, multiple=128).vocab_size == 50304
    assert get_config("aquila-7b").with_vocab(100008).vocab_size == 100008
    with pytest.raises(ConfigError, match="pins vocab_size"):
        get_config("stories260k").with_vocab(32000)


def test_from_hf_config_json(tmp_path):
    hf = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 344, "vocab_size": 1000, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    c = ModelConfig.from_hf(tmp_path)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (128, 2, 4, 2, 344, 1000)
    assert c.rope_theta == 500000.0 and c.tie_embeddings
    assert ModelConfig.from_hf(c.to_hf()) == c
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in hf.items() if k != "intermediate_size"})
    with pytest.raises(ConfigError, match="no Hugging Face config"):
        ModelConfig.from_hf(tmp_path / "missing")


def test_dict_round_trip():
    c = get_config("aquila2-34b")
    assert ModelConfig.from_dict(c.to_dict()) == c
