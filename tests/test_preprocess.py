"""scripts/preprocess_data.py end to end, run in-process through main(argv)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from aquila_fn import data as D
from aquila_fn.data.tokenizer import load_tokenizer

from script_module import load_script

DOCS = ["Once upon a time there was a dog.", "The dog liked to run.\nIt ran fast.", "The end."]


@pytest.fixture(scope="module")
def pp():
    return load_script("preprocess_data")


@pytest.fixture(scope="module")
def tok_path(assets):
    return str(assets / "tok512.model")


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


def _run(pp, tok_path, *args):
    return pp.main([*map(str, args), "--tokenizer-model", tok_path, "--no-progress"])


def _documents(prefix):
    ds = D.MMapIndexedDataset(prefix)
    return [ds.document(d).tolist() for d in range(ds.num_documents)], ds


def test_raw_text(pp, tok_path, tok, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(DOCS) + "\n")
    (prefix,) = _run(pp, tok_path, "--input", src, "--output-prefix", tmp_path / "out", "--append-eod")
    assert prefix == str(tmp_path / "out_text_document")
    docs, ds = _documents(prefix)
    assert docs == [tok.encode(t, eos=True) for t in DOCS]
    assert ds.dtype == np.uint16  # 512 ids: Megatron's choice


def test_jsonl_with_chosen_key_and_workers(pp, tok_path, tok, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(DOCS * 20)))
    (one,) = _run(pp, tok_path, "--input", src, "--json-key", "body", "--output-prefix", tmp_path / "a",
                  "--dtype", "int32")
    (two,) = _run(pp, tok_path, "--input", src, "--json-keys", "body", "--output-prefix", tmp_path / "b",
                  "--dtype", "int32", "--workers", "2", "--chunk-size", "7")
    assert one.endswith("a_body_document")
    docs, ds = _documents(one)
    assert docs == [tok.encode(t) for t in DOCS * 20] and ds.dtype == np.int32
    # the worker pool keeps document order: identical bytes
    for ext in (".bin", ".idx"):
        assert Path(one + ext).read_bytes() == Path(two + ext).read_bytes()


def test_parquet(pp, tok_path, tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), src, row_group_size=2)
    (prefix,) = _run(pp, tok_path, "--input", src, "--output-prefix", tmp_path / "pq", "--append-eod")
    docs, _ = _documents(prefix)
    assert docs == [tok.encode(t, eos=True) for t in DOCS]


def test_alpaca_packed_datasets(pp, tok_path, tok, tmp_path, assets):
    records = json.loads((assets / "alpaca_data_1k.json").read_text())[:12]
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(records))
    (prefix,) = _run(pp, tok_path, "--input", src, "--handler-name", "GeneralInstructionHandler",
                     "--output-prefix", tmp_path / "alp", "--append-eod", "--seq-length", "300")
    assert prefix == str(tmp_path / "alp_packed")
    for key in ("input_ids", "attention_mask", "labels"):
        assert (tmp_path / f"alp_packed_{key}_document.bin").is_file()
        assert (tmp_path / f"alp_packed_{key}_document.idx").is_file()
    ds = D.InstructionDataset(tmp_path / "alp")
    assert len(ds) == 12
    for i, record in enumerate(records):
        expected = D.encode_instruction(record, tok, 300)
        got = ds[i]
        assert {k: v.tolist() for k, v in got.items()} == expected
        n_prompt = len(tok.encode(D.format_alpaca_prompt(record)[0], bos=True))
        assert (got["labels"][:n_prompt] == -100).all()


def _error(capsys, run) -> str:
    with pytest.raises(SystemExit) as exc:
        run()
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_errors_are_one_line_messages(pp, tok_path, tmp_path, capsys):
    err = _error(capsys, lambda: _run(pp, tok_path, "--input", tmp_path / "missing.jsonl",
                                      "--output-prefix", tmp_path / "x"))
    assert re.search(r"error: .*missing\.jsonl: input file not found", err)
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"other": "b"}\n')
    err = _error(capsys, lambda: _run(pp, tok_path, "--input", src, "--output-prefix", tmp_path / "x"))
    assert re.search(r"in\.jsonl:2: missing key\(s\) \['text'\]", err)
    assert not list(tmp_path.glob("x_*"))  # no half-written dataset left behind
    src.write_text('{"text": "a"}\n')
    err = _error(capsys, lambda: pp.main(["--input", str(src), "--output-prefix", str(tmp_path / "y"),
                                          "--no-progress", "--tokenizer-model", tok_path, "--dtype", "uint8",
                                          "--append-eod"]))
    assert re.search(r"token id .* does not fit in uint8", err)


def test_help_lists_the_options(pp, capsys):
    with pytest.raises(SystemExit):
        pp.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--json-keys", "--append-eod", "--workers", "--handler-name", "--tokenizer-model"):
        assert flag in out
