"""Text around the token stream: incremental detokenisation that cuts at stop strings without
ever taking streamed text back, the text a completion adds after its prompt, and the
AquilaChat prompt template."""

from __future__ import annotations

from typing import Sequence


class TextTracker:
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


# FlagAI / FastChat "aquila-chat" conversation template (AquilaChat).
AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
AQUILA_STOP = ("###", "</s>", "[UNK]")


def aquila_chat_prompt(history: Sequence[tuple[str, str]], *, system: str = AQUILA_SYSTEM) -> str:
    """`{system}###Human: hi###Assistant: hello###Human: {last}###Assistant:` from
    (role, message) turns, roles "Human" / "Assistant"; the model continues the last turn."""
    return system + "".join(f"###{role}: {message}" for role, message in history) + "###Assistant:"
