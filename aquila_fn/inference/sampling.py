"""Choosing the next token from logits: greedy, temperature, top-k, top-p and repetition penalty.

    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)
    token = sample(logits, params, generator=torch.Generator().manual_seed(0), seen=seen_mask)

Pure functions over [B, V] logits. Randomness comes only from an explicit `torch.Generator`.
The processors follow Hugging Face's `LogitsProcessor` semantics (same order, same tie rules),
so a strategy here picks the same tokens transformers would from the same logits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no filtering."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


GREEDY = SamplingParams()


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers): scores of tokens already seen are divided by `penalty`
    when positive and multiplied by it when negative. `seen` is a bool [B, V] mask."""
    if seen is None or penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k largest scores per row (ties with the k-th are kept, as in transformers)."""
    if k <= 0:
        return logits
    k = min(max(k, min_keep), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -min_keep:] = False  # always keep the most likely min_keep tokens
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def penalise(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """The processors every strategy applies (greedy included): the repetition penalty."""
    return repetition_penalty(logits, seen, params.repetition_penalty)


def warp(logits: torch.Tensor, params: SamplingParams, min_keep: int = 1) -> torch.Tensor:
    """The sampling-only processors, in transformers' order: temperature, top-k, top-p."""
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k, min_keep)
    return top_p_filter(logits, params.top_p, min_keep)


def sample(logits: torch.Tensor, params: SamplingParams = GREEDY, *,
           generator: torch.Generator | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] (fp32)."""
    logits = penalise(logits.float(), params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp(logits, params), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_mask(sequences: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """Bool [B, V]: which tokens each row has already contained (prompt included)."""
    mask = torch.zeros(len(sequences), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(sequences):
        if ids:
            mask[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
    return mask
