"""Fine-tuning: instruction data loading and masking, the LoRA / full SFT loop, scripts/finetune.py."""

import json
from pathlib import Path

import pytest
import torch

from aquila_fn import data
from aquila_fn.core import pytree
from aquila_fn.training.checkpoint import load_checkpoint
from aquila_fn.core.config import get_config
from aquila_fn.evaluation.evaluate import load_model_and_tokenizer
from aquila_fn.jobs.finetune import (FinetuneConfig, batches, finetune, load_instruction_examples,
                                load_instruction_records)
from aquila_fn.training.lora import load_adapters
from aquila_fn.core.model import init_params
from aquila_fn.data.tokenizer import load_tokenizer

from script_module import load_script

RECORDS = [{"instruction": "Say hi.", "input": "", "output": "Hi!"},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
           {"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Repeat: cat", "input": "", "output": "cat"}]


@pytest.fixture(scope="module")
def tok(assets):
    return load_tokenizer(assets / "tok512.model")


def test_records_from_json_and_jsonl(tmp_path, assets):
    assert len(load_instruction_records(assets / "alpaca_data_1k.json")) == 1000
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert load_instruction_records(path) == RECORDS
    path.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(data.DataError, match=r"d\.jsonl: record 0 lacks \['output'\]"):
        load_instruction_records(path)
    with pytest.raises(data.DataError, match="not found"):
        load_instruction_records(tmp_path / "none.json")


def test_prompt_tokens_are_masked_in_batches(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    examples = load_instruction_examples(path, tok, seq_len=512)
    batch = next(batches(examples, 2, pad_id=0, seed=0))
    for b in range(2):
        ids, labels, mask = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b]
        counted = (labels != -100).nonzero().flatten()
        prompt_len = int(counted[0])  # the first counted label is the first response token
        # targets are the next input tokens (shifted) and only the response (+ EOS) is counted
        assert torch.equal(labels[counted[:-1]], ids[counted[:-1] + 1])
        text = tok.decode(labels[counted].tolist())
        assert any(text.strip() == r["output"] for r in RECORDS)
        assert "### Response:" in tok.decode(ids[:prompt_len + 1].tolist())
        assert bool(mask[:int(counted[-1]) + 1].all())


def test_preprocessed_instruction_dataset_matches_raw_records(tmp_path, tok):
    raw = tmp_path / "d.json"
    raw.write_text(json.dumps(RECORDS))
    prefix = data.build_instruction_datasets(RECORDS, tok, tmp_path / "alpaca", max_len=None)
    from_packed = load_instruction_examples(prefix, tok, seq_len=512)
    from_raw = load_instruction_examples(raw, tok, seq_len=512)
    assert [list(map(int, e["input_ids"])) for e in from_packed] == [e["input_ids"] for e in from_raw]
    assert [list(map(int, e["labels"])) for e in from_packed] == [e["labels"] for e in from_raw]
    with pytest.raises(data.DataError, match="neither an instruction file"):
        load_instruction_examples(tmp_path / "nothing", tok, seq_len=64)


def test_full_sft_trains_every_parameter(tok):
    config = get_config("tiny").replace(vocab_size=512)
    params = init_params(config, seed=0)
    before = {k: v.clone() for k, v in pytree.flatten_dict(params).items()}
    examples = [data.encode_instruction(r, tok, max_len=config.max_seq_len + 1) for r in RECORDS]
    result = finetune(config, params, examples, FinetuneConfig(lora_rank=0, steps=3, lr=1e-3, batch_size=2))
    after = pytree.flatten_dict(result["trainable"])
    assert after.keys() == before.keys()
    assert all(not torch.equal(after[k], before[k]) for k in before if k.endswith(("wq", "w_down", "embed")))
    assert [m["step"] for m in result["metrics"]] == [1, 2, 3]


def test_finetune_cli_lora_then_evaluate_with_adapters(assets, tmp_path, capsys):
    out = tmp_path / "lora"
    rc = load_script("finetune").main([
        "--model", str(assets / "stories260K.bin"), "--data", str(assets / "alpaca_data_1k.json"),
        "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", r"attn\.(wq|wk|wv)$", "--steps", "3",
        "--lr", "1e-3", "--batch-size", "2", "--seq-len", "256", "--seed", "1", "--out", str(out),
        "--merge", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "lora" and summary["steps"] == 3
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all("loss" in x and "lr" in x for x in lines)
    adapters, info = load_adapters(out / "adapters")
    assert info["rank"] == 4 and info["alpha"] == 8 and info["step"] == 3 and len(info["paths"]) == 15
    # the merged checkpoint and base + adapters load to the same weights
    _, with_adapters, _ = load_model_and_tokenizer(assets / "stories260K.bin", adapters_path=out / "adapters")
    merged, meta = load_checkpoint(summary["merged"])
    for (k, x), y in zip(pytree.named_leaves(with_adapters), pytree.leaves(merged["params"])):
        assert torch.equal(x, y), k
    rc = load_script("evaluate").main([
        "--task", "boolq", "--data", str(assets / "boolq_val.jsonl"), "--model", str(assets / "stories260K.bin"),
        "--adapters", str(out / "adapters"), "--limit", "4", "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["n"] == 4


def test_finetune_cli_full_writes_a_loadable_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "full"
    rc = load_script("finetune").main([
        "--model", str(assets / "stories260K.bin"), "--data", str(assets / "alpaca_data_1k.json"),
        "--lora-rank", "0", "--steps", "2", "--batch-size", "2", "--seq-len", "256", "--out", str(out),
        "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["mode"] == "full" and Path(summary["checkpoint"]).name == "step_00000002"
    config, params, tokenizer = load_model_and_tokenizer(summary["checkpoint"])  # tokenizer from metadata
    assert config.dim == 64 and tokenizer.vocab_size == 512
    with pytest.raises(SystemExit) as exc:
        load_script("finetune").main(["--model", str(assets / "stories260K.bin"), "--data",
                                      str(tmp_path / "missing.json"), "--out", str(out)])
    assert exc.value.code == 2 and "missing.json" in capsys.readouterr().err
