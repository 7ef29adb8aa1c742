"""Beam search (and beam sampling) over a Decoder's static KV cache, with transformers'
semantics; the beams live in the cache's batch rows, reordered in place at every step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aquila_fn.inference.sampling import SamplingParams, penalise, seen_mask, warp

if TYPE_CHECKING:
    from aquila_fn.inference.decoder import Decoder


@dataclass
class Beam:
    tokens: list[int]
    score: float  # sum of log-probabilities / generated_length ** length_penalty


class BeamSearch:
    """State of one beam search over B prompts x K beams, kept as [B, K, ...] tensors.
    Runs on a Decoder (which resets its statistics first) and adds its decode steps to them."""

    NEG = -1.0e9  # transformers' "impossible" score (finite, so sums stay ordered)

    def __init__(self, decoder: Decoder, prompts, num_beams, max_new, length_penalty,
                 early_stopping, eos: set[int], sampling: SamplingParams, generator):
        self.d, self.k, self.max_new = decoder, num_beams, max_new
        self.lp, self.early, self.eos = length_penalty, early_stopping, eos
        self.sampling, self.generator = sampling, generator
        self.b = len(prompts)
        self.prompts = [p for p in prompts for _ in range(num_beams)]  # each prompt K times
        # Keep enough candidates that num_beams of them are not finished by an EOS.
        self.n_candidates = max(2, 1 + len(eos)) * num_beams
        self.min_keep = len(eos) + 1 if eos else 2

    def run(self, num_return: int) -> list[list[Beam]]:
        d, b, k, v = self.d, self.b, self.k, self.d.config.vocab_size
        dev = d.device
        batch = d.layout(self.prompts, self.max_new)
        cache = d.new_cache(b * k, batch.max_len)
        seen = seen_mask(self.prompts, v, dev) if self.sampling.repetition_penalty != 1.0 else None

        running = torch.zeros(b, k, self.max_new, dtype=torch.long, device=dev)
        running_scores = torch.zeros(b, k, device=dev)
        running_scores[:, 1:] = self.NEG  # all beams start equal: only the first one may expand
        finished = torch.zeros_like(running)
        finished_scores = torch.full((b, k), self.NEG, device=dev)
        finished_len = torch.zeros(b, k, dtype=torch.long, device=dev)
        is_finished = torch.zeros(b, k, dtype=torch.bool, device=dev)
        improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
        offsets = torch.arange(b, device=dev)[:, None] * k

        reorder = _CacheReorder(cache)
        logits, cache = d.prefill(batch, cache)
        for t in range(self.max_new):
            log_probs = self._log_probs(logits, seen).view(b, k, v) + running_scores[..., None]
            cand_scores, cand_beam, cand_tok = self._candidates(log_probs.view(b, k * v), v)
            cand_seqs = running.gather(1, cand_beam[..., None].expand(-1, -1, self.max_new)).clone()
            cand_seqs[:, :, t] = cand_tok
            hits = self._hits(cand_tok, t)

            # The best num_beams candidates that did not just finish keep running.
            alive_scores = cand_scores + hits.float() * self.NEG
            keep = alive_scores.topk(k, dim=1).indices
            running = cand_seqs.gather(1, keep[..., None].expand(-1, -1, self.max_new))
            running_scores = alive_scores.gather(1, keep)
            source_beam = cand_beam.gather(1, keep)

            finished, finished_scores, finished_len, is_finished = self._update_finished(
                finished, finished_scores, finished_len, is_finished, cand_seqs, cand_scores, hits,
                improvable, t)

            improvable = self._improvable(improvable, running_scores, finished_scores, is_finished, t)
            if not self._continue(improvable, is_finished, hits):
                break
            rows = (source_beam + offsets).view(-1)
            reorder(cache, rows, batch.prompt_len + t)  # slots written so far: the prompt and t tokens
            next_tokens = running[:, :, t].reshape(-1)
            if seen is not None:
                seen = seen[rows]
                seen[torch.arange(b * k, device=dev), next_tokens] = True
            logits, cache = d.step(next_tokens, batch.prompt_len + t, batch, cache)
            d.stats.decode_tokens += b * k

        return [[Beam(finished[i, j, :finished_len[i, j]].tolist(), float(finished_scores[i, j]))
                 for j in range(num_return)] for i in range(b)]

    def _log_probs(self, logits, seen):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs = penalise(log_probs, self.sampling, seen)
        return warp(log_probs, self.sampling, self.min_keep)

    def _candidates(self, scores, v):
        """Top 2K (or K sampled without replacement) continuations over all beams of a prompt."""
        if self.sampling.greedy:
            cand_scores, flat = scores.topk(self.n_candidates, dim=1)
        else:
            flat = torch.multinomial(torch.softmax(scores, dim=1), self.n_candidates,
                                     generator=self.generator)
            cand_scores = scores.gather(1, flat)
        return cand_scores, flat // v, flat % v

    def _hits(self, cand_tok, t):
        """Which candidates end here: an EOS token, or the last allowed step for all."""
        if t == self.max_new - 1:
            return torch.ones_like(cand_tok, dtype=torch.bool)
        hits = torch.zeros_like(cand_tok, dtype=torch.bool)
        for e in self.eos:
            hits |= cand_tok == e
        return hits

    def _update_finished(self, finished, scores, lengths, is_finished, cand_seqs, cand_scores, hits,
                         improvable, t):
        """Merge the candidates that finished among the top K with the finished set; keep the best K."""
        top_k_mask = torch.zeros(self.n_candidates, dtype=torch.bool, device=hits.device)
        top_k_mask[:self.k] = True
        just_finished = hits & top_k_mask
        new_scores = cand_scores / ((t + 1) ** self.lp)
        if self.early is True:  # a full set of hypotheses takes no more
            new_scores = new_scores + is_finished.all(1, keepdim=True).float() * self.NEG
        new_scores = new_scores + (~improvable).float() * self.NEG + (~just_finished).float() * self.NEG
        merged_scores = torch.cat([scores, new_scores], dim=1)
        best = merged_scores.topk(self.k, dim=1).indices
        merged_seqs = torch.cat([finished, cand_seqs], dim=1)
        merged_len = torch.cat([lengths, torch.full_like(cand_scores, t + 1, dtype=torch.long)], dim=1)
        merged_done = torch.cat([is_finished, just_finished], dim=1)
        return (merged_seqs.gather(1, best[..., None].expand(-1, -1, self.max_new)),
                merged_scores.gather(1, best), merged_len.gather(1, best), merged_done.gather(1, best))

    def _improvable(self, improvable, running_scores, finished_scores, is_finished, t):
        """Can the best running beam still beat the worst finished hypothesis?"""
        if self.early == "never" and self.lp > 0.0:
            best_len = self.max_new
        else:
            best_len = t + 1
        best_possible = running_scores[:, :1] / (best_len ** self.lp)
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values,
                            torch.full_like(finished_scores, self.NEG))
        return improvable & (best_possible > worst).any(-1, keepdim=True)

    def _continue(self, improvable, is_finished, hits) -> bool:
        all_done = bool(is_finished.all()) and self.early is True
        return bool(improvable.any()) and not all_done and not bool(hits.all())


class _CacheReorder:
    """Beam bookkeeping on the static cache, in place: row i becomes old row rows[i]. Only the
    rows that change and the slots filled so far move, through one scratch buffer the size of one
    layer's keys, allocated once per search: no step allocates more than a few index tensors."""

    def __init__(self, cache):
        self.scratch = torch.empty_like(cache[0]["k"])
        self.identity = torch.arange(self.scratch.shape[0], device=self.scratch.device)

    def __call__(self, cache, rows: torch.Tensor, filled: int) -> None:
        moved = (rows != self.identity).nonzero().squeeze(1)
        n = moved.numel()
        if n == 0:
            return
        sources = rows.index_select(0, moved)
        shape = (n, filled, *self.scratch.shape[2:])
        moving = self.scratch.view(-1)[:math.prod(shape)].view(shape)
        for layer in cache:
            for name in ("k", "v"):
                filled_slots = layer[name][:, :filled]
                torch.index_select(filled_slots, 0, sources, out=moving)
                filled_slots.index_copy_(0, moved, moving)
