"""Scoring primitives (aquila_fn.evaluation.evaluate) against direct computations from `forward`, and the
evaluate CLI end to end on the shipped BoolQ dev set with stories260K."""

import json
import math

import pytest
import torch

from aquila_fn.evaluation import evaluate as ev
from aquila_fn.interop.llama2c import load_llama2c
from aquila_fn.core.model import forward, loss_sum_fn
from aquila_fn.data.tokenizer import load_tokenizer

from script_module import load_script

# llama2.c's greedy output for "Once upon a time" (aquila_fn/assets/SOURCES.md)
REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily")


@pytest.fixture(scope="module")
def model(assets):
    config, params = load_llama2c(assets / "stories260K.bin")
    return config, params, load_tokenizer(assets / "tok512.model")


def direct_score(params, config, ctx, cont):
    """log p(cont | ctx) and greedy-ness from one unpadded forward pass."""
    logits, _ = forward(params, torch.tensor([list(ctx) + list(cont[:-1])]), config)
    logp = torch.log_softmax(logits[0, len(ctx) - 1:], dim=-1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(model):
    _, _, tok = model
    ctx, cont = ev.encode_pair(tok, "Once upon a time, there was a little ", "girl")
    assert (ctx, cont) == ev.encode_pair(tok, "Once upon a time, there was a little", " girl")
    assert ctx[0] == tok.bos_id
    assert ctx[1:] + cont == tok.encode("Once upon a time, there was a little girl")
    ctx, cont = ev.encode_pair(tok, "", "Once upon a time")
    assert ctx == [tok.bos_id] and cont == tok.encode("Once upon a time")
    ctx, cont = ev.encode_pair(tok, "Lily", " ran", add_bos=False)
    assert ctx == tok.encode("Lily")


def test_scores_equal_direct_forward(model):
    config, params, tok = model
    texts = [("Once upon a time, there was a little", " girl"),
             ("Once upon a time, there was a little", " dog named Spot"),
             ("Once upon a time, there was a little", " x"),
             ("Lily went to the", " park and played"),
             ("One day", ","),
             ("", "Tom")]
    requests = [ev.encode_pair(tok, c, x) for c, x in texts]
    for batch_size in (1, 2, 8):  # chunking and left padding must not change a score
        scores = ev.score_continuations(params, config, requests, batch_size=batch_size)
        for (ctx, cont), s in zip(requests, scores):
            want, greedy = direct_score(params, config, ctx, cont)
            assert s.logprob == pytest.approx(want, abs=1e-4)
            assert s.is_greedy == greedy and s.n_tokens == len(cont)


def test_hand_checked_greedy_facts(model):
    """The reference story continues "...there was a little" with " girl named Lily", so that
    continuation is greedy and more likely than an odd one."""
    config, params, tok = model
    ctx = "Once upon a time, there was a little"
    good, odd = ev.score_continuations(params, config, [ev.encode_pair(tok, ctx, " girl named Lily"),
                                                        ev.encode_pair(tok, ctx, " spaceship")])
    assert good.is_greedy and not odd.is_greedy
    assert good.logprob > odd.logprob
    assert good.logprob < 0


def test_shared_context_runs_once(model, monkeypatch):
    """Four choices after one long context cost one prefill of the context."""
    config, params, tok = model
    calls = []
    real = ev.forward

    def counting(params, tokens, config, **kw):
        calls.append(tuple(tokens.shape))
        return real(params, tokens, config, **kw)

    monkeypatch.setattr(ev, "forward", counting)
    ctx = "Once upon a time, there was a little girl named Lily. She loved to play outside. Answer:"
    requests = [ev.encode_pair(tok, ctx, c) for c in (" A", " B", " C", " D")]
    ev.score_continuations(params, config, requests, batch_size=8)
    n_ctx = len(requests[0][0])
    assert sum(b * s for b, s in calls) <= n_ctx + 4 * max(len(c) for _, c in requests)
    assert calls[0] == (1, n_ctx)


def test_long_context_is_cut_from_the_left(model):
    config, params, tok = model
    ctx = tok.encode(REFERENCE * 3, bos=True)
    cont = tok.encode(" She")
    (s,) = ev.score_continuations(params, config, [(ctx, cont)], max_len=64)
    keep = 64 + 1 - len(cont)
    want, _ = direct_score(params, config, ctx[-keep:], cont)
    assert s.logprob == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="longer than max_len"):
        ev.score_continuations(params, config, [([1], list(range(3, 80)))], max_len=64)


def test_rolling_windows_follow_lm_eval():
    # lm-eval's docstring example: max length 4, prefix token BOS
    assert ev.rolling_windows(list(range(10)), -1, 4) == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]),
                                                         ([5, 6, 7], [8, 9])]
    windows = ev.rolling_windows(list(range(23)), -1, 5)
    assert [t for _, c in windows for t in c] == list(range(23))  # each token predicted once
    assert all(len(x) + len(c) - 1 <= 5 for x, c in windows)


def test_rolling_loglikelihood_equals_the_loss(model):
    config, params, tok = model
    tokens = tok.encode(REFERENCE)
    ll = ev.rolling_loglikelihood(params, config, tokens, tok.bos_id)
    x = torch.tensor([[tok.bos_id] + tokens[:-1]])
    total, n = loss_sum_fn(params, {"input_ids": x, "labels": torch.tensor([tokens])}, config)
    assert int(n) == len(tokens)
    assert ll == pytest.approx(-float(total), rel=1e-5)
    # windows of 16 see less context, so the text is less likely, but every token still counts
    assert ev.rolling_loglikelihood(params, config, tokens, tok.bos_id, max_len=16) < ll


def test_perplexity_of_text(model):
    config, params, tok = model
    result = ev.perplexity(params, config, tok, REFERENCE)
    assert result["n_tokens"] == len(tok.encode(REFERENCE))
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert 1.0 < result["perplexity"] < 3.0  # the model's own greedy text is very likely
    assert result["bits_per_byte"] > 0


def test_greedy_generation_matches_llama2c_and_is_batch_invariant(model):
    config, params, tok = model
    prompts = [tok.encode("Once upon a time", bos=True), tok.encode("Lily and Tom", bos=True)]
    alone = ev.greedy_generate(params, config, tok, prompts[:1], max_new_tokens=60)
    assert "Once upon a time" + alone[0] == REFERENCE[:len("Once upon a time" + alone[0])]
    assert len(alone[0]) > 100
    batched = ev.greedy_generate(params, config, tok, prompts, max_new_tokens=60, batch_size=2)
    assert batched[0] == alone[0]
    assert batched[1] == ev.greedy_generate(params, config, tok, prompts[1:], max_new_tokens=60)[0]
    cut = ev.greedy_generate(params, config, tok, prompts[:1], max_new_tokens=60, stop=["."])
    assert cut == [", there was a little girl named Lily"]


def test_evaluate_cli_boolq_end_to_end(assets, tmp_path, capsys):
    main = load_script("evaluate").main
    out = tmp_path / "boolq.json"
    rc = main(["--task", "boolq", "--data", str(assets / "boolq_val.jsonl"), "--model",
               str(assets / "stories260K.bin"), "--limit", "20", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["task"] == "boolq" and line["n"] == 20 and 0.0 <= line["acc"] <= 1.0
    assert "scoring" in captured.err  # the progress bar goes to stderr
    saved = json.loads(out.read_text())
    assert len(saved["records"]) == 20
    assert line["acc"] == pytest.approx(sum(r["correct"] for r in saved["records"]) / 20)
    assert all(r["choices"] == [" no", " yes"] and len(r["logprobs"]) == 2 for r in saved["records"])


def test_evaluate_cli_perplexity_and_errors(assets, tmp_path, capsys):
    main = load_script("evaluate").main
    rc = main(["--task", "perplexity", "--data", str(assets / "tinystories.txt"), "--limit", "2000",
               "--model", str(assets / "stories260K.bin"), "--out", str(tmp_path / "ppl.json"),
               "--no-progress"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["task"] == "perplexity" and line["n"] > 100 and 1.5 < line["perplexity"] < 10
    for argv, words in [(["--task", "nope", "--data", "x"], "unknown task 'nope'"),
                        (["--task", "boolq", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl")]:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--model", str(assets / "stories260K.bin")])
        assert exc.value.code == 2 and words in capsys.readouterr().err
