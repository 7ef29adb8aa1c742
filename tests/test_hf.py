"""Hugging Face interop against a real transformers LlamaForCausalLM (random, small, GQA, no hub):
logits, greedy and beam-search tokens, export that transformers loads back."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aquila_fn import init_params, get_config, forward  # noqa: E402
from aquila_fn.inference.generate import Decoder  # noqa: E402
from aquila_fn.interop.hf import HFFormatError, hf_to_path, load_hf, path_to_hf, save_hf  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_config(**overrides):
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config()).eval()
    directory = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(directory)  # safetensors
    return directory, model


PROMPT = [1, 17, 93, 5, 201, 44, 9]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_name_map_round_trip():
    assert hf_to_path("model.layers.3.self_attn.q_proj.weight") == "layers.3.attn.wq"
    assert hf_to_path("model.layers.0.mlp.gate_proj.weight") == "layers.0.mlp.w_gate"
    assert hf_to_path("model.layers.1.post_attention_layernorm.weight") == "layers.1.mlp_norm"
    assert hf_to_path("model.embed_tokens.weight") == "embed"
    assert hf_to_path("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.7.mlp.down_proj.weight",
                 "model.layers.2.input_layernorm.weight", "model.layers.2.self_attn.o_proj.weight"):
        assert path_to_hf(hf_to_path(name)) == name


def test_load_safetensors_logits_match(hf_dir):
    directory, model = hf_dir
    config, params = load_hf(directory)
    assert (config.n_kv_heads, config.n_heads, config.vocab_size) == (2, 4, 256)
    ours, _ = forward(params, torch.tensor([PROMPT]), config)
    torch.testing.assert_close(ours, hf_logits(model, PROMPT), atol=1e-4, rtol=0)


def test_load_pytorch_bin_and_tied(tmp_path):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(hf_config(tie_word_embeddings=True)).eval()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config, params = load_hf(tmp_path)
    assert config.tie_embeddings and "lm_head" not in params
    ours, _ = forward(params, torch.tensor([PROMPT]), config)
    torch.testing.assert_close(ours, hf_logits(model, PROMPT), atol=1e-4, rtol=0)


def test_greedy_matches_transformers_generate(hf_dir):
    directory, model = hf_dir
    config, params = load_hf(directory)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0)
    [out] = Decoder(params, config).generate([PROMPT], max_new_tokens=24, eos_id=2)
    assert out.tokens == ref[0, len(PROMPT):].tolist()


def test_greedy_with_repetition_penalty_matches_transformers(hf_dir):
    directory, model = hf_dir
    config, params = load_hf(directory)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.5, eos_token_id=None, pad_token_id=0)
    from aquila_fn.inference.sampling import SamplingParams
    [out] = Decoder(params, config).generate([PROMPT], max_new_tokens=20,
                                            sampling=SamplingParams(repetition_penalty=1.5))
    assert out.tokens == ref[0, len(PROMPT):].tolist()


def _eos_from_greedy(model, step):
    """A token greedy decoding emits at `step`, used as EOS so that beams end at different times."""
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=step + 1, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return int(ref[0, len(PROMPT) + step])


@pytest.mark.parametrize("eos_step,length_penalty,early_stopping", [
    (3, 1.0, False), (5, 2.0, True), (5, 0.5, "never"), (3, -1.0, False), (5, 0.0, True)])
def test_beam_search_matches_transformers(hf_dir, eos_step, length_penalty, early_stopping):
    """All 4 returned beams and their scores, with EOS chosen so that beams end at different steps."""
    directory, model = hf_dir
    config, params = load_hf(directory)
    eos = _eos_from_greedy(model, eos_step)
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, num_beams=4,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             eos_token_id=eos, pad_token_id=0, num_return_sequences=4,
                             output_scores=True, return_dict_in_generate=True)
    [beams] = Decoder(params, config).beam_search([PROMPT], num_beams=4, max_new_tokens=12,
                                                 length_penalty=length_penalty,
                                                 early_stopping=early_stopping, eos_id=eos, num_return=4)
    for beam, seq, score in zip(beams, ref.sequences, ref.sequences_scores):
        expected = seq[len(PROMPT):].tolist()
        assert beam.tokens == expected[:len(beam.tokens)]
        assert beam.score == pytest.approx(float(score), abs=1e-4)


def test_export_loads_into_transformers(tmp_path):
    config = get_config("tiny", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96,
                        tie_embeddings=False, init_std=0.1)
    params = init_params(config, seed=3)
    save_hf(tmp_path, config, params)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours, _ = forward(params, torch.tensor([PROMPT]), config)
    torch.testing.assert_close(hf_logits(model, PROMPT), ours, atol=1e-4, rtol=0)
    config2, params2 = load_hf(tmp_path)
    assert config2.replace(vocab_pinned=False) == config.replace(vocab_pinned=False)
    for (p, a), (q, b) in zip(__import__("aquila_fn").named_leaves(params),
                              __import__("aquila_fn").named_leaves(params2)):
        assert p == q and torch.equal(a, b)


def test_sharded_export_tied(tmp_path):
    config = get_config("tiny", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, init_std=0.1)
    assert config.tie_embeddings
    params = init_params(config, seed=4)
    save_hf(tmp_path, config, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours, _ = forward(params, torch.tensor([PROMPT]), config)
    torch.testing.assert_close(hf_logits(model, PROMPT), ours, atol=1e-4, rtol=0)
    _, params2 = load_hf(tmp_path)
    assert torch.equal(params2["layers"][1]["mlp"]["w_down"], params["layers"][1]["mlp"]["w_down"])


def test_bf16_export_and_load_dtype(tmp_path):
    config = get_config("tiny", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96)
    params = init_params(config, seed=5)
    save_hf(tmp_path, config, params, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, stored = load_hf(tmp_path)
    assert stored["embed"].dtype == torch.bfloat16
    _, as_fp32 = load_hf(tmp_path, dtype=torch.float32)
    assert as_fp32["norm"].dtype == torch.float32


def _rewrite(directory, edit):
    from safetensors.torch import load_file, save_file
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def test_misshaped_tensor_error_names_it(tmp_path):
    config = get_config("tiny", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96)
    save_hf(tmp_path, config, init_params(config, seed=0))
    name = "model.layers.0.self_attn.k_proj.weight"
    path = _rewrite(tmp_path, lambda s: s.__setitem__(name, torch.zeros(64, 64)))
    with pytest.raises(HFFormatError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert str(path) in msg and name in msg and "(64, 64)" in msg and "(32, 64)" in msg


def test_missing_tensor_error_names_it(tmp_path):
    config = get_config("tiny", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96)
    save_hf(tmp_path, config, init_params(config, seed=0))
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(tmp_path, lambda s: s.pop(name))
    with pytest.raises(HFFormatError, match=name.replace(".", r"\.")):
        load_hf(tmp_path)


def test_no_weights_error(tmp_path):
    hf_config().save_pretrained(tmp_path)
    with pytest.raises(HFFormatError, match="no weights"):
        load_hf(tmp_path)
