"""Scoring primitives for evaluation: continuation log-likelihoods, rolling perplexity, greedy
generation. Everything here works on token ids and pure `forward`; tasks (prompt formats) live
in `aquila_fn.evaluation.tasks`, the lm-eval harness adapter in `aquila_fn.evaluation.lm_eval_adapter`.

    scores = score_continuations(params, config, [(ctx_ids, cont_ids), ...], batch_size=8)
    scores[0].logprob, scores[0].is_greedy

Requests that share a context run its prefix once: the unique contexts are prefilled in
left-padded batches into a static KV cache, then each continuation extends its context's cache
rows. Multiple-choice tasks (one context, several short answers) cost about one forward pass of
the context per example, whatever the number of choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from aquila_fn.core.config import ModelConfig
from aquila_fn.core.progress import progress_bar
from aquila_fn.inference.decoder import Decoder
from aquila_fn.inference.loading import load_model
from aquila_fn.core.model import forward, head_weight, init_cache

Params = dict
LOGIT_CHUNK = 1024  # rows of [N, V] logits materialised at once


@dataclass(frozen=True)
class Score:
    """Log-probability of a continuation, and whether greedy decoding would produce it."""
    logprob: float
    is_greedy: bool
    n_tokens: int


# ----------------------------------------------------------------------------- tokenisation


def encode_pair(tokenizer, context: str, continuation: str, *, add_bos: bool = True
                ) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's causal models split them: trailing spaces
    of the context move to the continuation, the whole string is encoded once, and the
    continuation is what follows the context's own encoding. Encoding the two halves separately
    would tokenise the word boundary differently from how the model saw text in training."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    if not context:
        whole = tokenizer.encode(continuation)
        if not prefix:  # nothing to condition on: the first token becomes the context
            return whole[:1], whole[1:]
        return prefix, whole
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return prefix + ctx, whole[len(ctx):]


# ----------------------------------------------------------------------------- log-probabilities


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), target == argmax) per row of `hidden` [N, D]; the output projection is
    done `LOGIT_CHUNK` rows at a time so [N, V] fp32 logits never exist at once."""
    lps, greedy = [], []
    for start in range(0, hidden.shape[0], LOGIT_CHUNK):
        h, t = hidden[start:start + LOGIT_CHUNK], targets[start:start + LOGIT_CHUNK]
        logits = (h @ weight.to(h.dtype).T).float()  # the same projection `forward` does
        lps.append(torch.log_softmax(logits, dim=-1).gather(-1, t[:, None])[:, 0])
        greedy.append(logits.argmax(dim=-1) == t)
    return torch.cat(lps), torch.cat(greedy)


def _fit(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[tuple, tuple]:
    """Drop context tokens from the left so context + continuation[:-1] fits in `max_len`
    (lm-eval keeps the last max_len + 1 tokens the same way)."""
    if not continuation:
        raise ValueError("cannot score an empty continuation")
    if not context:
        raise ValueError("the context must hold at least one token (e.g. BOS)")
    if len(continuation) > max_len:
        raise ValueError(f"continuation of {len(continuation)} tokens is longer than max_len={max_len}")
    keep = max_len + 1 - len(continuation)
    return tuple(context[-keep:]), tuple(continuation)


def _left_pad(rows: list[tuple], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, L], positions [B, L], pad lengths [B]) with every row right-aligned at L."""
    width = max(len(r) for r in rows)
    pads = torch.tensor([width - len(r) for r in rows], device=device)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
    positions = (torch.arange(width, device=device)[None, :] - pads[:, None]).clamp(min=0)
    return tokens, positions, pads


@torch.no_grad()
def _prefill(params: Params, config: ModelConfig, contexts: list[tuple], cache_len: int,
             compute_dtype) -> tuple[torch.Tensor, list | None, torch.Tensor, int]:
    """Run left-padded contexts; return (last hidden [B, D], cache or None, pads [B], width)."""
    device = params["embed"].device
    tokens, positions, pads = _left_pad(contexts, 0, device)
    width = tokens.shape[1]
    cache = None
    if cache_len > width:  # some continuation has more than one token: keep the keys/values
        dtype = compute_dtype or params["embed"].dtype
        cache = init_cache(config, len(contexts), cache_len, dtype=dtype, device=device)
    slots = torch.arange(max(cache_len, width), device=device)
    mask = slots[None, :] >= pads[:, None]  # padding is invisible; later slots are all real
    hidden, cache = forward(params, tokens, config, cache=cache, positions=positions,
                            attn_mask=mask, compute_dtype=compute_dtype, return_hidden=True)
    return hidden[:, -1], cache, pads, width


@torch.no_grad()
def _extend(params: Params, config: ModelConfig, cache: list, rows: torch.Tensor, pads: torch.Tensor,
            width: int, ctx_lens: torch.Tensor, inputs: list[tuple], compute_dtype) -> torch.Tensor:
    """Run continuation tokens (right-padded) after their contexts' cached rows; hidden [B, C, D]."""
    device = params["embed"].device
    c = max(len(x) for x in inputs)
    tokens = torch.zeros((len(inputs), c), dtype=torch.long, device=device)
    for i, x in enumerate(inputs):
        tokens[i, :len(x)] = torch.tensor(x, dtype=torch.long, device=device)
    sub = [{"k": kv["k"][rows], "v": kv["v"][rows]} for kv in cache]  # a copy: rows may repeat
    positions = ctx_lens[:, None] + torch.arange(c, device=device)[None, :]
    positions = positions.clamp(max=config.max_seq_len - 1)  # only padding can pass the end
    slots = torch.arange(cache[0]["k"].shape[1], device=device)
    mask = slots[None, :] >= pads[rows][:, None]
    hidden, _ = forward(params, tokens, config, cache=sub, start_pos=width, positions=positions,
                        attn_mask=mask, compute_dtype=compute_dtype, return_hidden=True)
    return hidden


def score_continuations(params: Params, config: ModelConfig,
                        requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        batch_size: int = 8, max_len: int | None = None,
                        compute_dtype: torch.dtype | None = None, progress: bool = False,
                        desc: str = "scoring") -> list[Score]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) request.

    Contexts longer than fits lose tokens from the left. Identical contexts are computed once;
    contexts run `batch_size` at a time, longest first, and so do continuations.
    """
    max_len = min(max_len or config.max_seq_len, config.max_seq_len)
    fitted = [_fit(c, x, max_len) for c, x in requests]
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(ctx, []).append(i)
    contexts = sorted(groups, key=len, reverse=True)
    weight = head_weight(params)
    logprob = [0.0] * len(fitted)
    greedy = [True] * len(fitted)
    bar = progress_bar(total=len(fitted), desc=desc, enabled=progress)
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        members = [(row, i) for row, ctx in enumerate(chunk) for i in groups[ctx]]
        longest = max(len(fitted[i][1]) for _, i in members)
        cache_len = len(chunk[0]) + longest - 1  # chunk[0] is the longest context
        last, cache, pads, width = _prefill(params, config, chunk, cache_len, compute_dtype)
        rows = torch.tensor([row for row, _ in members], device=last.device)
        first = torch.tensor([fitted[i][1][0] for _, i in members], device=last.device)
        lp, gr = token_logprobs(last[rows], weight, first)
        for k, (_, i) in enumerate(members):
            logprob[i], greedy[i] = float(lp[k]), bool(gr[k])
        if cache is not None:
            _score_rest(params, config, cache, pads, width, chunk, members, fitted, weight,
                        batch_size, compute_dtype, logprob, greedy)
        bar.update(len(members))
    bar.close()
    return [Score(lp, g, len(x)) for lp, g, (_, x) in zip(logprob, greedy, fitted)]


def _score_rest(params, config, cache, pads, width, chunk, members, fitted, weight, batch_size,
                compute_dtype, logprob, greedy) -> None:
    """Add the log-probs of continuation tokens 2..n (those conditioned on earlier ones)."""
    long_ones = [(row, i) for row, i in members if len(fitted[i][1]) > 1]
    ctx_len = {row: len(ctx) for row, ctx in enumerate(chunk)}
    device = params["embed"].device
    for start in range(0, len(long_ones), batch_size):
        part = long_ones[start:start + batch_size]
        rows = torch.tensor([row for row, _ in part], device=device)
        lens = torch.tensor([ctx_len[row] for row, _ in part], device=device)
        inputs = [fitted[i][1][:-1] for _, i in part]
        hidden = _extend(params, config, cache, rows, pads, width, lens, inputs, compute_dtype)
        for k, (_, i) in enumerate(part):
            cont = fitted[i][1]
            target = torch.tensor(cont[1:], dtype=torch.long, device=device)
            lp, gr = token_logprobs(hidden[k, :len(cont) - 1], weight, target)
            logprob[i] += float(lp.sum())
            greedy[i] = greedy[i] and bool(gr.all())


# ----------------------------------------------------------------------------- perplexity


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows that predict every token exactly once, each with
    as much context as fits (lm-eval's get_rolling_token_windows + make_disjoint_window with
    context_len=1): the first window is conditioned on `prefix_token` (BOS), the last one is
    given a full window of context even when it predicts only a few tokens."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        inputs = tokens[max(end - max_len - 1, 0):end - 1]
        windows.append((inputs[:len(inputs) - (n - 1)], tokens[end - n:end]))
        done = end
    return windows


def rolling_loglikelihood(params: Params, config: ModelConfig, tokens: Sequence[int],
                          prefix_token: int, *, max_len: int | None = None, batch_size: int = 8,
                          compute_dtype=None, progress: bool = False) -> float:
    """log p(tokens | prefix_token), scoring long texts window by window."""
    max_len = min(max_len or config.max_seq_len, config.max_seq_len)
    windows = rolling_windows(tokens, prefix_token, max_len)
    scores = score_continuations(params, config, windows, batch_size=batch_size, max_len=max_len,
                                 compute_dtype=compute_dtype, progress=progress, desc="perplexity")
    return sum(s.logprob for s in scores)


def perplexity(params: Params, config: ModelConfig, tokenizer, text: str, *,
               max_len: int | None = None, batch_size: int = 8, compute_dtype=None,
               progress: bool = False) -> dict:
    """Token perplexity of `text` (conditioned on BOS), with lm-eval's wikitext companions:
    word perplexity and bits per byte, which do not depend on the tokenizer."""
    if not text:
        raise ValueError("perplexity of an empty text is undefined")
    tokens = tokenizer.encode(text)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        prefix, tokens = tokens[0], tokens[1:]
    ll = rolling_loglikelihood(params, config, tokens, prefix, max_len=max_len,
                               batch_size=batch_size, compute_dtype=compute_dtype, progress=progress)
    n_words = max(len(text.split()), 1)
    n_bytes = len(text.encode("utf-8"))
    return {"n_tokens": len(tokens), "nll": -ll / len(tokens), "perplexity": math.exp(-ll / len(tokens)),
            "word_perplexity": math.exp(-ll / n_words), "bits_per_byte": -ll / n_bytes / math.log(2),
            "n_words": n_words, "n_bytes": n_bytes}


# ----------------------------------------------------------------------------- greedy generation


@torch.no_grad()
def greedy_generate(params: Params, config: ModelConfig, tokenizer, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 256, stop: Sequence[str] = (), batch_size: int = 8,
                    compute_dtype=None, progress: bool = False, decoder_options: dict | None = None) -> list[str]:
    """Greedy continuations of token-id prompts, cut before the first stop string (lm-eval's
    `until`); decoding also ends at EOS. Prompts run `batch_size` at a time through
    generate.Decoder (left-padded, static KV cache); a prompt too long for the context keeps its
    tail, leaving room for the answer. decoder_options: more `Decoder` arguments (compile, cache_dir, log)."""
    decoder = Decoder(params, config, compute_dtype=compute_dtype, **(decoder_options or {}))
    keep = max(config.max_seq_len - max_new_tokens, 1)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    out: list[str] = [""] * len(prompts)
    bar = progress_bar(total=len(prompts), desc="generating", enabled=progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = [list(prompts[i][-keep:]) for i in idx]
        room = config.max_seq_len - max(map(len, batch))
        done = decoder.generate(batch, max_new_tokens=min(max_new_tokens, room), eos_id=tokenizer.eos_id,
                                stop=stop, tokenizer=tokenizer)
        for i, completion in zip(idx, done):
            out[i] = completion.text
        bar.update(len(idx))
    bar.close()
    return out


# ----------------------------------------------------------------------------- loading (for the CLIs)


def _tokenizer_beside(path: Path, vocab_size: int):
    """A llama2.c habit: tok{vocab}.model (or tokenizer.model) next to the weights."""
    base = path if path.is_dir() else path.parent
    for name in (f"tok{vocab_size}.model", "tokenizer.model"):
        if (base / name).is_file():
            from aquila_fn.data.tokenizer import load_tokenizer
            return load_tokenizer(base / name)
    return None


def load_model_and_tokenizer(model_path, tokenizer_path=None, *, adapters_path=None,
                             dtype: torch.dtype = torch.float32, device="cpu"):
    """(config, params, tokenizer) for the CLIs: any model `aquila_fn.inference.generate.load_model` reads
    (llama2.c .bin, Hugging Face dir, native checkpoint), an explicit tokenizer or the model's own
    or one beside it, and optionally LoRA adapters merged in (alpha from their metadata)."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    config, params, tokenizer = load_model(path, dtype=dtype, device=device)
    if isinstance(tokenizer_path, (str, Path)):
        from aquila_fn.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path)
    elif tokenizer_path is not None:  # an already loaded tokenizer
        tokenizer = tokenizer_path
    tokenizer = tokenizer or _tokenizer_beside(path, config.vocab_size)
    from aquila_fn.data.tokenizer import TokenizerError, check_tokenizer_fits
    if tokenizer is None:
        raise TokenizerError(f"no tokenizer found for {path}; pass --tokenizer")
    check_tokenizer_fits(tokenizer, config.vocab_size)
    if adapters_path is not None:
        from aquila_fn.training.lora import load_adapters, lora_merge
        adapters, info = load_adapters(adapters_path, map_location=device)
        params = lora_merge(params, adapters, info["alpha"])
    if torch.device(device) != params["embed"].device:
        from aquila_fn.core import pytree
        params = pytree.tree_map(lambda x: x.to(device), params)
    return config, params, tokenizer
