"""Sampling: processors agree with transformers', filtered tokens are never drawn, draws are
reproducible from an explicit generator."""

import pytest
import torch

from aquila_fn.inference.sampling import SamplingParams, repetition_penalty, sample, seen_mask, warp


def logits(b=4, v=50, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits()
    assert torch.equal(sample(x), x.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_emits_excluded(k):
    x = logits()
    allowed = x.topk(k, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.5, top_k=k)
    for _ in range(200):
        tok = sample(x, params, generator=g)
        assert (allowed == tok[:, None]).any(-1).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_top_p_never_emits_excluded(p):
    x = logits()
    probs = x.softmax(-1)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=1.0, top_p=p)
    drawn = torch.stack([sample(x, params, generator=g) for _ in range(300)], dim=1)
    for row in range(x.shape[0]):
        order = probs[row].argsort(descending=True)
        cumulative = probs[row][order].cumsum(0)
        nucleus = set(order[: int((cumulative < p).sum()) + 1].tolist())  # smallest set reaching p
        assert set(drawn[row].tolist()) <= nucleus


def test_top_k_and_top_p_combined_keep_intersection():
    x = logits(b=2, v=30, seed=5)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.6)
    kept = torch.isfinite(warp(x, params))
    assert (kept.sum(-1) <= 5).all()
    g = torch.Generator().manual_seed(2)
    for _ in range(100):
        tok = sample(x, params, generator=g)
        assert kept.gather(1, tok[:, None]).all()


def test_sampling_reproducible_with_generator():
    x = logits(v=100)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = [sample(x, params, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(a[0], t) for t in a)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
    run1 = torch.stack([sample(x, params, generator=g1) for _ in range(20)])
    run2 = torch.stack([sample(x, params, generator=g2) for _ in range(20)])
    assert not torch.equal(run1, run2)


def test_does_not_touch_global_rng():
    state = torch.get_rng_state()
    sample(logits(), SamplingParams(temperature=1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_repetition_penalty_semantics():
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = repetition_penalty(x, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_seen_mask():
    m = seen_mask([[1, 3, 3], [0]], 5)
    assert m.tolist() == [[False, True, False, True, False], [True, False, False, False, False]]


def test_invalid_params():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)


class TestAgainstTransformers:
    tp = pytest.importorskip("transformers.generation.logits_process")

    def test_repetition_penalty(self):
        x = logits(b=3, v=40)
        ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(3))
        ref = self.tp.RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())
        ours = repetition_penalty(x, seen_mask(ids.tolist(), 40), 1.3)
        torch.testing.assert_close(ours, ref)

    @pytest.mark.parametrize("temperature,k,p,min_keep", [(0.7, 0, 0.9, 1), (1.3, 8, 1.0, 1),
                                                          (0.5, 5, 0.3, 2), (1.0, 0, 0.05, 2)])
    def test_warpers(self, temperature, k, p, min_keep):
        x = logits(b=3, v=40, seed=9)
        ref = x.clone()
        if temperature != 1.0:
            ref = self.tp.TemperatureLogitsWarper(temperature)(None, ref)
        if k:
            ref = self.tp.TopKLogitsWarper(k, min_tokens_to_keep=min_keep)(None, ref)
        if p < 1.0:
            ref = self.tp.TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(None, ref)
        ours = warp(x, SamplingParams(temperature=temperature, top_k=k, top_p=p), min_keep)
        torch.testing.assert_close(ours, ref)
