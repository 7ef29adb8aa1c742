"""The KV-cached decoder: a static cache, the prefill and one-token decode steps (eager,
compiled ahead of time, or compiled in process; replayed as device graphs where that pays),
and greedy / sampled generation with streaming on top of them.

Layout of a batch: prompts are left-padded to a common length P, so every row writes cache slot
P + t at decode step t and one scalar `start_pos` serves the whole batch; each row's rotary
positions are its slot minus its padding, and `key_mask` hides the padding slots. The cache has a
fixed length, so the decode step sees the same shapes at every step: the position is a 0-d tensor,
never a Python int, and decoding N tokens compiles nothing after the first step.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from aquila_fn.core.config import ModelConfig
from aquila_fn.core.model import init_cache
from aquila_fn.inference.aot_package import AOT_DEVICES, CACHE_BUCKET
from aquila_fn.inference.beam import Beam, BeamSearch
from aquila_fn.inference.decode_compile import CompiledSteps, default_build_s, estimated_saving_s, repays
from aquila_fn.inference.sampling import GREEDY, SamplingParams, sample, seen_mask
from aquila_fn.inference.step_graph import GraphStep
from aquila_fn.inference.steps import decode_backend, decode_step, prefill_step
from aquila_fn.inference.text import TextTracker


# ----------------------------------------------------------------------------- results


@dataclass
class Completion:
    """One row's output. `tokens` are the generated ids (the EOS that ended it included);
    `text` their decoding, cut before a stop string (None without a tokenizer)."""

    tokens: list[int]
    text: str | None
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class StreamEvent:
    row: int    # which prompt of the batch
    token: int  # the new token id
    text: str   # the text it completes ('' while a character or a possible stop string is pending)


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0   # decode steps run, times the batch size
    decode_s: float = 0.0    # excluding steps that compiled
    compile_s: float = 0.0   # time of calls that compiled a graph
    compiles: int = 0        # graphs compiled during the call
    warmup_s: float = 0.0    # loading (or building) the ahead-of-time compiled step

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        line = (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s * 1e3:.1f} ms | "
                f"decode: {self.decode_tokens} tokens in {self.decode_s:.3f} s "
                f"({self.decode_tokens_per_s:.1f} tokens/s)")
        if self.compiles:
            line += f" | compile: {self.compiles} graphs, {self.compile_s:.1f} s (excluded)"
        if self.warmup_s:
            line += f" | warm-up: {self.warmup_s:.2f} s (excluded)"
        return line


# ----------------------------------------------------------------------------- the step's compilation


def _resolve_backend(compile: bool | str | Callable):
    if compile is True or compile == "inductor":
        return decode_backend
    if compile == "eager":
        return lambda gm, example_inputs: gm.forward
    if callable(compile):
        return compile
    from torch._dynamo import lookup_backend
    return lookup_backend(compile)


def _compile_mode(compile) -> str:
    """"off", "auto", "on" (the ahead-of-time compiled step) or "jit" (torch.compile in process)."""
    if compile is False or compile is None or compile == "off":
        return "off"
    if compile is True:
        return "on"
    if compile in ("auto", "on"):
        return compile
    return "jit"


def _aot_call(step, params):
    """The Decoder's step signature over an ahead-of-time compiled step (which writes the cache
    in place and returns the logits)."""
    def call(tokens, cache, start, positions, batch):
        return step(params, tokens, cache, start, positions, batch.step_mask), cache
    return call


def _npu_graph_step(decode_fn, params):
    """The decode step under torchair's reduce-overhead mode: captured once per shape and cache,
    replayed as an NPU graph (aclgraph). The weights are marked static so that the graph reads
    them in place instead of copying them in as per-call inputs."""
    from aquila_fn.core.compile import npu_backend
    from aquila_fn.core import pytree
    for leaf in pytree.leaves(params):
        torch._dynamo.mark_static_address(leaf)
    return torch.compile(decode_fn, backend=npu_backend(mode="reduce-overhead"), fullgraph=True,
                         dynamic=False)


def _decode_impl(impl: str, compiled: bool, device: torch.device) -> str:
    """The ops for the compiled CPU decode step: plain math, which inductor fuses with the
    matrix-vector loops into one kernel per step (an extern SDPA call per layer splits it and
    costs more than the attention itself at one query)."""
    if impl == "auto" and compiled and torch.device(device).type == "cpu":
        return "reference"
    return impl


def hugepage_params(params):
    """The same pytree with every tensor copied into one anonymous mapping advised for
    transparent huge pages (Linux, CPU). A decode step sweeps all the weights once; 2 MiB pages
    cut the TLB misses of that sweep (+15% read bandwidth measured on the development machine).
    The copy doubles the weights' memory while the caller keeps the originals."""
    from aquila_fn.core import pytree
    leaves = pytree.leaves(params)
    if not leaves or any(x.device.type != "cpu" for x in leaves) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return params
    sizes = [_round_up(x.numel() * x.element_size(), 64) for x in leaves]
    region = mmap.mmap(-1, sum(sizes) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    offset = -arena.data_ptr() % _HUGE_PAGE  # start on a huge-page boundary
    copies = []
    for x, size in zip(leaves, sizes):
        n = x.numel() * x.element_size()
        copies.append(arena[offset:offset + n].view(x.dtype).view(x.shape).copy_(x))
        offset += size
    return pytree.unflatten(pytree.structure(params), copies)


_HUGE_PAGE = 2 * 2**20


# ----------------------------------------------------------------------------- batch layout


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """tokens [B, length] with each prompt right-aligned, and the pad count of each row [B]."""
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    pads = torch.empty(len(prompts), dtype=torch.long)
    for row, ids in enumerate(prompts):
        pads[row] = length - len(ids)
        tokens[row, length - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
    return tokens, pads


@dataclass
class _Batch:
    tokens: torch.Tensor     # [B, P] left-padded prompts
    pads: torch.Tensor       # [B] padding slots per row
    positions: torch.Tensor  # [B, P] rotary positions (padding clamped to 0)
    key_mask: torch.Tensor | None  # [B, max_len] True = a real token may sit here; None: no padding
    max_len: int             # cache length
    step_mask: torch.Tensor | None = None  # key_mask, or all True: the AOT-compiled step's mask

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1]


def _eos_set(eos_id) -> set[int]:
    if eos_id is None:
        return set()
    return {int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id}


# ----------------------------------------------------------------------------- the decoder


class Decoder:
    """Holds a model, its (optionally compiled) prefill and decode step, and the strategies.

    compile: "auto" (default): the decode step compiled ahead of time (aquila_fn.inference.aot_package)
    when a package is cached on disk for this model shape or the run is long enough to repay
    compiling it, else eager, with the package built in the background for later runs;
    True / "on": the compiled step always (built now if not cached); False / "off": eager;
    "inductor" (torch.compile of prefill and step, batch-1 matvecs as fused reductions),
    "eager" / "aot_eager" (dynamo capture only: cheap, for tests) or a dynamo backend callable:
    compiled in process by torch.compile. On cuda a compiled step is replayed as a CUDA graph
    (aquila_fn.inference.step_graph); on npu "on" compiles it with torchair's reduce-overhead (aclgraph)
    mode. `self.compiles` counts the graphs torch.compile built, so callers can check that
    decoding does not recompile. hugepages: decode from a copy of the weights on transparent
    huge pages (CPU; see `hugepage_params`). cache_dir: where compiled steps are kept (default
    ~/.cache/aquila_fn/compiled or $AQUILA_FN_COMPILE_CACHE). log: receives one line per
    compilation decision, load or build (the scripts print them on stderr).
    """

    def __init__(self, params, config: ModelConfig, *, compile: bool | str | Callable = "auto",
                 compute_dtype: torch.dtype | None = None, impl: str = "auto",
                 prefill_bucket: int = 16, cache_bucket: int = 64, hugepages: bool = False,
                 cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None):
        self.params, self.config, self.impl = params, config, impl
        if hugepages:
            self.params = hugepage_params(params)
        self.dtype = compute_dtype or params["embed"].dtype
        self.device = params["embed"].device
        self.mode = _compile_mode(compile)
        self.compiled = self.mode == "jit"  # prefill and step under torch.compile, shapes bucketed
        self.prefill_bucket = prefill_bucket if self.compiled else 1
        self.cache_bucket = cache_bucket if self.compiled else 1
        self.compiles = 0
        self.stats = DecodeStats()
        self.log = log or (lambda line: None)
        kw = dict(config=config, compute_dtype=compute_dtype)
        step_impl = _decode_impl(impl, self.mode != "off", self.device)

        # Two distinct functions, so dynamo keeps a separate (small) cache of graphs for each.
        def prefill_fn(params, tokens, cache, positions, key_mask):
            return prefill_step(params, tokens, cache, positions, key_mask, impl=impl, **kw)

        def decode_fn(params, tokens, cache, start_pos, positions, key_mask):
            return decode_step(params, tokens, cache, start_pos, positions, key_mask, impl=step_impl, **kw)

        self._jit_decode = None  # torch.compile'd step: "jit" mode, or torchair graphs on npu
        if self.compiled:
            backend = self._counting(_resolve_backend(compile))
            prefill_fn = torch.compile(prefill_fn, backend=backend, fullgraph=True, dynamic=False)
            decode_fn = torch.compile(decode_fn, backend=backend, fullgraph=True, dynamic=False)
            self._jit_decode = decode_fn
        elif self.mode != "off" and self.device.type == "npu":
            self._jit_decode = _npu_graph_step(decode_fn, self.params)
        self._prefill_fn, self._decode_fn = prefill_fn, decode_fn
        self._aot = None  # the ahead-of-time compiled steps (cpu, cuda)
        if self.mode in ("auto", "on") and self.device.type in AOT_DEVICES:
            self._aot = CompiledSteps(self.params, config, mode=self.mode, compute_dtype=self.dtype,
                                      device=self.device, impl=step_impl, directory=cache_dir, log=self.log,
                                      single_threaded=self.device.type == "cuda")
        self._graphs = None  # CUDA graph replay of the AOT step
        self._active = self._eager_step  # the decode step of the current generation (see layout)
        if self.mode == "off":
            self.log("compile: off (--compile off)")
        elif self._aot is None and self._jit_decode is None:
            self.log(f"compile: off (no compiled decode step for {self.device.type})")

    def _counting(self, backend):
        def counted(gm, example_inputs):
            self.compiles += 1
            return backend(gm, example_inputs)
        return counted

    # -- building blocks ---------------------------------------------------------------------

    def layout(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> _Batch:
        """Left-pad the prompts and size the cache (both rounded up when compiled, so that nearby
        lengths share one compiled graph); chooses the decode step for this generation."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"the model's max_seq_len={self.config.max_seq_len}")
        aot = self._select_step(len(prompts), max_new_tokens)
        p = _round_up(longest, self.prefill_bucket)
        max_len = _round_up(p + max_new_tokens, CACHE_BUCKET if aot else self.cache_bucket)
        tokens, pads = left_pad(prompts, p)
        positions = (torch.arange(p)[None, :] - pads[:, None]).clamp(min=0)
        to = dict(device=self.device)
        key_mask = None  # no padding: causality alone, and the prefill takes the causal kernels
        if bool(pads.any()):
            key_mask = (torch.arange(max_len)[None, :] >= pads[:, None]).to(**to)
        step_mask = None  # the AOT step always takes a mask: one package serves both cases
        if aot:
            step_mask = key_mask if key_mask is not None else torch.ones(len(prompts), max_len, dtype=torch.bool, **to)
        return _Batch(tokens.to(**to), pads.to(**to), positions.to(**to), key_mask, max_len, step_mask)

    def _select_step(self, batch: int, max_new_tokens: int) -> bool:
        """Pick this generation's decode step; True if it is the ahead-of-time compiled one."""
        self._active = self._eager_step
        if self._aot is not None:
            before = self._aot.warmup_s
            step = self._aot.get(batch, max_new_tokens - 1)
            self.stats.warmup_s += self._aot.warmup_s - before
            if step is not None:
                if self.device.type == "cuda":  # replayed as CUDA graphs, one set per package
                    self._graphs = self._graphs or {}
                    if step.path not in self._graphs:
                        self._graphs[step.path] = GraphStep(step)
                    step = self._graphs[step.path]
                self._active = _aot_call(step, self._aot.params)
                return True
        elif self._jit_decode is not None and self._jit_pays(max_new_tokens - 1):
            self._active = self._jit_step
        return False

    def _jit_pays(self, steps: int) -> bool:
        """"auto" on npu (no package kept across runs): compile when this run repays it."""
        if self.mode in ("jit", "on"):
            return True
        saving = estimated_saving_s(self.params, self.config, self.device, steps)
        on, reason = repays(saving, default_build_s(self.device.type, self.config.n_layers), steps)
        self.log(f"compile: {'on' if on else 'off'} ({reason})")
        return on

    def _eager_step(self, tokens, cache, start, positions, batch: _Batch):
        return self._decode_fn(self.params, tokens, cache, start, positions, batch.key_mask)

    def _jit_step(self, tokens, cache, start, positions, batch: _Batch):
        return self._jit_decode(self.params, tokens, cache, start, positions, batch.key_mask)

    def new_cache(self, batch: int, max_len: int):
        return init_cache(self.config, batch, max_len, dtype=self.dtype, device=self.device)

    def prefill(self, batch: _Batch, cache):
        return self._timed(lambda: self._prefill_fn(self.params, batch.tokens, cache, batch.positions,
                                                     batch.key_mask), "prefill_s")

    def step(self, tokens: torch.Tensor, slot: int, batch: _Batch, cache):
        """Decode one token per row ([B]) into cache slot `slot`."""
        start = torch.full((), slot, dtype=torch.long, device=self.device)
        positions = (slot - batch.pads)[:, None]
        return self._timed(lambda: self._active(tokens[:, None], cache, start, positions, batch), "decode_s")

    def _timed(self, call, bucket: str):
        before, t0 = self.compiles, time.perf_counter()
        with torch.no_grad():
            out = call()
        elapsed = time.perf_counter() - t0
        if self.compiles != before:
            self.stats.compile_s += elapsed
            self.stats.compiles += self.compiles - before
        else:
            setattr(self.stats, bucket, getattr(self.stats, bucket) + elapsed)
        return out

    def warmup(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> float:
        """Get the decode step for these shapes ready ahead of time (load or build the compiled
        step; compile in-process graphs; capture device graphs); seconds spent."""
        t0 = time.perf_counter()
        batch = self.layout(prompts, max_new_tokens)
        if self.compiled or self.device.type != "cpu":
            cache = self.new_cache(len(prompts), batch.max_len)
            logits, cache = self.prefill(batch, cache)
            token = logits.argmax(-1)
            for t in range(2):  # the second step proves the first one's graph is reused
                logits, cache = self.step(token, batch.prompt_len + t, batch, cache)
        self.stats = DecodeStats()
        return time.perf_counter() - t0

    # -- sampling strategies -----------------------------------------------------------------

    def stream(self, prompts: Sequence[Sequence[int]] | Sequence[int], *, max_new_tokens: int = 64,
               sampling: SamplingParams = GREEDY, generator: torch.Generator | None = None,
               eos_id: int | Sequence[int] | None = None, stop: Sequence[str] = (),
               tokenizer=None, results: list[Completion] | None = None) -> Iterator[StreamEvent]:
        """Yield a StreamEvent per new token of each unfinished row, as soon as it is chosen.
        Rows stop on their own (EOS, a stop string, max_new_tokens); the batch stops when all have.
        Pass a list as `results` to receive the final Completions."""
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompts = [list(p) for p in prompts]
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer to detokenise the output")
        eos = _eos_set(eos_id)
        b = len(prompts)
        self.stats = DecodeStats(prompt_tokens=sum(map(len, prompts)))
        batch = self.layout(prompts, max_new_tokens)
        cache = self.new_cache(b, batch.max_len)
        trackers = [TextTracker(tokenizer, stop, p) for p in prompts] if tokenizer is not None else None
        out = [Completion([], "" if tokenizer else None, "length") for _ in range(b)]
        done = [False] * b
        seen = seen_mask(prompts, self.config.vocab_size, self.device) \
            if sampling.repetition_penalty != 1.0 else None

        logits, cache = self.prefill(batch, cache)
        for t in range(max_new_tokens):
            next_tokens = sample(logits, sampling, generator=generator, seen=seen)
            for row, token in enumerate(next_tokens.tolist()):
                if done[row]:
                    continue
                out[row].tokens.append(token)
                text = ""
                if token in eos:
                    done[row], out[row].finish_reason = True, "eos"
                elif trackers is not None:
                    text, stopped = trackers[row].push(token)
                    if stopped:
                        done[row], out[row].finish_reason = True, "stop"
                if trackers is not None and (done[row] or t == max_new_tokens - 1):
                    text += trackers[row].finish()
                if tokenizer is not None:
                    out[row].text += text
                yield StreamEvent(row, token, text)
            if all(done) or t == max_new_tokens - 1:
                break
            if seen is not None:
                seen[torch.arange(b, device=self.device), next_tokens] = True
            logits, cache = self.step(next_tokens, batch.prompt_len + t, batch, cache)
            self.stats.decode_tokens += b
        if results is not None:
            results.extend(out)

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs) -> list[Completion]:
        """Completions for a batch of prompts (token id lists of any lengths); see `stream`."""
        results: list[Completion] = []
        for _ in self.stream(prompts, results=results, **kwargs):
            pass
        return results

    def beam_search(self, prompts: Sequence[Sequence[int]], *, num_beams: int = 4,
                    max_new_tokens: int = 64, length_penalty: float = 1.0,
                    early_stopping: bool | str = False, eos_id: int | Sequence[int] | None = None,
                    sampling: SamplingParams = GREEDY, generator: torch.Generator | None = None,
                    num_return: int = 1) -> list[list[Beam]]:
        """Beam search (or beam sampling when `sampling` has a temperature) with transformers'
        semantics: 2·num_beams candidates per step, a finished hypothesis scored by
        sum_logprobs / generated_len ** length_penalty, and early_stopping True (stop when
        num_beams hypotheses are done), False (stop when the best running beam, at its current
        length, cannot beat the worst finished one) or "never" (the same at the longest length
        when length_penalty > 0). Returns the best `num_return` beams of each prompt, best first."""
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping={early_stopping!r}; expected True, False or 'never'")
        if not 1 <= num_return <= num_beams:
            raise ValueError(f"num_return={num_return} must be in [1, num_beams={num_beams}]")
        prompts = [list(p) for p in prompts]
        search = BeamSearch(self, prompts, num_beams, max_new_tokens, length_penalty, early_stopping,
                            _eos_set(eos_id), sampling, generator)
        self.stats = DecodeStats(prompt_tokens=sum(map(len, prompts)))
        return search.run(num_return)


# ----------------------------------------------------------------------------- functional wrappers


def generate(params, config: ModelConfig, prompts, *, compile="auto", compute_dtype=None, **kwargs):
    """Completions for a batch of prompts (see `Decoder.stream` for the options)."""
    return Decoder(params, config, compile=compile, compute_dtype=compute_dtype).generate(prompts, **kwargs)


def stream(params, config: ModelConfig, prompts, *, compile="auto", compute_dtype=None, **kwargs):
    """StreamEvents as tokens are chosen (see `Decoder.stream`)."""
    return Decoder(params, config, compile=compile, compute_dtype=compute_dtype).stream(prompts, **kwargs)


def beam_search(params, config: ModelConfig, prompts, *, compile="auto", compute_dtype=None, **kwargs):
    return Decoder(params, config, compile=compile, compute_dtype=compute_dtype).beam_search(prompts, **kwargs)
