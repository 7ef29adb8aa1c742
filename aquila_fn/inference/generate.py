"""Text generation: a static KV cache, a prefill function and a one-token decode step (compiled once
with static shapes), and the decoding strategies on top of them.

    config, params, tok = load_model("aquila_fn/assets/stories260K.bin")
    decoder = Decoder(params, config, compile=True)
    [out] = decoder.generate([tok.encode("Once upon a time", bos=True)], max_new_tokens=50,
                             tokenizer=tok, eos_id=tok.eos_id)
    for event in decoder.stream([ids], sampling=SamplingParams(temperature=0.8), tokenizer=tok,
                                generator=torch.Generator().manual_seed(0)):
        print(event.text, end="", flush=True)
    [beams] = decoder.beam_search([ids], num_beams=4, max_new_tokens=20, eos_id=tok.eos_id)

Layout of a batch: prompts are left-padded to a common length P, so every row writes cache slot
P + t at decode step t and one scalar `start_pos` serves the whole batch; each row's rotary
positions are its slot minus its padding, and `key_mask` hides the padding slots. The cache has a
fixed length, so the decode step sees the same shapes at every step: the position is a 0-d tensor,
never a Python int, and decoding N tokens compiles nothing after the first step.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from aquila_fn.core.config import ConfigError, ModelConfig
from aquila_fn.inference.decode_compile import (AOT_DEVICES, CACHE_BUCKET, CompiledSteps, default_build_s,
                                      estimated_saving_s, repays)
from aquila_fn.core.model import forward, init_cache, project_logits
from aquila_fn.inference.sampling import GREEDY, SamplingParams, penalise, sample, seen_mask, warp
from aquila_fn.inference.step_graph import GraphStep

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "stories260K.bin"
DEFAULT_TOKENIZER = ASSETS / "tok512.model"

__all__ = ["Decoder", "Completion", "StreamEvent", "DecodeStats", "Beam", "load_model", "generate",
           "stream", "beam_search", "prefill_step", "decode_step", "left_pad", "decode_backend",
           "hugepage_params",
           "aquila_chat_prompt", "completion_text", "AQUILA_SYSTEM", "AQUILA_STOP", "DEFAULT_MODEL", "DEFAULT_TOKENIZER"]


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
class Beam:
    tokens: list[int]
    score: float  # sum of log-probabilities / generated_length ** length_penalty


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


# ----------------------------------------------------------------------------- pure step functions


def prefill_step(params, tokens, cache, positions, key_mask, *, config: ModelConfig,
                 compute_dtype=None, impl="auto"):
    """Run the prompt [B, P] through the model, filling cache slots 0..P-1; logits [B, V] of the
    last position (left padding puts every row's last real token there)."""
    hidden, cache = forward(params, tokens, config, cache=cache, start_pos=0, positions=positions,
                            attn_mask=key_mask, compute_dtype=compute_dtype, impl=impl,
                            return_hidden=True)
    # Project only the last position: a [B, P, V] logits tensor would be wasted work.
    return project_logits(params, hidden[:, -1]), cache


def decode_step(params, tokens, cache, start_pos, positions, key_mask, *, config: ModelConfig,
                compute_dtype=None, impl="auto"):
    """One token per row: tokens [B, 1] go to cache slot `start_pos` (a 0-d tensor) at rotary
    positions [B, 1]; returns logits [B, V]."""
    logits, cache = forward(params, tokens, config, cache=cache, start_pos=start_pos,
                            positions=positions, attn_mask=key_mask, compute_dtype=compute_dtype,
                            impl=impl)
    return logits[:, -1], cache


# ----------------------------------------------------------------------------- compilation


def _matvec_as_reduction(a: torch.Tensor, b: torch.Tensor):
    """aten.mm for one row: a fused multiply-and-sum over the contiguous dim of the weight, which
    inductor's C++ code runs at memory bandwidth (MKL's sgemv reaches ~1/3 of it here), and which
    fuses the int8 -> float conversion of quantised weights into the same loop."""
    if a.shape[0] == 1 and b.dim() == 2 and b.stride(0) == 1:  # b is a transposed (out, in) weight
        # Materialise the activation first: otherwise inductor inlines its producer (the RMS
        # norm) into the loop and recomputes it for every weight row, 4x slower for int8.
        a = torch.ops.prims.inductor_force_stride_order.default(a, a.stride())
        acc = torch.float32
        return (a.to(acc).unsqueeze(1) * b.t().to(acc).unsqueeze(0)).sum(-1).to(a.dtype)
    return NotImplemented


def _batched_matvec_as_reduction(a: torch.Tensor, b: torch.Tensor):
    """aten.bmm for one query row per batch (attention scores and the probability-weighted sum
    of values at decode). Materialising `a` matters most here: inlined, the query's rotary
    embedding (pow, cos, sin) would be recomputed for every cached key."""
    if a.shape[1] != 1:
        return NotImplemented
    a = torch.ops.prims.inductor_force_stride_order.default(a, a.stride())
    if b.stride(1) == 1:  # b = keys transposed: reduce along their contiguous head dim
        return (a.unsqueeze(2) * b.transpose(1, 2).unsqueeze(1)).sum(-1)
    return (a.transpose(1, 2) * b).sum(1, keepdim=True)


def decode_backend(gm: torch.fx.GraphModule, example_inputs):
    """Inductor with single-row matrix products rewritten as reductions (see above)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    decompositions = dict(select_decomp_table())
    decompositions[torch.ops.aten.mm.default] = _matvec_as_reduction
    decompositions[torch.ops.aten.bmm.default] = _batched_matvec_as_reduction
    return compile_fx(gm, example_inputs, decompositions=decompositions)


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


# ----------------------------------------------------------------------------- stop strings


class _TextTracker:
    """Incremental text of one row: detokenises as tokens come, cuts at the first stop string,
    and holds back a tail that might still become one, so streamed text never has to be taken back."""

    def __init__(self, tokenizer, stops: Sequence[str], context: Sequence[int] = ()):
        self.decoder = tokenizer.stream_decoder()
        for token in context[-8:]:  # the prompt's tail: a completion's first word keeps its space
            self.decoder.push(token)
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """(newly safe text, whether a stop string was hit)."""
        self.text += self.decoder.push(token)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._emit(len(self.text)), True
        return self._emit(len(self.text) - self._pending_stop_prefix()), False

    def finish(self) -> str:
        self.text += self.decoder.flush()
        return self._emit(len(self.text))

    def _pending_stop_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, upto: int) -> str:
        out = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return out


def completion_text(tokenizer, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text `tokens` add after `prompt` (decoding them alone would drop a leading space)."""
    context = list(prompt[-8:])
    head = tokenizer.decode(context)
    full = tokenizer.decode(context + list(tokens))
    return full[len(head):] if full.startswith(head) else tokenizer.decode(list(tokens))


def _eos_set(eos_id) -> set[int]:
    if eos_id is None:
        return set()
    return {int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id}


# ----------------------------------------------------------------------------- the decoder


class Decoder:
    """Holds a model, its (optionally compiled) prefill and decode step, and the strategies.

    compile: "auto" (default): the decode step compiled ahead of time (aquila_fn.inference.decode_compile)
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
        trackers = [_TextTracker(tokenizer, stop, p) for p in prompts] if tokenizer is not None else None
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
        search = _BeamSearch(self, [list(p) for p in prompts], num_beams, max_new_tokens,
                             length_penalty, early_stopping, _eos_set(eos_id), sampling, generator)
        return search.run(num_return)


# ----------------------------------------------------------------------------- beam search


class _BeamSearch:
    """State of one beam search over B prompts x K beams, kept as [B, K, ...] tensors."""

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
        d.stats = DecodeStats(prompt_tokens=sum(map(len, self.prompts[::k])))
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


# ----------------------------------------------------------------------------- functional wrappers


def generate(params, config: ModelConfig, prompts, *, compile="auto", compute_dtype=None, **kwargs):
    """Completions for a batch of prompts (see `Decoder.stream` for the options)."""
    return Decoder(params, config, compile=compile, compute_dtype=compute_dtype).generate(prompts, **kwargs)


def stream(params, config: ModelConfig, prompts, *, compile="auto", compute_dtype=None, **kwargs):
    """StreamEvents as tokens are chosen (see `Decoder.stream`)."""
    return Decoder(params, config, compile=compile, compute_dtype=compute_dtype).stream(prompts, **kwargs)


def beam_search(params, config: ModelConfig, prompts, *, compile="auto", compute_dtype=None, **kwargs):
    return Decoder(params, config, compile=compile, compute_dtype=compute_dtype).beam_search(prompts, **kwargs)


# ----------------------------------------------------------------------------- chat


# FlagAI / FastChat "aquila-chat" conversation template (AquilaChat).
AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
AQUILA_STOP = ("###", "</s>", "[UNK]")


def aquila_chat_prompt(history: Sequence[tuple[str, str]], *, system: str = AQUILA_SYSTEM) -> str:
    """`{system}###Human: hi###Assistant: hello###Human: {last}###Assistant:` from
    (role, message) turns, roles "Human" / "Assistant"; the model continues the last turn."""
    return system + "".join(f"###{role}: {message}" for role, message in history) + "###Assistant:"


# ----------------------------------------------------------------------------- loading


def _is_llama2c(path: Path) -> bool:
    if not path.is_file():
        return False
    from aquila_fn.interop.llama2c import Llama2cFormatError, read_llama2c_header
    try:
        read_llama2c_header(path)  # checks the header's fields
        return True
    except Llama2cFormatError:
        return False


def _tokenizer_near(path: Path):
    """A tokenizer shipped beside (or inside) a model, if any."""
    from aquila_fn.data.tokenizer import load_tokenizer
    if path.resolve() == DEFAULT_MODEL.resolve():
        return load_tokenizer(DEFAULT_TOKENIZER)
    directory = path if path.is_dir() else path.parent
    for name in ("tokenizer.model", "tokenizer.json", "vocab.json"):
        if (directory / name).is_file():
            return load_tokenizer(directory if name != "tokenizer.model" else directory / name)
    return None


def load_model(path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", tokenizer: str | os.PathLike | None = None):
    """(config, params, tokenizer or None) from a llama2.c `.bin`, a Hugging Face directory
    (config.json + safetensors / pytorch_model.bin) or a native aquila_fn checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no model (llama2.c file, Hugging Face directory or "
                                "aquila-fn checkpoint) here", str(path))
    if path.is_dir() and (path / "config.json").is_file():
        from aquila_fn.interop.hf import load_hf
        config, params = load_hf(path, dtype=dtype, device=device)
    elif _is_llama2c(path):
        from aquila_fn.interop.llama2c import load_llama2c
        config, params = load_llama2c(path)
    else:
        config, params, tokenizer = _load_native(path, tokenizer)
    from aquila_fn.core import pytree
    params = pytree.tree_map(lambda x: _cast(x, dtype, device), params)
    from aquila_fn.data.tokenizer import check_tokenizer_fits, load_tokenizer
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _tokenizer_near(path)
    if tok is not None:
        check_tokenizer_fits(tok, config.vocab_size)
    return config, params, tok


def _load_native(path: Path, tokenizer):
    """A native checkpoint (a pretrain.py output directory, a run directory, a step directory or a
    rank file; the newest checkpoint is taken); its metadata must hold the config, and may name
    the tokenizer the run used."""
    from aquila_fn.training.checkpoint import CheckpointError, load_checkpoint, latest_checkpoint, read_metadata
    if path.is_dir() and latest_checkpoint(path / "checkpoints"):  # a pretrain.py output directory
        path = path / "checkpoints"
    try:
        read_metadata(path)
    except CheckpointError as e:  # no checkpoint header at all: say what was looked for
        problem = str(e).removeprefix(f"{path}: ")
        if path.is_dir():
            raise CheckpointError(f"{path}: no model in this directory (no Hugging Face config.json, no "
                                  f"aquila-fn checkpoint: {problem})") from None
        raise CheckpointError(f"{path} is not a model: neither a llama2.c file (no valid header) nor an "
                              f"aquila-fn checkpoint ({problem})") from None
    state, metadata = load_checkpoint(path)
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"checkpoint {path} has no model config in its metadata")
    try:
        config = ModelConfig.from_dict(metadata["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its model config is invalid: {e}") from None
    params = state["params"] if isinstance(state, dict) and "params" in state else state
    if tokenizer is None:
        named = metadata.get("tokenizer") or (metadata.get("args") or {}).get("tokenizer")
        if isinstance(named, str) and Path(named).exists():
            tokenizer = named
    return config, params, tokenizer


def _cast(x: torch.Tensor, dtype, device) -> torch.Tensor:
    # Integer leaves (int8 weights) keep their dtype; float leaves follow `dtype`.
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x.to(device)
