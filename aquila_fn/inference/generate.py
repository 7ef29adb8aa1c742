"""Text generation in one import: the decoder, beam search, streaming text and model loading,
gathered from their modules (decoder, beam, text, steps, loading in aquila_fn.inference).

    config, params, tok = load_model("aquila_fn/assets/stories260K.bin")
    decoder = Decoder(params, config, compile=True)
    [out] = decoder.generate([tok.encode("Once upon a time", bos=True)], max_new_tokens=50,
                             tokenizer=tok, eos_id=tok.eos_id)
    for event in decoder.stream([ids], sampling=SamplingParams(temperature=0.8), tokenizer=tok,
                                generator=torch.Generator().manual_seed(0)):
        print(event.text, end="", flush=True)
    [beams] = decoder.beam_search([ids], num_beams=4, max_new_tokens=20, eos_id=tok.eos_id)
"""

from aquila_fn.inference.beam import Beam
from aquila_fn.inference.decoder import (Completion, DecodeStats, Decoder, StreamEvent, beam_search, generate,
                                         hugepage_params, left_pad, stream)
from aquila_fn.inference.loading import ASSETS, DEFAULT_MODEL, DEFAULT_TOKENIZER, load_model
from aquila_fn.inference.steps import decode_backend, decode_step, prefill_step
from aquila_fn.inference.text import AQUILA_STOP, AQUILA_SYSTEM, aquila_chat_prompt, completion_text

__all__ = ["Decoder", "Completion", "StreamEvent", "DecodeStats", "Beam", "load_model", "generate",
           "stream", "beam_search", "prefill_step", "decode_step", "left_pad", "decode_backend",
           "hugepage_params",
           "aquila_chat_prompt", "completion_text", "AQUILA_SYSTEM", "AQUILA_STOP", "DEFAULT_MODEL", "DEFAULT_TOKENIZER",
           "ASSETS"]
