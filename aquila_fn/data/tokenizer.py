"""Tokenizers: one small interface over SentencePiece and Hugging Face tokenizer files.

    tok = load_tokenizer("aquila_fn/assets/tok512.model")     # SentencePiece .model
    tok = load_tokenizer("path/to/hf_dir")                    # tokenizer.json, vocab.json+merges.txt
                                                              # (Aquila), or tokenizer.model
    ids = tok.encode("Once upon a time", bos=True)
    text = tok.decode(ids)                                    # special/control tokens are dropped

Every tokenizer has ``vocab_size`` (max id + 1), ``bos_id``, ``eos_id``, ``pad_id`` and ``unk_id``
(each an int or None when the vocabulary has no such token; nothing is invented), ``encode``,
``encode_batch``, ``decode``, ``id_to_piece``, ``token_to_id`` and ``stream_decoder()`` for
printing tokens as they are generated.

Byte-level BPE as Aquila ships it (``vocab.json`` + ``merges.txt``: 100,000 BPE entries, then
special tokens such as ``<|endoftext|>`` ... ``</s>`` up to id 100007) is rebuilt on the
``tokenizers`` library: vocabulary entries that no merge produces and that look like special
tokens, plus those named in ``special_tokens_map.json`` / ``tokenizer_config.json`` /
``added_tokens.json``, are registered as special tokens, so they are matched whole in text and
dropped by ``decode``.

``padded_vocab_size`` (Megatron's rounding of the embedding rows) lives in core.config and is
re-exported here.
"""

from __future__ import annotations

import abc
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from aquila_fn.core.config import padded_vocab_size
from aquila_fn.core.files import read_json, utf8_errors
from parallel.cli import UserError

__all__ = [
    "Tokenizer",
    "TokenizerError",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "load_tokenizer",
    "check_tokenizer_fits",
    "padded_vocab_size",
]


class TokenizerError(UserError, ValueError):
    """A tokenizer file exists but cannot be used (corrupt, unknown layout, missing partner)."""


def check_tokenizer_fits(tokenizer: "Tokenizer", vocab_size: int) -> None:
    """A tokenizer whose ids reach past the model's embedding would index out of it."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, the model "
                             f"only {vocab_size}; pass the tokenizer the model was trained with")



def _ids_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensor / numpy array
        ids = ids.tolist()
    return [int(i) for i in ids]


class Tokenizer(abc.ABC):
    """The interface every tokenizer here implements."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    path: str

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Encode without adding BOS/EOS."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; BOS/EOS/pad and other special or control tokens are dropped."""

    @abc.abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The raw vocabulary entry for one id (e.g. '▁the', '<0x0A>', 'Ġthe', '</s>')."""

    @abc.abstractmethod
    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode_plain(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Iterable[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def _checked_ids(self, ids) -> list[int]:
        """ids as a list of ints, each inside the vocabulary (else an error naming them)."""
        ids = _ids_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"ids {bad[:5]} are outside the vocabulary of {self.path} "
                                 f"(size {self.vocab_size})")
        return ids

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"{type(self).__name__} from {self.path} has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"{type(self).__name__} from {self.path} has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


class StreamDecoder:
    """Incremental detokenizer for printing generated tokens one at a time.

    ``push(id)`` returns the text the new token completes ('' while a multi-byte character is
    still incomplete). The concatenation of everything pushed equals ``tok.decode(all_ids)``.
    It re-decodes only a short window (the previous chunk plus the new tokens), so each step
    costs O(window), and it needs nothing tokenizer-specific (byte fallback, byte-level BPE and
    SentencePiece's leading-space rule all come out right).
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0    # end of the text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        full_text = self.tok.decode(self.ids[self._prefix:])
        if full_text.endswith("\ufffd") or len(full_text) < len(prefix_text) \
                or not full_text.startswith(prefix_text):
            return ""  # incomplete UTF-8 sequence: wait for more tokens
        self._prefix, self._read = self._read, len(self.ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is left (e.g. a dangling partial character, as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        full_text = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text):] if full_text.startswith(prefix_text) else full_text


# ----------------------------------------------------------------------------- SentencePiece

class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (LLaMA, tok512, ...). Encoding follows the model's own
    normalizer and dummy-prefix rule, exactly as ``sentencepiece`` does."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
        try:
            sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise TokenizerError(f"{self.path} is not a valid SentencePiece model: {e}") from e
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        opt = lambda i: None if i < 0 else int(i)  # noqa: E731  (-1 = absent)
        self.bos_id = opt(sp.bos_id())
        self.eos_id = opt(sp.eos_id())
        self.pad_id = opt(sp.pad_id())
        self.unk_id = opt(sp.unk_id())

    def _encode_plain(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts, bos=False, eos=False):
        return [self._wrap(ids, bos, eos) for ids in self.sp.encode(list(texts))]

    def decode(self, ids) -> str:
        return self.sp.decode(self._checked_ids(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        # piece_to_id returns unk_id for unknown pieces
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            return None
        return int(i)


# ----------------------------------------------------------------------------- Hugging Face

_SPECIAL_LOOKING = re.compile(r"^(<\|[^|]*\|>|</?s>|<unk>|<pad>|<mask>|\[[A-Za-z_]+\])$")
_BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_GUESSES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|eot_id|>")
_PAD_GUESSES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_UNK_GUESSES = ("<unk>", "[UNK]", "<|unk|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_json(path: Path):
    return read_json(path, TokenizerError, expect=None)


def _token_content(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _read_hf_side_files(directory: Path) -> tuple[dict[str, str], dict[str, int], set[str]]:
    """Read the optional config files next to a tokenizer.

    Returns (roles {"bos": "<s>", ...}, added tokens {content: id}, names of special tokens).
    tokenizer_config.json is read first, then special_tokens_map.json overrides it.
    """
    roles: dict[str, str] = {}
    added: dict[str, int] = {}
    specials: set[str] = set()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if not f.is_file():
            continue
        cfg = _read_json(f)
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{f} should hold a JSON object")
        for role in ("bos", "eos", "pad", "unk"):
            c = _token_content(cfg.get(f"{role}_token"))
            if c is not None:
                roles[role] = c
                specials.add(c)
        for v in cfg.get("additional_special_tokens", None) or []:
            c = _token_content(v)
            if c is not None:
                specials.add(c)
        for k, v in (cfg.get("added_tokens_decoder", None) or {}).items():
            c = _token_content(v)
            if c is not None and str(k).lstrip("-").isdigit():
                added[c] = int(k)
                if not isinstance(v, dict) or v.get("special", True):
                    specials.add(c)
    f = directory / "added_tokens.json"
    if f.is_file():
        extra = _read_json(f)
        if not isinstance(extra, dict):
            raise TokenizerError(f"{f} should map token strings to ids")
        for c, i in extra.items():
            added[c] = int(i)
    return roles, added, specials


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or rebuilt from ``vocab.json`` +
    ``merges.txt``) with BOS/EOS/PAD resolved from the side files or common names."""

    def __init__(self, tok, path: str, *, roles: dict[str, str] | None = None,
                 bos_token: str | int | None = None, eos_token: str | int | None = None,
                 pad_token: str | int | None = None):
        self.tok = tok
        self.path = str(path)
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise TokenizerError(f"tokenizer from {self.path} has an empty vocabulary")
        self.vocab_size = max(vocab.values()) + 1
        # Names from the side files that the vocabulary lacks are ignored (HF tolerates them);
        # an explicit override that does not resolve is an error.
        roles = {r: t for r, t in (roles or {}).items() if t in vocab}
        for role, given in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if given is not None:
                roles[role] = given
        guesses = {"bos": _BOS_GUESSES, "eos": _EOS_GUESSES, "pad": _PAD_GUESSES, "unk": _UNK_GUESSES}
        for role, names in guesses.items():
            setattr(self, f"{role}_id", self._resolve(role, roles.get(role), names, vocab))

    def _resolve(self, role, given, guesses, vocab) -> int | None:
        if isinstance(given, int):
            if not 0 <= given < self.vocab_size:
                raise TokenizerError(f"{role} id {given} is outside the vocabulary of {self.path}")
            return given
        if given is not None:
            if given not in vocab:
                raise TokenizerError(f"{role} token {given!r} is not in the vocabulary of {self.path}")
            return vocab[given]
        for name in guesses:
            if name in vocab:
                return vocab[name]
        return None

    # -- constructors
    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, **overrides) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {p}")
        try:
            tok = _Tok.from_file(str(p))
        except Exception as e:
            raise TokenizerError(f"{p} is not a valid Hugging Face tokenizer.json: {e}") from e
        roles, _, _ = _read_hf_side_files(p.parent)
        return cls(tok, str(p), roles=roles, **overrides)

    @classmethod
    def from_vocab_merges(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike | None = None,
                          **overrides) -> "HFTokenizer":
        """Byte-level BPE (GPT-2 / Aquila layout) from vocab.json + merges.txt."""
        from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers

        vocab_file = Path(vocab_file)
        merges_file = Path(merges_file) if merges_file is not None else vocab_file.parent / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise FileNotFoundError(f"byte-level BPE file not found: {f}")
        vocab = _read_json(vocab_file)
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerError(f"{vocab_file} should map token strings to integer ids")
        merges: list[tuple[str, str]] = []
        with open(merges_file, encoding="utf-8") as f, utf8_errors(merges_file, TokenizerError):
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (n == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise TokenizerError(f"{merges_file}:{n}: a merge line needs two tokens "
                                         f"separated by one space, got {line!r}")
                merges.append((parts[0], parts[1]))

        roles, added, named_specials = _read_hf_side_files(vocab_file.parent)
        vocab = dict(vocab)
        for c, i in added.items():
            vocab.setdefault(c, i)
        # Entries neither a base byte nor made by a merge were added by hand: Aquila's
        # <|endoftext|> ... </s> at 100000..100007, GPT-2's <|endoftext|> at 50256.
        base = set(_bytes_to_unicode().values())
        produced = {a + b for a, b in merges}
        extras = [t for t in vocab if t not in base and t not in produced]
        specials = sorted({t for t in extras if _SPECIAL_LOOKING.match(t)}
                          | {t for t in named_specials if t in vocab}
                          | {t for t in added if t in vocab},
                          key=lambda t: vocab[t])
        try:
            model = models.BPE(vocab, merges)
        except Exception as e:
            raise TokenizerError(f"cannot build a BPE from {vocab_file} and {merges_file}: {e}") from e
        tok = _Tok(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(tok, str(vocab_file.parent), roles=roles, **overrides)

    # -- interface
    def _encode_plain(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, bos=False, eos=False):
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode(self._checked_ids(ids), skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        p = self.tok.id_to_token(int(i))
        if p is None:
            raise TokenizerError(f"id {i} is not in the vocabulary of {self.path}")
        return p

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


# ----------------------------------------------------------------------------- loading

def _is_sentencepiece(path: Path) -> bool:
    try:
        import sentencepiece as spm
        spm.SentencePieceProcessor(model_file=str(path))
        return True
    except Exception:
        return False


def load_tokenizer(path: str | os.PathLike, *, bos_token: str | int | None = None,
                   eos_token: str | int | None = None,
                   pad_token: str | int | None = None) -> Tokenizer:
    """Load the tokenizer at ``path``, choosing by what the path is:

    - a ``.model`` file (or any file SentencePiece can read): SentencePiece;
    - a ``tokenizer.json`` file: Hugging Face ``tokenizers``;
    - a ``vocab.json`` file: byte-level BPE with ``merges.txt`` beside it;
    - a directory holding ``tokenizer.model`` (if SentencePiece reads it), else
      ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``.

    ``bos_token``/``eos_token``/``pad_token`` (a string or an id) override what the side files
    say for Hugging Face tokenizers. Errors name the path: FileNotFoundError when nothing is
    there, TokenizerError (a ValueError) when the files are unusable.
    """
    p = Path(path)
    overrides = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
    hf_overrides = {k: v for k, v in overrides.items() if v is not None}
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_file():
        if p.name.endswith(".json"):
            if p.name == "vocab.json" or (p.name != "tokenizer.json" and (p.parent / "merges.txt").is_file()):
                return HFTokenizer.from_vocab_merges(p, **hf_overrides)
            return HFTokenizer.from_tokenizer_json(p, **hf_overrides)
        if p.name == "merges.txt":
            return HFTokenizer.from_vocab_merges(p.parent / "vocab.json", p, **hf_overrides)
        if hf_overrides:
            raise TokenizerError(f"bos/eos/pad overrides apply only to Hugging Face tokenizers, "
                                 f"not to the SentencePiece model {p}")
        return SentencePieceTokenizer(p)  # raises TokenizerError naming p if it is not one
    # a directory
    sp_file = p / "tokenizer.model"
    if sp_file.is_file() and _is_sentencepiece(sp_file):
        if hf_overrides:
            raise TokenizerError(f"bos/eos/pad overrides apply only to Hugging Face tokenizers, "
                                 f"not to the SentencePiece model {sp_file}")
        return SentencePieceTokenizer(sp_file)
    if (p / "tokenizer.json").is_file():
        return HFTokenizer.from_tokenizer_json(p / "tokenizer.json", **hf_overrides)
    if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return HFTokenizer.from_vocab_merges(p / "vocab.json", p / "merges.txt", **hf_overrides)
    if sp_file.is_file():
        return SentencePieceTokenizer(sp_file)  # raises a TokenizerError naming it
    present = sorted(x.name for x in p.iterdir())[:20]
    raise TokenizerError(
        f"no tokenizer found in directory {p}: expected tokenizer.model, tokenizer.json, or "
        f"vocab.json + merges.txt; it holds {present}")
