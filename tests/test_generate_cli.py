"""scripts/generate.py end to end, in process: stdout is prompt + completion, stderr the statistics."""

import io
import re
from pathlib import Path

import pytest

from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "aquila_fn" / "assets"


cli = load_script("generate")


pytestmark = pytest.mark.usefixtures("one_thread")


def llama2c_reference() -> str:
    """The greedy stories260K text recorded in assets/SOURCES.md (markdown-wrapped, literal \\n)."""
    sources = (ASSETS / "SOURCES.md").read_text()
    quoted = re.search(r'prompt\s+"Once upon a time"\):\s*`([^`]*)`', sources).group(1)
    return quoted.replace("\n", " ").replace("\\n", "\n")


def run(capsys, *argv):
    assert cli.main(list(argv)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_stories260k_greedy_matches_llama2c(capsys):
    # llama2.c's 64 steps include the 4 prompt tokens after BOS: 60 sampled tokens.
    out, err = run(capsys, "--prompt", "Once upon a time", "--max-new-tokens", "60")
    assert out == llama2c_reference() + "\n"
    assert re.search(r"prefill: 5 tokens in [\d.]+ ms \| decode: 59 tokens in [\d.]+ s \([\d.]+ tokens/s\)", err)
    # --compile auto: a toy model's 59 steps do not repay compiling (no background build in tests)
    assert re.search(r"compile: off \(59 decode steps would save ~[\d.]+ s, compiling takes ~\d+ s\)", err)
    assert re.search(r"warm-up: [\d.]+ s", err)


def test_sampling_is_seeded(capsys):
    args = ["--prompt", "Once upon a time", "--max-new-tokens", "30", "--temperature", "0.9",
            "--top-k", "40", "--top-p", "0.9", "--repetition-penalty", "1.1"]
    a, _ = run(capsys, *args, "--seed", "5")
    b, _ = run(capsys, *args, "--seed", "5")
    c, _ = run(capsys, *args, "--seed", "6")
    assert a == b != c and a.startswith("Once upon a time")


def test_stop_string(capsys):
    out, _ = run(capsys, "--prompt", "Once upon a time", "--max-new-tokens", "60", "--stop", "Lily")
    assert out == "Once upon a time, there was a little girl named \n"


def test_beam_search(capsys):
    out, err = run(capsys, "--prompt", "Once upon a time", "--max-new-tokens", "20", "--num-beams", "3",
                   "--length-penalty", "1.0", "--early-stopping", "true")
    assert out.startswith("Once upon a time,") and "tokens/s" in err


def test_batch_file_int8_bf16(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe dog\n")
    out, _ = run(capsys, "--batch-file", str(prompts), "--max-new-tokens", "12", "--quantize", "int8",
                 "--dtype", "bfloat16")
    blocks = out.split("\n\n")
    assert len(blocks) == 2 and blocks[0].startswith("Once upon a time") and blocks[1].startswith("The dog ")


def test_hf_directory_and_tokenizer_flag(capsys, tmp_path):
    from aquila_fn.inference.generate import load_model
    from aquila_fn.interop.hf import save_hf
    config, params, _ = load_model()
    save_hf(tmp_path, config, params)
    out, _ = run(capsys, "--model", str(tmp_path), "--tokenizer", str(ASSETS / "tok512.model"),
                 "--prompt", "Once upon a time", "--max-new-tokens", "60")
    assert out == llama2c_reference() + "\n"


def test_interactive_chat(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nTell me a story\n"))
    out, err = run(capsys, "--interactive", "--max-new-tokens", "8", "--temperature", "0.5")
    assert out.count("###Human: ") == 3 and out.count("###Assistant:") == 2
    assert err.count("tokens/s") == 2


def test_missing_tokenizer_is_an_error(tmp_path, capsys):
    from aquila_fn.inference.generate import load_model
    from aquila_fn.interop.hf import save_hf
    config, params, _ = load_model()
    save_hf(tmp_path, config, params)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--model", str(tmp_path)])
    assert exc.value.code == 2 and "pass --tokenizer" in capsys.readouterr().err
