"""The decoding engine: static cache, prefill + one-token step, batching with left padding,
per-row stopping, streaming, stop strings, no recompilation while decoding, model loading."""

import pytest
import torch

from aquila_fn import forward, get_config, init_params
from aquila_fn.inference.generate import (ASSETS, AQUILA_SYSTEM, Decoder, aquila_chat_prompt, completion_text,
                                hugepage_params, load_model)
from aquila_fn.inference.sampling import SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


CONFIG = get_config("tiny", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128,
                    max_seq_len=128, init_std=0.1)
PROMPTS = [[1, 5, 9], [1, 22, 7, 80, 3, 14, 2], [1, 100, 4, 4, 61, 33, 90, 17, 8, 12, 5, 40]]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


@pytest.fixture(scope="module")
def stories():
    return load_model()


def test_prefill_and_steps_match_full_forward(params):
    d = Decoder(params, CONFIG)
    prompt = PROMPTS[1]
    [out] = d.generate([prompt], max_new_tokens=6)
    seq = torch.tensor([prompt + out.tokens])
    full, _ = forward(params, seq, CONFIG)
    # Greedy tokens are the argmax of the full forward at each position.
    assert out.tokens == full[0, len(prompt) - 1:-1].argmax(-1).tolist()
    batch = d.layout([prompt], 6)
    cache = d.new_cache(1, batch.max_len)
    logits, cache = d.prefill(batch, cache)
    torch.testing.assert_close(logits, full[:, len(prompt) - 1], atol=1e-5, rtol=0)
    for t, token in enumerate(out.tokens[:-1]):
        logits, cache = d.step(torch.tensor([token]), len(prompt) + t, batch, cache)
        torch.testing.assert_close(logits, full[:, len(prompt) + t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("compile", [False, "eager"])
def test_batched_equals_alone(params, compile):
    d = Decoder(params, CONFIG, compile=compile)
    batched = d.generate(PROMPTS, max_new_tokens=10)
    for prompt, out in zip(PROMPTS, batched):
        [alone] = d.generate([prompt], max_new_tokens=10)
        assert out.tokens == alone.tokens


@pytest.mark.parametrize("compile", [False, "eager"])
def test_unpadded_batch_has_no_key_mask_and_equals_alone(params, compile):
    """Prompts of one length need no padding mask: the prefill runs plain causal attention."""
    d = Decoder(params, CONFIG, compile=compile)
    same = [PROMPTS[1], PROMPTS[1][::-1]]
    assert Decoder(params, CONFIG).layout(same, 4).key_mask is None
    assert Decoder(params, CONFIG).layout(PROMPTS, 4).key_mask is not None
    batched = d.generate(same, max_new_tokens=6)
    for prompt, out in zip(same, batched):
        [alone] = d.generate([prompt], max_new_tokens=6)
        assert out.tokens == alone.tokens


def test_rows_stop_on_their_own(params):
    d = Decoder(params, CONFIG)
    free = d.generate(PROMPTS, max_new_tokens=12)
    row0 = free[0].tokens
    eos = next(t for i, t in enumerate(row0) if i >= 2 and t not in row0[:i])  # row 0 ends early
    outs = d.generate(PROMPTS, max_new_tokens=12, eos_id=eos)
    assert outs[0].finish_reason == "eos" and 3 <= len(outs[0].tokens) < 12
    for out, ref in zip(outs, free):
        cut = ref.tokens.index(eos) + 1 if eos in ref.tokens else len(ref.tokens)
        assert out.tokens == ref.tokens[:cut]
        assert out.finish_reason == ("eos" if eos in ref.tokens else "length")
    # When every row has finished, decoding stops.
    everyone = d.generate([PROMPTS[0]] * 2, max_new_tokens=12, eos_id=eos)
    n = len(outs[0].tokens)
    assert [len(o.tokens) for o in everyone] == [n, n] and d.stats.decode_tokens == 2 * (n - 1)


def test_decoding_does_not_recompile(params):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    d = Decoder(params, CONFIG, compile="eager")
    d.generate([PROMPTS[0]], max_new_tokens=20)
    # One prefill graph and one decode-step graph, whatever the number of decoded tokens.
    assert d.compiles == 2
    assert counters["stats"]["unique_graphs"] - graphs_before == 2
    d.generate([PROMPTS[0][:2]], max_new_tokens=20)  # same buckets: nothing new
    assert d.compiles == 2
    assert counters["stats"]["unique_graphs"] - graphs_before == 2


def test_stream_yields_as_it_goes(stories):
    config, params, tok = stories
    d = Decoder(params, config)
    ids = tok.encode("Once upon a time", bos=True)
    events = d.stream([ids], max_new_tokens=20, tokenizer=tok, eos_id=tok.eos_id)
    first = next(events)  # a generator: the first token arrives before the rest are computed
    assert first.row == 0 and isinstance(first.token, int)
    rest = list(events)
    tokens = [first.token] + [e.token for e in rest]
    text = first.text + "".join(e.text for e in rest)
    [out] = d.generate([ids], max_new_tokens=20, tokenizer=tok, eos_id=tok.eos_id)
    assert tokens == out.tokens and text == out.text
    assert text == completion_text(tok, ids, out.tokens)


@pytest.mark.parametrize("stop", ["Lily", "girl na", ". "])
def test_stop_strings(stories, stop):
    config, params, tok = stories
    d = Decoder(params, config)
    ids = tok.encode("Once upon a time", bos=True)
    [full] = d.generate([ids], max_new_tokens=40, tokenizer=tok)
    expected = full.text[:full.text.index(stop)]
    streamed = []
    results = []
    for event in d.stream([ids], max_new_tokens=40, tokenizer=tok, stop=[stop], results=results):
        streamed.append(event.text)
    [out] = results
    assert out.finish_reason == "stop" and out.text == expected == "".join(streamed)
    assert len(out.tokens) < len(full.tokens) and out.tokens == full.tokens[:len(out.tokens)]


def test_sampled_generation_reproducible(params):
    d = Decoder(params, CONFIG)
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2)

    def run(seed):
        return [o.tokens for o in d.generate(PROMPTS, max_new_tokens=12, sampling=sp,
                                             generator=torch.Generator().manual_seed(seed))]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_one_is_greedy(params):
    d = Decoder(params, CONFIG)
    sampled = d.generate(PROMPTS, max_new_tokens=8, sampling=SamplingParams(temperature=2.0, top_k=1),
                         generator=torch.Generator().manual_seed(0))
    greedy = d.generate(PROMPTS, max_new_tokens=8)
    assert [o.tokens for o in sampled] == [o.tokens for o in greedy]


def test_beam_search_batched_equals_alone(params):
    d = Decoder(params, CONFIG)
    batched = d.beam_search(PROMPTS[:2], num_beams=3, max_new_tokens=8, num_return=2)
    for prompt, beams in zip(PROMPTS[:2], batched):
        [alone] = d.beam_search([prompt], num_beams=3, max_new_tokens=8, num_return=2)
        assert [b.tokens for b in beams] == [b.tokens for b in alone]
        for b, a in zip(beams, alone):
            assert b.score == pytest.approx(a.score, abs=1e-4)


def test_beam_reorder_is_in_place_and_memory_does_not_grow(params, monkeypatch):
    """Each step's reorder moves only the rows that change, within the filled slots, through one
    scratch buffer allocated per search: the cache keeps its storage and a reorder allocates
    nothing but index tensors, however many steps run (copying the whole cache would allocate a
    layer's worth at every step)."""
    from alloc_count import Allocations
    from aquila_fn.inference import beam
    original = beam._CacheReorder.__call__
    per_call, storages = [], set()

    def counted(self, cache, rows, filled):
        storages.add(tuple(layer[name].data_ptr() for layer in cache for name in ("k", "v")))
        with Allocations() as seen:
            original(self, cache, rows, filled)
        per_call.append(seen.bytes)

    monkeypatch.setattr(beam._CacheReorder, "__call__", counted)
    d = Decoder(params, CONFIG)
    reference = d.beam_search([PROMPTS[1]], num_beams=4, max_new_tokens=30, num_return=4)
    monkeypatch.setattr(beam._CacheReorder, "__call__", original)
    assert d.beam_search([PROMPTS[1]], num_beams=4, max_new_tokens=30, num_return=4) == reference
    layer_bytes = 4 * (len(PROMPTS[1]) + 30) * CONFIG.n_kv_heads * CONFIG.head_dim * 4
    assert len(per_call) >= 20 and len(storages) == 1
    assert max(per_call) <= 512 < layer_bytes  # a few int64 index vectors of <= 4 entries


def test_beam_search_one_beam_is_greedy(params):
    d = Decoder(params, CONFIG)
    [[best]] = d.beam_search([PROMPTS[2]], num_beams=1, max_new_tokens=9)
    [greedy] = d.generate([PROMPTS[2]], max_new_tokens=9)
    assert best.tokens == greedy.tokens


def test_beam_sampling_reproducible(params):
    d = Decoder(params, CONFIG)
    sp = SamplingParams(temperature=1.0, top_k=30)

    def run(seed):
        [beams] = d.beam_search([PROMPTS[1]], num_beams=4, max_new_tokens=8, sampling=sp,
                                generator=torch.Generator().manual_seed(seed), num_return=4)
        return [b.tokens for b in beams]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_errors(params):
    d = Decoder(params, CONFIG)
    with pytest.raises(ValueError, match="max_seq_len"):
        d.generate([[1] * 100], max_new_tokens=40)
    with pytest.raises(ValueError, match="tokenizer"):
        d.generate([[1, 2]], max_new_tokens=2, stop=["x"])
    with pytest.raises(ValueError, match="at least one token"):
        d.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="early_stopping"):
        d.beam_search([[1, 2]], early_stopping="sometimes")


def test_aquila_chat_template():
    prompt = aquila_chat_prompt([("Human", "Hello!"), ("Assistant", "Hi!"), ("Human", "How are you?")])
    assert prompt == AQUILA_SYSTEM + "###Human: Hello!###Assistant: Hi!###Human: How are you?###Assistant:"
    assert AQUILA_SYSTEM.startswith("A chat between a curious human and an artificial intelligence assistant.")


def test_load_model_three_formats(tmp_path, stories):
    from aquila_fn.training.checkpoint import save_checkpoint
    from aquila_fn.interop.hf import save_hf
    config, params, tok = stories
    assert tok is not None and config.dim == 64
    save_hf(tmp_path / "hf", config, params)
    save_checkpoint(tmp_path / "native", {"params": params}, step=1, metadata={"config": config.to_dict()})
    save_checkpoint(tmp_path / "run" / "checkpoints", {"params": params, "step": torch.tensor(2)}, step=2,
                    metadata={"config": config.to_dict(), "args": {"tokenizer": str(ASSETS / "tok512.model")}})
    _, _, run_tok = load_model(tmp_path / "run")  # pretrain.py's --out: the tokenizer it recorded
    assert run_tok is not None and run_tok.vocab_size == 512
    x = torch.tensor([tok.encode("Once upon a time", bos=True)])
    ref, _ = forward(params, x, config)
    for path in (tmp_path / "hf", tmp_path / "native", tmp_path / "run"):
        config2, params2, _ = load_model(path)
        assert config2.dim == config.dim and config2.tie_embeddings
        out, _ = forward(params2, x, config2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    _, bf16, _ = load_model(tmp_path / "hf", dtype=torch.bfloat16)
    assert bf16["embed"].dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")


def test_hugepage_params_same_values(params):
    copy = hugepage_params(params)
    from aquila_fn import named_leaves
    for (p, a), (q, b) in zip(named_leaves(params), named_leaves(copy)):
        assert p == q and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    d1, d2 = Decoder(params, CONFIG), Decoder(params, CONFIG, hugepages=True)
    assert d1.generate(PROMPTS, max_new_tokens=5)[2].tokens == d2.generate(PROMPTS, max_new_tokens=5)[2].tokens
