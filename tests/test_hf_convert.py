"""scripts/convert_checkpoint.py: llama2.c -> native -> Hugging Face -> native, weights unchanged."""

import json
from pathlib import Path

import pytest
import torch

from aquila_fn import forward, named_leaves
from aquila_fn.inference.generate import load_model

from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "aquila_fn" / "assets"


convert = load_script("convert_checkpoint")


def same_params(a, b):
    la, lb = list(named_leaves(a)), list(named_leaves(b))
    return [p for p, _ in la] == [p for p, _ in lb] and all(torch.equal(x, y) for (_, x), (_, y) in zip(la, lb))


def test_parse_size():
    assert convert.parse_size("2GB") == 2 * 10**9
    assert convert.parse_size("1.5MiB") == int(1.5 * 2**20)
    assert convert.parse_size("1234") == 1234


def test_llama2c_native_hf_round_trip(tmp_path, capsys):
    config, params, _ = load_model()
    native = tmp_path / "native"
    assert convert.main([str(ASSETS / "stories260K.bin"), str(native),
                         "--tokenizer", str(ASSETS / "tok512.model")]) == 0
    assert "llama2c" in capsys.readouterr().out
    config_n, params_n, tok = load_model(native)
    assert config_n == config and same_params(params, params_n)
    assert tok is not None and tok.vocab_size == 512  # the recorded tokenizer is found again

    hf = tmp_path / "hf"
    assert convert.main([str(native), str(hf)]) == 0  # native -> hf by default
    assert (hf / "tokenizer.model").is_file() and (hf / "model.safetensors").is_file()
    config_h, params_h, tok_h = load_model(hf)
    assert tok_h is not None and same_params(params, params_h)

    back = tmp_path / "native2"
    assert convert.main([str(hf), str(back)]) == 0
    _, params_b, _ = load_model(back)
    assert same_params(params, params_b)


def test_hf_export_loads_in_transformers_sharded_bf16(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert convert.main([str(ASSETS / "stories260K.bin"), str(out), "--to", "hf", "--dtype", "bfloat16",
                         "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    config, params, tok = load_model(out, dtype=torch.float32)
    x = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        ref = model(x).logits
    ours, _ = forward(params, x, config)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_missing_source_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        convert.main([str(tmp_path / "nope"), str(tmp_path / "out")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
