"""Tokenizers: SentencePiece facts, round trips, BOS/EOS, byte-level BPE (Aquila layout) against an
independent reference implementation, streaming decode, loading errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aquila_fn.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    padded_vocab_size,
)

ASSETS = Path(__file__).resolve().parents[1] / "aquila_fn" / "assets"
TOK512 = ASSETS / "tok512.model"
LLAMA2 = ASSETS / "llama2_tokenizer.model"

ANALECTS = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"
TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    ANALECTS,
    "Mixed: 子曰 \"Hello\" -- tabs\tand\nnewlines, digits 12345, emoji 🙂.",
    "  leading and trailing spaces  ",
    "",
]
# Aquila's vocab.json ends with special tokens after its BPE entries (eos "</s>" last).
AQUILA_SPECIALS = ["<|endoftext|>", "<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>",
                   "[MASK]", "[gMASK]", "[sMASK]", "</s>"]


# ----------------------------------------------------------------------------- SentencePiece

@pytest.fixture(scope="module")
def tok512():
    return load_tokenizer(TOK512)


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(LLAMA2)


def test_tok512_facts(tok512):
    assert isinstance(tok512, SentencePieceTokenizer)
    assert (tok512.vocab_size, tok512.unk_id, tok512.bos_id, tok512.eos_id, tok512.pad_id) == (512, 0, 1, 2, None)


def test_llama2_hello_world(llama2):
    assert llama2.vocab_size == 32000
    assert llama2.encode("Hello world") == [15043, 3186]
    assert llama2.encode("Hello world", bos=True) == [1, 15043, 3186]
    assert llama2.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


@pytest.mark.parametrize("name", ["tok512", "llama2"])
@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(request, name, text):
    tok = request.getfixturevalue(name)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    expected = text
    if name == "tok512":
        # tok512 was trained with SentencePiece's default remove_extra_whitespaces: runs of
        # spaces collapse and leading/trailing spaces go (LLaMA's model keeps them).
        expected = " ".join(text.split(" ")).strip(" ")
        while "  " in expected:
            expected = expected.replace("  ", " ")
    assert tok.decode(ids) == expected
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == expected


def test_analects_round_trip_exact(tok512, llama2):
    for tok in (tok512, llama2):
        assert tok.decode(tok.encode(ANALECTS)) == ANALECTS
    # tok512 has no CJK pieces: every character falls back to its 3 UTF-8 bytes
    pieces = [tok512.id_to_piece(i) for i in tok512.encode("学")]
    assert pieces == ["▁", "<0xE5>", "<0xAD>", "<0xA6>"]


def test_bos_eos_and_tensor_decode(tok512):
    ids = tok512.encode("Once upon a time", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok512.decode(ids) == "Once upon a time"
    assert tok512.decode(torch.tensor(ids)) == "Once upon a time"
    assert tok512.encode_batch(["Once upon", "a time"], bos=True) == \
        [tok512.encode("Once upon", bos=True), tok512.encode("a time", bos=True)]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok512.decode([5, 512])


def test_piece_lookup(tok512):
    assert tok512.id_to_piece(1) == "<s>" and tok512.token_to_id("<s>") == 1
    assert tok512.token_to_id("</s>") == 2
    assert tok512.token_to_id("<unk>") == 0
    assert tok512.token_to_id("definitely-not-a-piece") is None


@pytest.mark.parametrize("name", ["tok512", "llama2"])
def test_stream_decoder_matches_decode(request, name):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tok.encode(text, bos=True)
        sd = tok.stream_decoder()
        chunks = [sd.push(i) for i in ids]
        assert "".join(chunks) + sd.flush() == tok.decode(ids)
        assert all("\ufffd" not in c for c in chunks)


# ----------------------------------------------------------------------------- byte-level BPE

def _train_bpe(vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (ASSETS / "tinystories.txt").read_text(encoding="utf-8")[:60_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text, ANALECTS * 4], trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    """Two directories holding the same small byte-level BPE:
    aquila/  vocab.json (BPE entries, then AQUILA_SPECIALS appended) + merges.txt
             + special_tokens_map.json (bos <|endoftext|>, eos </s>), as Aquila ships it;
    json/    one tokenizer.json with the same specials added after training."""
    from tokenizers import AddedToken

    tok = _train_bpe()
    aquila = tmp_path_factory.mktemp("aquila")
    tok.model.save(str(aquila))
    vocab = json.loads((aquila / "vocab.json").read_text(encoding="utf-8"))
    n = len(vocab)
    for i, s in enumerate(AQUILA_SPECIALS):
        vocab[s] = n + i
    (aquila / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (aquila / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "</s>", "unk_token": "<|endoftext|>"}))
    js = tmp_path_factory.mktemp("json")
    tok.add_special_tokens([AddedToken(s, special=True) for s in AQUILA_SPECIALS])
    tok.save(str(js / "tokenizer.json"))
    (js / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "</s>", "pad_token": "[MASK]"}))
    return aquila, js, n


def _reference_bpe(aquila: Path):
    """GPT-2's original encoder (bytes -> unicode, regex split, greedy lowest-rank merges),
    written out here as an independent reference for the byte-level path."""
    regex = pytest.importorskip("regex")
    vocab = json.loads((aquila / "vocab.json").read_text(encoding="utf-8"))
    lines = (aquila / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split(" ")): r for r, line in enumerate(lines) if line}
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    byte_enc = {b: chr(c) for b, c in zip(bs, cs)}
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            if r == 1 << 30:
                break
            first, second = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):
                if j < len(parts) - 1 and parts[j] == first and parts[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return parts

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        special = regex.compile("(" + "|".join(regex.escape(s) for s in AQUILA_SPECIALS) + ")")
        for seg in special.split(text):
            if seg in AQUILA_SPECIALS:
                ids.append(vocab[seg])
                continue
            for word in pat.findall(seg):
                ids += [vocab[p] for p in bpe("".join(byte_enc[b] for b in word.encode("utf-8")))]
        return ids

    return encode


BPE_TEXTS = TEXTS + [
    "The end.</s>Next story<|endoftext|>",
    "A [MASK] token and a [gMASK] one; not [masked].",
    "It's what they'll do, we've said I'm sure you'd agree.",
]


def test_bpe_vocab_merges_special_tokens(bpe_dirs):
    aquila, _, n = bpe_dirs
    tok = load_tokenizer(aquila)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == n + len(AQUILA_SPECIALS)
    assert tok.eos_id == n + 7 == tok.token_to_id("</s>")  # like Aquila's 100007
    assert tok.bos_id == n == tok.token_to_id("<|endoftext|>")
    assert tok.pad_id is None
    # special tokens are matched whole in text ...
    ids = tok.encode("The end.</s>")
    assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
    # ... and dropped by decode
    assert tok.decode(tok.encode("The end.</s>", bos=True, eos=True)) == "The end."


def test_bpe_matches_reference_encoder(bpe_dirs):
    aquila, _, _ = bpe_dirs
    tok = load_tokenizer(aquila)
    ref = _reference_bpe(aquila)
    story = (ASSETS / "tinystories.txt").read_text(encoding="utf-8")[100_000:104_000]
    for text in BPE_TEXTS + [story]:
        assert tok.encode(text) == ref(text), text


@pytest.mark.parametrize("text", TEXTS + [ANALECTS * 3])
def test_bpe_round_trip(bpe_dirs, text):
    aquila, js, _ = bpe_dirs
    for tok in (load_tokenizer(aquila), load_tokenizer(js)):
        assert tok.decode(tok.encode(text)) == text
        ids = tok.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == text
        sd = tok.stream_decoder()
        assert "".join(sd.push(i) for i in ids) + sd.flush() == text


def test_tokenizer_json_agrees_with_vocab_merges(bpe_dirs):
    aquila, js, n = bpe_dirs
    a, b = load_tokenizer(aquila), load_tokenizer(js / "tokenizer.json")
    assert isinstance(b, HFTokenizer)
    assert (b.vocab_size, b.bos_id, b.eos_id, b.pad_id) == (n + 8, n, n + 7, n + 4)
    for text in BPE_TEXTS:
        assert a.encode(text, bos=True, eos=True) == b.encode(text, bos=True, eos=True)
    assert a.encode_batch(BPE_TEXTS) == [a.encode(t) for t in BPE_TEXTS]


def test_load_by_file_name(bpe_dirs, tmp_path):
    aquila, js, n = bpe_dirs
    assert load_tokenizer(aquila / "vocab.json").eos_id == n + 7
    assert load_tokenizer(aquila / "merges.txt").eos_id == n + 7
    # a directory with tokenizer.model picks SentencePiece
    d = tmp_path / "llama_dir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(LLAMA2.read_bytes())
    assert load_tokenizer(d).encode("Hello world") == [15043, 3186]
    # overrides pick roles by name or id
    t = load_tokenizer(aquila, eos_token="<|endofpiece|>", pad_token=0)
    assert (t.eos_id, t.pad_id) == (n + 2, 0)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(aquila, eos_token="<nope>")


def test_bpe_without_side_files_guesses_roles(bpe_dirs, tmp_path):
    aquila, _, n = bpe_dirs
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((aquila / name).read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == n + 7 and tok.bos_id == n  # "</s>"; "<|endoftext|>"
    assert tok.encode("a</s>")[-1] == n + 7


def test_side_file_names_missing_from_vocab_are_ignored(bpe_dirs, tmp_path):
    aquila, _, n = bpe_dirs
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((aquila / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad-not-in-vocab>", "unk_token": "<unk>"}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id, tok.unk_id) == (n + 7, None, None)


# ----------------------------------------------------------------------------- errors

def test_missing_paths_are_named(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer(missing)


def test_corrupt_files_are_named(tmp_path):
    bad = tmp_path / "broken.model"
    bad.write_bytes(b"\x00\x01 this is not a protobuf" * 10)
    with pytest.raises(TokenizerError, match="broken.model"):
        load_tokenizer(bad)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(TOK512.read_bytes()[:3000])
    with pytest.raises(TokenizerError, match="truncated.model"):
        load_tokenizer(truncated)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(bad_json)


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')  # merges.txt missing
    with pytest.raises(TokenizerError, match="vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")


def test_bad_merges_line(tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match="merges.txt:2"):
        load_tokenizer(tmp_path)


def test_padded_vocab_size():
    assert padded_vocab_size(100008) == 100096
    assert padded_vocab_size(512) == 512
    assert padded_vocab_size(32000) == 32000
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(100008, multiple=128, tp_size=8) == 100352
    assert padded_vocab_size(1, multiple=64) == 64
    with pytest.raises(ValueError):
        padded_vocab_size(0)
