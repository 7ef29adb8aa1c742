#!/usr/bin/env python
"""Generate text with an Aquila / LLaMA model: llama2.c `.bin`, Hugging Face directory or native checkpoint.

    python scripts/generate.py --prompt "Once upon a time" --max-new-tokens 60      # stories260K, greedy
    python scripts/generate.py --model hf_dir --prompt "..." --temperature 0.8 --top-p 0.95 --seed 1
    python scripts/generate.py --model hf_dir --prompt "..." --num-beams 4 --length-penalty 1.0
    python scripts/generate.py --model ckpt_dir --tokenizer tok.model --batch-file prompts.txt
    python scripts/generate.py --model hf_dir --interactive                 # AquilaChat template
    python scripts/generate.py --compile on --quantize int8 --dtype bfloat16 ...

Stdout: each prompt followed by its completion (streamed for a single prompt). Stderr: the
compilation decision (--compile auto: the compiled decode step when it is cached or the run
repays compiling it), the warm-up time, and one statistics line: prefill time and decode speed
in tokens/s, one-time warm-up excluded.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

import torch

from aquila_fn.core import device
from aquila_fn.inference.generate import (AQUILA_STOP, DEFAULT_MODEL, Decoder, aquila_chat_prompt,
                                completion_text, load_model)
from aquila_fn.core.files import read_text, utf8_errors
from aquila_fn.inference.sampling import SamplingParams
from parallel import cli

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="llama2.c .bin, Hugging Face directory or native checkpoint (default: stories260K)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: the one shipped with the model)")
    p.add_argument("--prompt", default="", help="prompt text (default: empty, i.e. start from BOS)")
    p.add_argument("--batch-file", help="a file with one prompt per line, generated as one batch")
    p.add_argument("--interactive", action="store_true", help="chat on stdin with the AquilaChat template")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=256)
    p.add_argument("--temperature", type=cli.nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=cli.nonnegative_int, default=0, help="0 = off")
    p.add_argument("--top-p", type=cli.probability, default=1.0, help="1.0 = off")
    p.add_argument("--repetition-penalty", type=cli.positive_float, default=1.0)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the sampling generator")
    p.add_argument("--num-beams", type=cli.positive_int, default=1,
                   help="> 1: beam search (sampled if --temperature > 0)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", default="false", choices=["true", "false", "never"])
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 (per-channel scales)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="the ahead-of-time compiled decode step: auto (default) = when cached on disk or "
                        "the run repays compiling it (else built in the background for later runs)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="where compiled decode steps are kept (default: $AQUILA_FN_COMPILE_CACHE or "
                        "~/.cache/aquila_fn/compiled)")
    device.add_argument(p)
    p.add_argument("--threads", type=cli.positive_int, help="CPU threads (default: torch's); 1 on an oversubscribed machine")
    args = p.parse_args(argv)
    if args.interactive and args.batch_file:
        p.error("--interactive and --batch-file are exclusive")
    return args


def build(args):
    dtype = DTYPES[args.dtype]
    config, params, tok = load_model(args.model, dtype=dtype, device=args.device, tokenizer=args.tokenizer)
    if tok is None:
        raise cli.UserError(f"no tokenizer found for {args.model}; pass --tokenizer")
    if args.quantize == "int8":
        from aquila_fn.core.quantize import quantize_params
        params = quantize_params(params)
    # Compiled CPU decoding is bandwidth-bound: huge pages speed up its sweep over the weights.
    hugepages = args.compile != "off" and args.device.type == "cpu"
    decoder = Decoder(params, config, compile=args.compile, compute_dtype=dtype, hugepages=hugepages,
                      cache_dir=args.compile_cache, log=lambda line: print(line, file=sys.stderr, flush=True))
    return decoder, tok


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, bos=tok.bos_id is not None)


def fit_max_new(decoder: Decoder, prompts: list[list[int]], wanted: int, err: TextIO) -> int:
    """Clamp to the context window, as llama2.c does, instead of failing."""
    room = decoder.config.max_seq_len - max(map(len, prompts))
    if room < 1:
        raise cli.UserError(f"the prompt ({max(map(len, prompts))} tokens) fills the "
                            f"model's context of {decoder.config.max_seq_len}; shorten it")
    if wanted > room:
        print(f"note: --max-new-tokens {wanted} reduced to {room} to fit max_seq_len", file=err)
    return min(wanted, room)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[:min(hits)] if hits else text


def generation_kwargs(args, tok, max_new: int, stops: Sequence[str]) -> dict:
    return dict(max_new_tokens=max_new, sampling=sampling_params(args),
                generator=args.generator, eos_id=tok.eos_id, stop=stops,
                tokenizer=tok)


def complete(args, decoder: Decoder, tok, texts: list[str], out: TextIO, err: TextIO,
             stops: Sequence[str] = ()) -> list[str]:
    """Generate for the prompts, writing prompt + completion to `out`; the completions' text."""
    prompts = [encode(tok, t) for t in texts]
    max_new = fit_max_new(decoder, prompts, args.max_new_tokens, err)
    warmup_s = warm(args, decoder, prompts, max_new)
    if args.num_beams > 1:
        completions = beam_texts(args, decoder, tok, prompts, max_new, stops)
        for text, completion in zip(texts, completions):
            out.write(text + completion + "\n")
    elif len(prompts) == 1:
        out.write(texts[0])
        completions = [stream_text(decoder.stream(prompts, **generation_kwargs(args, tok, max_new, stops)), out)]
    else:
        results = decoder.generate(prompts, **generation_kwargs(args, tok, max_new, stops))
        completions = [r.text for r in results]
        for i, (text, completion) in enumerate(zip(texts, completions)):
            out.write(("\n" if i else "") + text + completion + "\n")
    out.flush()
    report(decoder, warmup_s, err)
    return completions


def warm(args, decoder: Decoder, prompts: list[list[int]], max_new: int) -> float:
    """Choose, load or build the decode step ahead of the timed run, so the statistics exclude it."""
    rows = [p for p in prompts for _ in range(args.num_beams)]
    return decoder.warmup(rows, max_new)


def beam_texts(args, decoder: Decoder, tok, prompts, max_new: int, stops) -> list[str]:
    sampling = sampling_params(args)
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    beams = decoder.beam_search(prompts, num_beams=args.num_beams, max_new_tokens=max_new,
                                length_penalty=args.length_penalty, early_stopping=early,
                                eos_id=tok.eos_id, sampling=sampling,
                                generator=args.generator)
    return [cut_at_stop(completion_text(tok, prompt, best[0].tokens), stops)
            for prompt, best in zip(prompts, beams)]


def report(decoder: Decoder, warmup_s: float, err: TextIO) -> None:
    print(f"{decoder.stats.summary()} | warm-up: {warmup_s:.2f} s (excluded)", file=err, flush=True)


def interactive(args, decoder: Decoder, tok, inp: TextIO, out: TextIO, err: TextIO) -> None:
    """Chat: each stdin line is a human turn; the history is kept, oldest turns dropped to fit."""
    history: list[tuple[str, str]] = []
    stops = list(AQUILA_STOP) + args.stop
    out.write("###Human: ")
    out.flush()
    for line in inp:
        message = line.rstrip("\n")
        if not message.strip():
            out.write("###Human: ")
            out.flush()
            continue
        history.append(("Human", message))
        while len(history) > 1 and len(encode(tok, aquila_chat_prompt(history))) + args.max_new_tokens \
                > decoder.config.max_seq_len:
            history = history[2:]  # drop the oldest exchange
        prompt = aquila_chat_prompt(history)
        out.write("###Assistant:")
        reply = complete_chat(args, decoder, tok, prompt, stops, out, err)
        history.append(("Assistant", reply.strip()))
        out.write("###Human: ")
        out.flush()
    out.write("\n")


def stream_text(events, out: TextIO) -> str:
    """Write each new piece of text as soon as it is decoded; the whole completion."""
    out.flush()
    pieces = []
    for event in events:
        out.write(event.text)
        out.flush()
        pieces.append(event.text)
    out.write("\n")
    return "".join(pieces)


def complete_chat(args, decoder, tok, prompt: str, stops, out: TextIO, err: TextIO) -> str:
    prompts = [encode(tok, prompt)]
    max_new = fit_max_new(decoder, prompts, args.max_new_tokens, err)
    warmup_s = warm(args, decoder, prompts, max_new) if args.num_beams == 1 else 0.0
    text = stream_text(decoder.stream(prompts, **generation_kwargs(args, tok, max_new, stops)), out)
    report(decoder, warmup_s, err)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with cli.user_errors():
        run(args)
    return 0


def run(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = None if args.interactive else read_prompts(args)  # a bad --batch-file fails before loading
    print(device.header("generate", args.device, dtype=args.dtype), file=sys.stderr, flush=True)
    decoder, tok = build(args)
    args.generator = device.generator(args.device, args.seed)  # one stream for the whole session
    with torch.no_grad():
        if args.interactive:
            with utf8_errors("<stdin>"):
                interactive(args, decoder, tok, sys.stdin, sys.stdout, sys.stderr)
        else:
            complete(args, decoder, tok, texts, sys.stdout, sys.stderr, args.stop)


def read_prompts(args) -> list[str]:
    """--prompt, or the lines of --batch-file."""
    if not args.batch_file:
        return [args.prompt]
    texts = [line for line in read_text(args.batch_file).split("\n") if line.strip()]
    if not texts:
        raise cli.UserError(f"--batch-file {args.batch_file} holds no prompts")
    return texts


if __name__ == "__main__":
    sys.exit(main())
