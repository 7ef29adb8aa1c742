"""The lm-eval harness adapter, called with harness-shaped requests (objects with `.args` tuples,
as `lm_eval.api.instance.Instance` has), checked against direct scoring. When lm_eval is
installed the same calls run on its real Instance class and LM base."""

import dataclasses
import math

import pytest
import torch

from aquila_fn.evaluation import evaluate as ev
from aquila_fn.evaluation.lm_eval_adapter import AquilaEvalModel
from aquila_fn.interop.llama2c import load_llama2c
from aquila_fn.core.model import loss_sum_fn
from aquila_fn.data.tokenizer import load_tokenizer


@dataclasses.dataclass
class Request:
    """The part of lm_eval's Instance the model methods read."""
    request_type: str
    arguments: tuple

    @property
    def args(self):
        return self.arguments


@pytest.fixture(scope="module")
def lm(assets):
    config, params = load_llama2c(assets / "stories260K.bin")
    return AquilaEvalModel(config=config, params=params, tokenizer=load_tokenizer(assets / "tok512.model"),
                           batch_size="2", max_gen_toks="64")


def test_constructs_from_harness_string_arguments(assets):
    lm = AquilaEvalModel(model=str(assets / "stories260K.bin"), batch_size="4", max_length="128",
                         add_bos_token="False", dtype="float32")
    assert lm.batch_size == 4 and lm.max_length == 128 and lm.add_bos_token is False
    assert lm.tokenizer.vocab_size == 512 and lm.prefix_token_id == 1  # tok512.model found beside the .bin
    with pytest.raises(ValueError, match="dtype"):
        AquilaEvalModel(model=str(assets / "stories260K.bin"), dtype="int8")


def test_loglikelihood_matches_direct_scoring(lm):
    pairs = [("Once upon a time, there was a little", " girl"),
             ("Once upon a time, there was a little ", "dog named Spot"),  # trailing space moves over
             ("Lily went to the", " park"),
             ("", "Once upon a time")]  # empty context: conditioned on BOS
    out = lm.loglikelihood([Request("loglikelihood", p) for p in pairs], disable_tqdm=True)
    assert len(out) == len(pairs) and all(isinstance(lp, float) and isinstance(g, bool) for lp, g in out)
    for (ctx, cont), (lp, greedy) in zip(pairs, out):
        ids_ctx, ids_cont = ev.encode_pair(lm.tokenizer, ctx, cont)
        logits, _ = ev.forward(lm.params, torch.tensor([ids_ctx + ids_cont[:-1]]), lm.config)
        logp = torch.log_softmax(logits[0, len(ids_ctx) - 1:], -1)
        target = torch.tensor(ids_cont)
        assert lp == pytest.approx(float(logp.gather(-1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())
    assert out[0][1] is True  # " girl" is what the model writes next


def test_loglikelihood_rolling_matches_the_loss(lm):
    texts = ["Once upon a time, there was a little girl named Lily.", "Tom had a red ball. He liked it."]
    out = lm.loglikelihood_rolling([Request("loglikelihood_rolling", (t,)) for t in texts], disable_tqdm=True)
    assert len(out) == 2
    for text, ll in zip(texts, out):
        ids = lm.tokenizer.encode(text)
        batch = {"input_ids": torch.tensor([[lm.tokenizer.bos_id] + ids[:-1]]), "labels": torch.tensor([ids])}
        total, _ = loss_sum_fn(lm.params, batch, lm.config)
        assert ll == pytest.approx(-float(total), rel=1e-5)
    # longer than the window: split into disjoint windows, still one number per document
    small = AquilaEvalModel(config=lm.config, params=lm.params, tokenizer=lm.tokenizer, max_length=16)
    (long_ll,) = small.loglikelihood_rolling([Request("loglikelihood_rolling", (texts[0] * 3,))], True)
    assert math.isfinite(long_ll) and long_ll < out[0]


def test_generate_until_is_greedy_and_stops(lm):
    requests = [Request("generate_until", ("Once upon a time", {"until": ["."], "max_gen_toks": 40})),
                Request("generate_until", ("Once upon a time", {"until": ["Lily"], "do_sample": False})),
                Request("generate_until", ("Tom and Sue", {"until": "\n", "max_gen_toks": 5}))]
    out = lm.generate_until(requests, disable_tqdm=True)
    assert out[0] == ", there was a little girl named Lily"
    assert out[1] == ", there was a little girl named "
    assert isinstance(out[2], str) and "\n" not in out[2] and len(lm.tokenizer.encode(out[2])) <= 5


def test_real_harness_classes(lm, assets):
    lm_eval = pytest.importorskip("lm_eval.api.model")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from aquila_fn.evaluation.lm_eval_adapter import AquilaLM
    assert issubclass(AquilaLM, lm_eval.LM) and get_model("aquila_fn") is AquilaLM
    real = AquilaLM.create_from_arg_string(f"model={assets / 'stories260K.bin'},batch_size=2")
    assert real.rank == 0 and real.world_size == 1
    req = Instance("loglikelihood", {}, ("Once upon a time, there was a little", " girl"), 0)
    ((got, got_greedy),) = real.loglikelihood([req], disable_tqdm=True)
    ((want, want_greedy),) = lm.loglikelihood([Request("loglikelihood", req.args)], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-5) and got_greedy == want_greedy


def test_harness_class_needs_lm_eval_installed():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        import aquila_fn.evaluation.lm_eval_adapter as adapter
        with pytest.raises(ImportError, match=r"pip install 'aquila-fn\[eval\]'"):
            adapter.AquilaLM
    else:
        pytest.skip("lm_eval is installed")
