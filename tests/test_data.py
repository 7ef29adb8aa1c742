"""Megatron indexed datasets, the GPT sampler, raw-text caching and Alpaca prompt masking."""

import os
import struct

import numpy as np
import pytest
import torch

from aquila_fn import data as D
from aquila_fn.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(assets):
    return load_tokenizer(assets / "tok512.model")


def _build(prefix, documents, dtype=np.int32):
    """documents: list of documents, each a list of sequences (lists of ids)."""
    with D.IndexedDatasetBuilder(prefix, dtype) as b:
        for doc in documents:
            for seq in doc:
                b.add_item(seq)
            b.end_document()
    return str(prefix)


# ----------------------------------------------------------------------------------------------
# On-disk format


def test_bin_and_idx_bytes_equal_hand_computed_megatron_layout(tmp_path):
    # doc 0: one sequence [5, 6, 7]; doc 1: two sequences [8] and [9, 10]; doc 2: [65535]
    prefix = _build(tmp_path / "ds", [[[5, 6, 7]], [[8], [9, 10]], [[65535]]], np.uint16)
    assert (tmp_path / "ds.bin").read_bytes() == struct.pack("<7H", 5, 6, 7, 8, 9, 10, 65535)
    expected_idx = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)              # version
        + struct.pack("<B", 8)              # dtype code: uint16
        + struct.pack("<Q", 4)              # sequences
        + struct.pack("<Q", 4)              # document indices (documents + 1)
        + struct.pack("<4i", 3, 1, 2, 1)    # sequence lengths
        + struct.pack("<4q", 0, 6, 8, 12)   # byte pointers
        + struct.pack("<4q", 0, 1, 3, 4)    # document indices
    )
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx
    ds = D.MMapIndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [[5, 6, 7], [8], [9, 10], [65535]]
    assert ds.num_documents == 3 and ds.document(1).tolist() == [8, 9, 10]
    assert ds.document_lengths().tolist() == [3, 3, 1]


@pytest.mark.parametrize("dtype,code", [(np.uint8, 1), (np.int8, 2), (np.int16, 3), (np.int32, 4),
                                        (np.int64, 5), (np.float64, 6), (np.float32, 7), (np.uint16, 8)])
def test_megatron_dtype_codes(tmp_path, dtype, code):
    _build(tmp_path / "d", [[[1, 2]]], dtype)
    assert (tmp_path / "d.idx").read_bytes()[17] == code
    assert D.MMapIndexedDataset(tmp_path / "d").dtype == np.dtype(dtype)


def test_best_dtype_follows_megatron():
    assert D.best_dtype(512) is np.uint16 and D.best_dtype(65499) is np.uint16
    assert D.best_dtype(100008) is np.int32


def test_token_id_too_large_for_dtype(tmp_path):
    with pytest.raises(D.DataError, match=r"ds\.bin: token id 70000 does not fit in uint16"):
        with D.IndexedDatasetBuilder(tmp_path / "ds", np.uint16) as b:
            b.add_document([1, 70000])
    assert not list(tmp_path.iterdir())  # the partial files were removed


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(D.DataError, match=r"nothere\.idx: file not found"):
        D.MMapIndexedDataset(tmp_path / "nothere")
    prefix = _build(tmp_path / "ds", [[[1, 2, 3]], [[4, 5]]])
    idx, bin_ = tmp_path / "ds.idx", tmp_path / "ds.bin"
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    idx.write_bytes(b"NOTANIDX!" + good_idx[9:])
    with pytest.raises(D.DataError, match=r"ds\.idx: wrong magic"):
        D.MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx[:-5])
    with pytest.raises(D.DataError, match=r"ds\.idx: truncated index"):
        D.MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx[:20])
    with pytest.raises(D.DataError, match=r"ds\.idx: truncated header"):
        D.MMapIndexedDataset(prefix)
    idx.write_bytes(good_idx)
    bin_.write_bytes(good_bin[:-4])
    with pytest.raises(D.DataError, match=r"ds\.bin: truncated data file"):
        D.MMapIndexedDataset(prefix)


def test_builder_accepts_tensors_and_split_documents(tmp_path):
    with D.IndexedDatasetBuilder(tmp_path / "t", np.int32) as b:
        b.add_document(torch.tensor([1, 2, 3, 4]), lengths=[1, 3])
    ds = D.MMapIndexedDataset(tmp_path / "t")
    assert [ds[i].tolist() for i in range(2)] == [[1], [2, 3, 4]]
    assert ds.document_indices.tolist() == [0, 2]


# ----------------------------------------------------------------------------------------------
# GPT dataset


@pytest.fixture()
def numbered(tmp_path):
    """40 documents; document d holds tokens d*100 .. d*100 + 4 + d % 7 (every token is unique)."""
    docs = [[list(range(d * 100, d * 100 + 5 + d % 7))] for d in range(40)]
    return D.MMapIndexedDataset(_build(tmp_path / "num", docs))


def test_split_matches_megatron_rounding():
    assert D.split_range("969,30,1", 1000, "train") == (0, 969)
    assert D.split_range("969,30,1", 1000, "valid") == (969, 999)
    assert D.split_range("969,30,1", 1000, "test") == (999, 1000)
    # rounding error is taken off the end: 3 documents, 1/3 each
    assert [D.split_range("1,1,1", 3, n) for n in ("train", "valid", "test")] == [(0, 1), (1, 2), (2, 3)]
    assert D.split_range("8,2", 10, "test") == (10, 10)
    with pytest.raises(D.DataError):
        D.parse_split("1,-1")


def test_gpt_samples_are_windows_of_the_packed_stream(numbered):
    ds = D.GPTDataset(numbered, seq_len=8, seed=0, split="1", shuffle=False)
    stream = np.concatenate([numbered.document(d) for d in range(40)])
    assert len(ds) == (len(stream) - 1) // 8
    for i in range(len(ds)):
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (9,)
        assert sample.tolist() == stream[i * 8:i * 8 + 9].tolist()


def test_gpt_documents_of_several_sequences_stay_whole(tmp_path):
    ds = D.MMapIndexedDataset(_build(tmp_path / "m", [[[1, 2], [3]], [[4]], [[5, 6], [7, 8, 9]]]))
    gpt = D.GPTDataset(ds, seq_len=2, seed=0, split="1", shuffle=False)
    assert [gpt[i].tolist() for i in range(len(gpt))] == [[1, 2, 3], [3, 4, 5], [5, 6, 7], [7, 8, 9]]


def test_gpt_dataset_is_deterministic_and_seeded(numbered):
    a = D.GPTDataset(numbered, 8, seed=1, split="1")
    b = D.GPTDataset(numbered, 8, seed=1, split="1")
    c = D.GPTDataset(numbered, 8, seed=2, split="1")
    sa = [a[i].tolist() for i in range(len(a))]
    assert sa == [b[i].tolist() for i in range(len(b))]
    assert sa != [c[i].tolist() for i in range(len(c))]
    # a shuffled epoch is a permutation of the windows of a shuffled document stream:
    # every sample is contiguous within documents, and together they cover distinct starts
    assert len({tuple(s) for s in sa}) == len(sa)


def test_gpt_splits_use_disjoint_documents(numbered):
    parts = {name: D.GPTDataset(numbered, 4, seed=0, split="30,8,2", name=name)
             for name in ("train", "valid", "test")}
    docs = {name: {int(t) // 100 for i in range(len(ds)) for t in ds[i]} for name, ds in parts.items()}
    assert docs["train"] <= set(range(0, 30))
    assert docs["valid"] <= set(range(30, 38))
    assert docs["test"] <= set(range(38, 40))


def test_gpt_epochs_cycle_with_fresh_orders(numbered):
    one = D.GPTDataset(numbered, 8, seed=3, split="1")
    n = one.samples_per_epoch
    ds = D.GPTDataset(numbered, 8, seed=3, split="1", num_samples=2 * n + 5)
    assert len(ds) == 2 * n + 5 and ds.num_epochs == 3
    assert [ds[i].tolist() for i in range(n)] == [one[i].tolist() for i in range(n)]
    epoch0 = [ds[i].tolist() for i in range(n)]
    epoch1 = [ds[i].tolist() for i in range(n, 2 * n)]
    assert epoch0 != epoch1  # a new shuffle per epoch
    for epoch in (epoch0, epoch1):  # each epoch uses all documents once
        tokens = {t for s in epoch for t in s}
        assert {t // 100 for t in tokens} == set(range(40))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_gpt_split_too_small_is_a_clear_error(numbered):
    with pytest.raises(D.DataError, match="test split .* fewer than one sample"):
        D.GPTDataset(numbered, 64, seed=0, split="39,1,0.001", name="test")


def test_batch_iterator_resumes_exactly(numbered):
    ds = D.GPTDataset(numbered, 8, seed=0, split="1", num_samples=60)
    full = list(D.batch_iterator(ds, 4))
    assert [pos for pos, _ in full] == list(range(4, 61, 4))
    b = full[0][1]
    assert b["input_ids"].shape == (4, 8) and b["input_ids"].dtype == torch.long
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    position = full[5][0]
    resumed = list(D.batch_iterator(ds, 4, start=position))
    assert len(resumed) == len(full) - 6
    for (p1, b1), (p2, b2) in zip(full[6:], resumed):
        assert p1 == p2 and torch.equal(b1["input_ids"], b2["input_ids"])
        assert torch.equal(b1["labels"], b2["labels"])


def test_batch_iterator_data_parallel_slices(numbered):
    ds = D.GPTDataset(numbered, 8, seed=0, split="1")
    (_, whole), = list(D.batch_iterator(ds, 4, stop=4))
    (_, r0), = list(D.batch_iterator(ds, 4, stop=4, dp_rank=0, dp_size=2))
    (_, r1), = list(D.batch_iterator(ds, 4, stop=4, dp_rank=1, dp_size=2))
    assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), whole["input_ids"])


# ----------------------------------------------------------------------------------------------
# Raw text and records


def test_prepare_text_dataset_tokenises_once(tmp_path, tok):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe cat sat on the mat.\nIt was happy.\n")
    prefix = D.prepare_text_dataset(text, tok, tmp_path / "cache")
    ds = D.MMapIndexedDataset(prefix)
    assert ds.num_documents == 2
    assert ds[0].tolist() == tok.encode("Once upon a time there was a cat.", eos=True)
    assert ds[1].tolist() == tok.encode("The cat sat on the mat.\nIt was happy.", eos=True)
    mtime = os.path.getmtime(prefix + ".bin")
    assert D.prepare_text_dataset(text, tok, tmp_path / "cache") == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime  # cache hit, nothing rewritten
    text.write_text("Different words.\n")
    assert D.prepare_text_dataset(text, tok, tmp_path / "cache") != prefix
    assert D.prepare_text_dataset(text, tok, tmp_path / "cache", split="line") != prefix


def test_prepare_text_dataset_key_includes_tokenizer(tmp_path, tok, assets):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    other = load_tokenizer(assets / "llama2_tokenizer.model")
    a = D.prepare_text_dataset(text, tok, tmp_path / "c")
    b = D.prepare_text_dataset(text, other, tmp_path / "c")
    assert a != b
    assert D.MMapIndexedDataset(b)[0].tolist() == other.encode("hello world", eos=True)


def test_missing_text_file_is_named(tmp_path, tok):
    with pytest.raises(D.DataError, match=r"nope\.txt: input file not found"):
        D.prepare_text_dataset(tmp_path / "nope.txt", tok, tmp_path)


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(D.DataError, match=r"d\.jsonl:3: missing key\(s\) \['text'\]"):
        list(D.iter_jsonl_records(f, ["text"]))
    f.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(D.DataError, match=r"d\.jsonl:2: not valid JSON"):
        list(D.iter_jsonl_records(f, ["text"]))


def test_text_document_splitting(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a\nb\n\n\nc\n")
    assert list(D.iter_text_documents(f, "paragraph")) == ["a\nb", "c"]
    assert list(D.iter_text_documents(f, "line")) == ["a", "b", "c"]
    assert list(D.iter_text_documents(f, "file")) == ["a\nb\n\n\nc\n"]


# ----------------------------------------------------------------------------------------------
# Alpaca


def test_alpaca_prompt_is_modellink_template():
    prompt, response = D.format_alpaca_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert prompt == ("\n" + D.ALPACA_SYSTEM + "\n### Instruction:\nAdd.\n2 and 3\n### Response:\n")
    assert response == "5\n"
    prompt, _ = D.format_alpaca_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert prompt.endswith("### Instruction:\nSay hi.\n### Response:\n")
    assert D.ALPACA_SYSTEM.startswith("Below is an instruction that describes a task")


@pytest.mark.parametrize("record", [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Continue", "input": "", "output": "\nnew line first"},
])
def test_alpaca_mask_covers_exactly_the_prompt(tok, record):
    ex = D.encode_instruction(record, tok)
    prompt, response = D.format_alpaca_prompt(record)
    prompt_ids = tok.encode(prompt, bos=True)
    n = len(prompt_ids)
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[:n] == prompt_ids
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] and -100 not in labels[n:]
    assert ids[-1] == tok.eos_id and ex["attention_mask"] == [1] * len(ids)
    assert tok.decode(ids[n:]).strip() == response.strip()


def test_alpaca_truncation_and_collate(tok):
    ex = D.encode_instruction({"instruction": "Name a colour.", "input": "", "output": "Blue."}, tok,
                              max_len=10)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 10
    full = D.encode_instruction({"instruction": "Hi", "input": "", "output": "Hello there."}, tok)
    batch = D.collate_instruction([full, ex], pad_id=0, seq_len=256)
    n = len(full["input_ids"]) - 1
    assert batch["input_ids"].shape == (2, 256)
    assert batch["input_ids"][0, :n].tolist() == full["input_ids"][:-1]
    assert batch["labels"][0, :n].tolist() == full["labels"][1:]  # shifted: target of position t
    assert (batch["labels"][0, n:] == -100).all() and not batch["attention_mask"][0, n:].any()


def test_build_gpt_datasets_from_raw_text_or_prefix(tmp_path, tok, assets):
    parts = D.build_gpt_datasets(assets / "tinystories.txt", seq_len=32, seed=0, split="90,10,0",
                                 train_samples=100, tokenizer=tok, cache_dir=tmp_path)
    assert len(parts["train"]) == 100 and parts["valid"] is not None and parts["test"] is None
    prefix = parts["train"].indexed.prefix
    again = D.build_gpt_datasets(prefix + ".idx", seq_len=32, seed=0, split="90,10,0")
    assert np.array_equal(again["valid"][3], parts["valid"][3])
    with pytest.raises(D.DataError, match="needs a tokenizer"):
        D.resolve_data_prefix(assets / "tinystories.txt")
    with pytest.raises(D.DataError, match="preprocess_data.py first"):
        D.resolve_data_prefix(assets / "boolq_val.jsonl", tok)


def test_batch_iterator_refuses_a_dataset_smaller_than_a_batch(numbered):
    ds = D.GPTDataset(numbered, 8, seed=0, split="1")
    with pytest.raises(D.DataError, match="fewer than one batch"):
        next(D.batch_iterator(ds, len(ds) + 1))
    assert list(D.batch_iterator(ds, 4, start=len(ds))) == []  # resuming at the end is fine
