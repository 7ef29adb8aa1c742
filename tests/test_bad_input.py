"""A corpus of bad inputs over every command line: each one ends with exit status 2 and one line
`prog: error: ...` naming the culprit, no traceback, and no existing file changed.

Most cases call the script's `main(argv)` in this process (an import of torch per case would cost
seconds); `test_the_boundary_in_a_real_process` runs a few as real processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from script_module import load_script

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "aquila_fn" / "assets"
TINY = "dim=32,n_layers=2,n_heads=2,n_kv_heads=1,ffn_dim=64"

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the bad files


def _write_bad_files(d: Path) -> None:
    """Every broken input the table refers to, written once."""
    rng = np.random.default_rng(0)
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("\n\n   \n")
    (d / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve r\xe9sum\xe9.\n\nMore text.\n".encode("latin-1"))
    (d / "existing_file").write_text("keep me\n")
    (d / "junk.bin").write_bytes(rng.bytes(5000))
    (d / "empty.bin").write_bytes(b"")
    stories = (ASSETS / "stories260K.bin").read_bytes()
    (d / "truncated.bin").write_bytes(stories[:1000])
    (d / "junk.model").write_text("not a sentencepiece model\n")
    (d / "junk.jsonl").write_text('{"a": 1}\n')
    (d / "empty_dir").mkdir()
    # configs
    (d / "cfg_missing.json").write_text('{"dim": 64}')
    (d / "cfg_badjson.json").write_text('{"dim": 64,')
    (d / "cfg_list.json").write_text("[1, 2, 3]")
    (d / "cfg_badtype.json").write_text(json.dumps(
        {"dim": "wide", "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "vocab_size": 512}))
    (d / "cfg_badfloat.json").write_text(json.dumps(
        {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64, "vocab_size": 512,
         "norm_eps": "small"}))
    (d / "cfg_hf_badtheta.json").write_text(json.dumps(
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 512, "rope_theta": "ten thousand"}))
    (d / "cfg_latin1.json").write_bytes(b'{"dim": 64, "name": "caf\xe9"}')
    # records
    (d / "bad_line.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    (d / "no_key.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (d / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (d / "scalar.json").write_text("42")
    (d / "empty_list.json").write_text("[]")
    (d / "alpaca_no_output.json").write_text(json.dumps([{"instruction": "say hi", "input": ""}]))
    (d / "alpaca_two.json").write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}] * 2))
    (d / "junk.parquet").write_bytes(rng.bytes(300))
    (d / "boolq_bad.jsonl").write_text('{"question": "q", "passage": "p", "label": true}\nnot json\n')
    (d / "boolq_missing.jsonl").write_text('{"question": "q", "answer": true}\n')
    (d / "tokenizer_dir").mkdir()
    (d / "tokenizer_dir" / "tokenizer.json").write_text("{ not json")
    (d / "long_prompt.txt").write_text("Once upon a time " * 400 + "\n")
    _write_bad_models(d)


def _write_bad_models(d: Path) -> None:
    import torch

    from aquila_fn.training.checkpoint import save_checkpoint
    from aquila_fn.interop.hf import save_hf
    from aquila_fn.interop.llama2c import load_llama2c

    config, params = load_llama2c(ASSETS / "stories260K.bin")
    save_hf(d / "hf", config, params)
    for name in ("hf_noweights", "hf_junk", "hf_truncated"):
        (d / name).mkdir()
        (d / name / "config.json").write_bytes((d / "hf" / "config.json").read_bytes())
    weights = (d / "hf" / "model.safetensors").read_bytes()
    (d / "hf_junk" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    (d / "hf_truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    (d / "hf_badconfig").mkdir()
    (d / "hf_badconfig" / "config.json").write_text('{"hidden_size": 64')
    ckpt = save_checkpoint(d / "native", {"params": params}, step=1, metadata={"config": config.to_dict()})
    rank_file = Path(ckpt) / "rank00000.msgpack"
    (d / "native_truncated.msgpack").write_bytes(rank_file.read_bytes()[:40_000])
    corrupt = bytearray(rank_file.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (d / "native_corrupt.msgpack").write_bytes(bytes(corrupt))
    save_checkpoint(d / "native_noconfig", {"params": params}, step=1)
    run = d / "run_damaged" / "checkpoints" / "step_00000001"
    run.mkdir(parents=True)
    (run / "rank00000.msgpack").write_bytes(rank_file.read_bytes()[:40_000])
    prefix = d / "idx_truncated"
    from aquila_fn.data import IndexedDatasetBuilder
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for n in range(20):
            builder.add_document(list(range(1, 30 + n)))
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(idx.read_bytes()[:-7])
    with IndexedDatasetBuilder(d / "idx_oov", np.uint16) as builder:  # ids past a 512-token vocabulary
        for n in range(20):
            builder.add_document([500 + (13 * i + n) % 500 for i in range(40)])
    del torch


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    _write_bad_files(d)
    return d


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _stats(root: Path) -> dict[str, tuple]:
    """Size and modification time of the shipped assets (a write changes them; cheaper than hashing)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    script: str       # pretrain | generate | evaluate | finetune | preprocess_data | convert_checkpoint | plan
    argv: str         # {bad}: the bad files, {out}: a fresh path, {assets}: the shipped assets
    words: tuple      # what the error line must name

    def args(self, bad: Path, out: Path) -> list[str]:
        return [a.format(bad=bad, out=out, assets=ASSETS) for a in self.argv.split()]


def C(script: str, argv: str, *words: str) -> Case:
    return Case(script, argv, words)


PRETRAIN = (f"--config tiny --model-overrides {TINY} --steps 2 --batch-size 2 --seq-len 16 --samples 0 "
            "--eval-every 0 --no-progress --data-cache {out}/cache --tokenizer {assets}/tok512.model")
GEN = "--max-new-tokens 4"
EVAL = "--model {assets}/stories260K.bin --no-progress"
FT = "--model {assets}/stories260K.bin --steps 1 --batch-size 1 --seq-len 256 --no-progress"
PRE = "--tokenizer-model {assets}/tok512.model --no-progress"
PLAN = "--config tiny --model-overrides n_layers=2"

CASES = {
    # ---- pretrain: files
    "pretrain-empty-data": C("pretrain", f"{PRETRAIN} --data {{bad}}/empty.txt --out {{out}}/r", "empty.txt"),
    "pretrain-blank-data": C("pretrain", f"{PRETRAIN} --data {{bad}}/blank.txt --out {{out}}/r", "blank.txt"),
    "pretrain-missing-data": C("pretrain", f"{PRETRAIN} --data {{bad}}/nope.txt --out {{out}}/r", "nope.txt"),
    "pretrain-latin1-data": C("pretrain", f"{PRETRAIN} --data {{bad}}/latin1.txt --out {{out}}/r",
                              "latin1.txt", "UTF-8"),
    "pretrain-truncated-index": C("pretrain", f"{PRETRAIN} --data {{bad}}/idx_truncated --out {{out}}/r",
                                  "idx_truncated.idx", "truncated"),
    "pretrain-out-of-vocabulary-data": C("pretrain", f"{PRETRAIN} --data {{bad}}/idx_oov --out {{out}}/r",
                                         "outside the model's vocabulary", "512"),
    "pretrain-config-missing-fields": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_missing.json --out {{out}}/r",
                                        "cfg_missing.json", "n_layers"),
    "pretrain-config-bad-json": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_badjson.json --out {{out}}/r",
                                  "cfg_badjson.json", "JSON"),
    "pretrain-config-not-object": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_list.json --out {{out}}/r",
                                    "cfg_list.json", "object"),
    "pretrain-config-bad-type": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_badtype.json --out {{out}}/r",
                                  "dim", "wide"),
    "pretrain-config-bad-float": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_badfloat.json --out {{out}}/r",
                                   "norm_eps", "small"),
    "pretrain-config-hf-bad-float": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_hf_badtheta.json --out {{out}}/r",
                                      "rope_theta"),
    "pretrain-config-latin1": C("pretrain", f"{PRETRAIN} --config {{bad}}/cfg_latin1.json --out {{out}}/r",
                                "cfg_latin1.json", "UTF-8"),
    "pretrain-config-dir": C("pretrain", f"{PRETRAIN} --config {{bad}}/empty_dir --out {{out}}/r", "empty_dir"),
    "pretrain-tokenizer-junk": C("pretrain", f"{PRETRAIN} --tokenizer {{bad}}/junk.model --out {{out}}/r",
                                 "junk.model"),
    "pretrain-out-is-a-file": C("pretrain", f"{PRETRAIN} --out {{bad}}/existing_file", "existing_file", "--out"),
    "pretrain-out-under-a-file": C("pretrain", f"{PRETRAIN} --out {{bad}}/existing_file/run", "existing_file"),
    "pretrain-out-not-writable": C("pretrain", f"{PRETRAIN} --out /proc/aquila-run", "/proc"),
    "pretrain-resume-damaged": C("pretrain", f"{PRETRAIN} --out {{bad}}/run_damaged --resume",
                                 "run_damaged", "truncated"),
    # ---- pretrain: numbers, meshes
    "pretrain-zero-steps": C("pretrain", f"{PRETRAIN} --steps 0 --out {{out}}/r", "--steps", "0"),
    "pretrain-negative-batch": C("pretrain", f"{PRETRAIN} --batch-size -4 --out {{out}}/r", "--batch-size", "-4"),
    "pretrain-huge-seq-len": C("pretrain", f"{PRETRAIN} --seq-len 99999999999999999999999 --out {{out}}/r",
                               "--seq-len", "too large"),
    "pretrain-seq-len-past-context": C("pretrain", f"{PRETRAIN} --seq-len 100000 --out {{out}}/r", "max_seq_len"),
    "pretrain-huge-steps": C("pretrain", f"{PRETRAIN} --steps 1e30 --out {{out}}/r", "--steps", "1e30"),
    "pretrain-nan-lr": C("pretrain", f"{PRETRAIN} --lr nan --out {{out}}/r", "--lr", "nan"),
    "pretrain-beta-one": C("pretrain", f"{PRETRAIN} --adam-beta2 1 --out {{out}}/r", "--adam-beta2"),
    "pretrain-zero-keep": C("pretrain", f"{PRETRAIN} --keep 0 --out {{out}}/r", "--keep"),
    "pretrain-indivisible-micro-batch": C("pretrain", f"{PRETRAIN} --micro-batch-size 3 --out {{out}}/r",
                                          "--micro-batch-size 3"),
    "pretrain-bad-override": C("pretrain", f"{PRETRAIN} --model-overrides dim=wide --out {{out}}/r", "dim=wide"),
    "pretrain-unknown-override": C("pretrain", f"{PRETRAIN} --model-overrides depth=3 --out {{out}}/r", "depth"),
    "pretrain-bad-split": C("pretrain", f"{PRETRAIN} --split 9,one,1 --out {{out}}/r", "9,one,1"),
    "pretrain-heads-not-dividing": C("pretrain", f"{PRETRAIN} --model-overrides n_heads=3 --out {{out}}/r",
                                     "n_heads=3"),
    "pretrain-mesh-zero": C("pretrain", f"{PRETRAIN} --mesh dp=0 --out {{out}}/r", "--mesh", "dp=0"),
    "pretrain-mesh-unknown-axis": C("pretrain", f"{PRETRAIN} --mesh ep=2 --out {{out}}/r", "'ep'"),
    "pretrain-mesh-without-torchrun": C("pretrain", f"{PRETRAIN} --mesh tp=2 --out {{out}}/r", "tp=2", "1 process"),
    "pretrain-unknown-precision": C("pretrain", f"{PRETRAIN} --precision fp8 --out {{out}}/r", "fp8"),
    # ---- generate
    "generate-missing-model": C("generate", f"{GEN} --model {{bad}}/nope.bin", "nope.bin"),
    "generate-truncated-model": C("generate", f"{GEN} --model {{bad}}/truncated.bin", "truncated.bin", "truncated"),
    "generate-junk-model": C("generate", f"{GEN} --model {{bad}}/junk.bin", "junk.bin"),
    "generate-empty-model": C("generate", f"{GEN} --model {{bad}}/empty.bin", "empty.bin"),
    "generate-empty-dir-model": C("generate", f"{GEN} --model {{bad}}/empty_dir", "empty_dir"),
    "generate-hf-without-weights": C("generate", f"{GEN} --model {{bad}}/hf_noweights", "hf_noweights", "weights"),
    "generate-hf-junk-weights": C("generate", f"{GEN} --model {{bad}}/hf_junk", "model.safetensors"),
    "generate-hf-truncated-weights": C("generate", f"{GEN} --model {{bad}}/hf_truncated", "model.safetensors"),
    "generate-hf-bad-config": C("generate", f"{GEN} --model {{bad}}/hf_badconfig", "config.json", "JSON"),
    "generate-native-truncated": C("generate", f"{GEN} --model {{bad}}/native_truncated.msgpack",
                                   "native_truncated.msgpack", "truncated"),
    "generate-native-corrupt": C("generate", f"{GEN} --model {{bad}}/native_corrupt.msgpack",
                                 "native_corrupt.msgpack"),
    "generate-native-without-config": C("generate", f"{GEN} --model {{bad}}/native_noconfig", "config"),
    "generate-junk-tokenizer": C("generate", f"{GEN} --tokenizer {{bad}}/junk.model", "junk.model"),
    "generate-junk-tokenizer-json": C("generate", f"{GEN} --tokenizer {{bad}}/tokenizer_dir", "tokenizer.json"),
    "generate-missing-tokenizer": C("generate", f"{GEN} --tokenizer {{bad}}/nope.model", "nope.model"),
    "generate-tokenizer-past-vocab": C("generate", f"{GEN} --tokenizer {{assets}}/llama2_tokenizer.model",
                                       "32000", "512"),
    "generate-top-p-two": C("generate", f"{GEN} --top-p 2", "--top-p", "2"),
    "generate-top-p-zero": C("generate", f"{GEN} --top-p 0", "--top-p"),
    "generate-negative-temperature": C("generate", f"{GEN} --temperature -1", "--temperature"),
    "generate-negative-top-k": C("generate", f"{GEN} --top-k -5", "--top-k"),
    "generate-zero-repetition-penalty": C("generate", f"{GEN} --repetition-penalty 0", "--repetition-penalty"),
    "generate-zero-new-tokens": C("generate", "--max-new-tokens 0", "--max-new-tokens"),
    "generate-zero-beams": C("generate", f"{GEN} --num-beams 0", "--num-beams"),
    "generate-zero-threads": C("generate", f"{GEN} --threads 0", "--threads"),
    "generate-empty-batch-file": C("generate", f"{GEN} --batch-file {{bad}}/empty.txt", "empty.txt"),
    "generate-latin1-batch-file": C("generate", f"{GEN} --batch-file {{bad}}/latin1.txt", "latin1.txt", "UTF-8"),
    "generate-missing-batch-file": C("generate", f"{GEN} --batch-file {{bad}}/nope.txt", "nope.txt"),
    "generate-prompt-past-context": C("generate", f"{GEN} --batch-file {{bad}}/long_prompt.txt", "512"),
    # ---- evaluate
    "evaluate-unknown-task": C("evaluate", f"{EVAL} --task nope --data {{bad}}/empty.txt", "nope"),
    "evaluate-missing-data": C("evaluate", f"{EVAL} --task boolq --data {{bad}}/nope.jsonl", "nope.jsonl"),
    "evaluate-malformed-record": C("evaluate", f"{EVAL} --task boolq --data {{bad}}/boolq_bad.jsonl",
                                   "boolq_bad.jsonl:2"),
    "evaluate-record-missing-field": C("evaluate", f"{EVAL} --task boolq --data {{bad}}/boolq_missing.jsonl",
                                       "boolq_missing.jsonl", "passage"),
    "evaluate-latin1-data": C("evaluate", f"{EVAL} --task boolq --data {{bad}}/latin1.jsonl", "latin1.jsonl", "UTF-8"),
    "evaluate-empty-text": C("evaluate", f"{EVAL} --task perplexity --data {{bad}}/empty.txt", "empty.txt"),
    "evaluate-junk-model": C("evaluate", "--model {bad}/junk.bin --task boolq --data {assets}/boolq_val.jsonl",
                             "junk.bin"),
    "evaluate-junk-adapters": C("evaluate", f"{EVAL} --task boolq --data {{assets}}/boolq_val.jsonl "
                                "--adapters {bad}/junk.jsonl", "junk.jsonl"),
    "evaluate-negative-limit": C("evaluate", f"{EVAL} --task boolq --data {{assets}}/boolq_val.jsonl --limit -1",
                                 "--limit"),
    "evaluate-zero-batch": C("evaluate", f"{EVAL} --task boolq --data {{assets}}/boolq_val.jsonl --batch-size 0",
                             "--batch-size"),
    "evaluate-out-is-a-dir": C("evaluate", f"{EVAL} --task boolq --data {{assets}}/boolq_val.jsonl --limit 1 "
                               "--out {bad}/empty_dir", "empty_dir"),
    # ---- finetune
    "finetune-missing-data": C("finetune", f"{FT} --data {{bad}}/nope.json --out {{out}}/ft", "nope.json"),
    "finetune-bad-json": C("finetune", f"{FT} --data {{bad}}/cfg_badjson.json --out {{out}}/ft", "cfg_badjson.json"),
    "finetune-not-a-list": C("finetune", f"{FT} --data {{bad}}/scalar.json --out {{out}}/ft", "scalar.json", "list"),
    "finetune-no-records": C("finetune", f"{FT} --data {{bad}}/empty_list.json --out {{out}}/ft", "empty_list.json"),
    "finetune-record-missing-key": C("finetune", f"{FT} --data {{bad}}/alpaca_no_output.json --out {{out}}/ft",
                                     "alpaca_no_output.json", "output"),
    "finetune-latin1-data": C("finetune", f"{FT} --data {{bad}}/latin1.jsonl --out {{out}}/ft", "latin1.jsonl"),
    "finetune-junk-parquet": C("finetune", f"{FT} --data {{bad}}/junk.parquet --out {{out}}/ft", "junk.parquet"),
    "finetune-batch-past-data": C("finetune", f"{FT} --data {{bad}}/alpaca_two.json --batch-size 8 --out {{out}}/ft",
                                  "--batch-size 8", "2 examples"),
    "finetune-negative-rank": C("finetune", f"{FT} --data {{assets}}/alpaca_data_1k.json --lora-rank -1 "
                                "--out {out}/ft", "--lora-rank"),
    "finetune-zero-steps": C("finetune", f"{FT} --data {{assets}}/alpaca_data_1k.json --steps 0 --out {{out}}/ft",
                             "--steps"),
    "finetune-bad-target-regex": C("finetune", f"{FT} --data {{assets}}/alpaca_data_1k.json --lora-targets ( "
                                   "--out {out}/ft", "'('", "regular expression"),
    "finetune-out-is-a-file": C("finetune", f"{FT} --data {{assets}}/alpaca_data_1k.json --out {{bad}}/existing_file",
                                "existing_file"),
    "finetune-junk-model": C("finetune", "--model {bad}/truncated.bin --data {assets}/alpaca_data_1k.json "
                             "--out {out}/ft", "truncated.bin"),
    # ---- preprocess_data
    "preprocess-missing-input": C("preprocess_data", f"{PRE} --input {{bad}}/nope.jsonl --output-prefix {{out}}/p",
                                  "nope.jsonl"),
    "preprocess-latin1-text": C("preprocess_data", f"{PRE} --input {{bad}}/latin1.txt --output-prefix {{out}}/p",
                                "latin1.txt", "UTF-8"),
    "preprocess-malformed-line": C("preprocess_data", f"{PRE} --input {{bad}}/bad_line.jsonl --output-prefix {{out}}/p",
                                   "bad_line.jsonl:2", "JSON"),
    "preprocess-missing-key": C("preprocess_data", f"{PRE} --input {{bad}}/no_key.jsonl --output-prefix {{out}}/p",
                                "no_key.jsonl", "text"),
    "preprocess-junk-parquet": C("preprocess_data", f"{PRE} --input {{bad}}/junk.parquet --output-prefix {{out}}/p",
                                 "junk.parquet"),
    "preprocess-json-not-a-list": C("preprocess_data", f"{PRE} --input {{bad}}/scalar.json --output-prefix {{out}}/p",
                                    "scalar.json"),
    "preprocess-junk-tokenizer": C("preprocess_data", "--tokenizer-model {bad}/junk.model --input "
                                   "{assets}/tinystories.txt --output-prefix {out}/p", "junk.model"),
    "preprocess-zero-workers": C("preprocess_data", f"{PRE} --input {{assets}}/tinystories.txt --workers 0 "
                                 "--output-prefix {out}/p", "--workers"),
    "preprocess-output-under-a-file": C("preprocess_data", f"{PRE} --input {{assets}}/tinystories.txt "
                                        "--output-prefix {bad}/existing_file/p", "existing_file"),
    "preprocess-alpaca-from-text": C("preprocess_data", f"{PRE} --input {{assets}}/tinystories.txt --handler-name "
                                     "alpaca --output-prefix {out}/p", "tinystories.txt"),
    # ---- convert_checkpoint
    "convert-not-a-checkpoint": C("convert_checkpoint", "{bad}/junk.jsonl {out}/c", "junk.jsonl"),
    "convert-missing-source": C("convert_checkpoint", "{bad}/nope {out}/c", "nope"),
    "convert-truncated-llama2c": C("convert_checkpoint", "{bad}/truncated.bin {out}/c", "truncated.bin"),
    "convert-hf-without-weights": C("convert_checkpoint", "{bad}/hf_noweights {out}/c", "hf_noweights"),
    "convert-dest-is-a-file": C("convert_checkpoint", "{assets}/stories260K.bin {bad}/existing_file",
                                "existing_file"),
    "convert-dest-not-writable": C("convert_checkpoint", "{assets}/stories260K.bin /proc/aquila-out", "/proc"),
    "convert-wrong-forced-format": C("convert_checkpoint", "--from llama2c {bad}/native {out}/c", "native"),
    "convert-missing-tokenizer": C("convert_checkpoint", "{assets}/stories260K.bin {out}/c --tokenizer {bad}/nope",
                                   "nope"),
    "convert-bad-shard-size": C("convert_checkpoint", "{bad}/hf {out}/c --to hf --max-shard-size 0",
                                "--max-shard-size"),
    # ---- python -m parallel.plan
    "plan-mesh-zero": C("plan", "--config tiny --mesh dp=0", "dp=0"),
    "plan-mesh-not-a-number": C("plan", f"{PLAN} --mesh dp=two --batch-size 4 --seq-len 16", "two"),
    "plan-unknown-config": C("plan", "--config nope --mesh dp=2 --batch-size 4 --seq-len 16", "nope"),
    "plan-zero-batch": C("plan", f"{PLAN} --mesh dp=2 --batch-size 0 --seq-len 16", "--batch-size"),
    "plan-indivisible-batch": C("plan", f"{PLAN} --mesh dp=3 --batch-size 4 --seq-len 16", "4", "3"),
    "plan-free-axis-without-world": C("plan", f"{PLAN} --mesh dp=-1 --batch-size 4 --seq-len 16", "--world-size"),
    "plan-unknown-plugin": C("plan", f"{PLAN} --mesh dp=2 --batch-size 4 --seq-len 16 --model nope_plugin",
                             "nope_plugin"),
    "plan-bad-override": C("plan", "--config tiny --model-overrides dim=wide --mesh dp=2 --batch-size 4 "
                           "--seq-len 16", "dim=wide"),
    "plan-stages-past-layers": C("plan", f"{PLAN} --mesh pp=4 --batch-size 4 --seq-len 16", "2 layers", "4 pipeline"),
}


HEADER = re.compile(r"^\w+: device \S+.*, torch \S+$")


def _main(script: str):
    if script == "pretrain":
        from aquila_fn.jobs.pretrain import main
        return main
    if script == "plan":
        from parallel.plan import main
        return main
    return load_script(script).main


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    # besides the error, only the job's header (`pretrain: device cpu, ...`) may precede it
    lines = [line for line in err.splitlines() if line.strip() and not HEADER.match(line)]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and len(lines) == 1, err
    return errors[0]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_clear_line(name, bad, tmp_path, capsys):
    case = CASES[name]
    before = _digest(bad), _stats(ASSETS)
    with pytest.raises(SystemExit) as exc:
        _main(case.script)(case.args(bad, tmp_path))
    assert exc.value.code == 2
    line = _error_line(capsys.readouterr().err)
    for word in case.words:
        assert word in line, line
    assert (_digest(bad), _stats(ASSETS)) == before  # nothing the user had was changed


def test_the_corpus_covers_every_script():
    scripts = {case.script for case in CASES.values()}
    assert scripts == {"pretrain", "generate", "evaluate", "finetune", "preprocess_data",
                       "convert_checkpoint", "plan"}
    assert len(CASES) >= 60


def test_non_utf8_chat_input_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello\ncaf\xe9\n"), encoding="utf-8"))
    with pytest.raises(SystemExit) as exc:
        load_script("generate").main(["--interactive", "--max-new-tokens", "2"])
    assert exc.value.code == 2
    assert "<stdin>: not UTF-8 text" in _error_line(capsys.readouterr().err)


def test_a_bug_keeps_its_traceback(bad, monkeypatch):
    """The boundary handles the user's mistakes only: an unexpected exception propagates."""
    from aquila_fn.inference import loading

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(loading, "load_native", broken)
    with pytest.raises(KeyError, match="an internal bug"):
        load_script("generate").main(["--model", str(bad / "native"), "--max-new-tokens", "1"])


REAL_PROCESS = [
    (["scripts/generate.py", "--model", "{bad}/nope.bin"], "nope.bin"),
    (["scripts/pretrain.py", "--config", "{bad}/cfg_missing.json", "--out", "{out}/r"], "cfg_missing.json"),
    (["-m", "parallel.plan", "--config", "tiny", "--mesh", "dp=0"], "dp=0"),
]


def test_the_boundary_in_a_real_process(bad, tmp_path):
    """Exit status and stderr of real processes (started together: each pays torch's import)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [(subprocess.Popen([sys.executable, *(a.format(bad=bad, out=tmp_path) for a in argv)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), word)
             for argv, word in REAL_PROCESS]
    for proc, word in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        assert word in _error_line(err)
