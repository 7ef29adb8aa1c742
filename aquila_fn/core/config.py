"""Model configuration: a frozen dataclass, named presets, and Hugging Face `config.json` import."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from aquila_fn.core.files import read_json
from parallel.cli import UserError


class ConfigError(UserError, ValueError):
    """An invalid configuration; the message names the field and the value."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # True when the vocabulary size is fixed by released weights and must not follow a tokenizer.
    vocab_pinned: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name}={value!r} must be a positive integer")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"config field {name}={value!r} must be a number")
        for name in ("tie_embeddings", "vocab_pinned"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name}={getattr(self, name)!r} must be true or false")
        if self.dim % self.n_heads:
            raise ConfigError(f"config field n_heads={self.n_heads} does not divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config field n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if not self.norm_eps > 0:
            raise ConfigError(f"config field norm_eps={self.norm_eps!r} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def with_vocab(self, tokenizer_vocab: int, multiple: int = 128) -> "ModelConfig":
        """Follow a tokenizer's vocabulary, padded up to `multiple` as Megatron does, unless pinned."""
        if self.vocab_pinned:
            if tokenizer_vocab > self.vocab_size:
                raise ConfigError(
                    f"tokenizer has {tokenizer_vocab} tokens but the config pins vocab_size={self.vocab_size}")
            return self
        return self.replace(vocab_size=padded_vocab_size(tokenizer_vocab, multiple))

    def num_params(self) -> int:
        d, f, v = self.dim, self.ffn_dim, self.vocab_size
        per_layer = 2 * d + d * self.dim + 2 * d * self.kv_dim + self.dim * d + 3 * d * f
        return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * per_layer + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·hd·S."""
        n = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        return 6 * n + 12 * self.n_layers * self.dim * seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config is an object of fields, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        unknown = set(d) - {f.name for f in fields}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ConfigError(f"config lacks field(s): {', '.join(missing)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """From a JSON file: `to_dict()`'s fields or a Hugging Face config.json."""
        raw = read_json(path, ConfigError)
        try:
            return cls.from_hf(raw) if "hidden_size" in raw else cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{os.fspath(path)}: {e}") from None

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Build from a Hugging Face Llama/Aquila `config.json` (a path, a directory or a dict)."""
        if isinstance(source, dict):
            hf = source
        else:
            path = os.path.join(source, "config.json") if os.path.isdir(source) else os.fspath(source)
            if not os.path.isfile(path):
                raise ConfigError(f"no Hugging Face config at {path}")
            hf = read_json(path, ConfigError)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in hf]
        if missing:
            raise ConfigError(f"Hugging Face config lacks field(s): {', '.join(missing)}")
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling:
            raise ConfigError(f"config field rope_scaling={rope_scaling!r} is not supported")
        return cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_float(hf.get("rope_theta", 10000.0)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
            vocab_pinned=True,
        )

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` that transformers' LlamaForCausalLM loads."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }


PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: trains visibly in minutes on 2 CPU cores.
    "tiny": ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688, vocab_size=512,
                        max_seq_len=512, norm_eps=1e-5, tie_embeddings=True),
    # The benchmark model.
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376, vocab_size=32000,
                         max_seq_len=2048, norm_eps=1e-5, vocab_pinned=True),
    "stories260k": ModelConfig(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, ffn_dim=172, vocab_size=512,
                               max_seq_len=512, norm_eps=1e-5, tie_embeddings=True, vocab_pinned=True),
    "aquila-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                             vocab_size=100008, max_seq_len=2048, norm_eps=1e-6, vocab_pinned=True),
    "aquila2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                              vocab_size=100008, max_seq_len=2048, norm_eps=1e-5, vocab_pinned=True),
    # rope_theta is the LLaMA default here, not checked against BAAI's release: for real
    # weights the checkpoint's config.json (ModelConfig.from_hf) is authoritative.
    "aquila2-34b": ModelConfig(dim=6144, n_layers=60, n_heads=48, n_kv_heads=8, ffn_dim=24576,
                               vocab_size=100008, max_seq_len=4096, norm_eps=1e-5,
                               vocab_pinned=True),
    "llama-2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                              vocab_size=32000, max_seq_len=4096, norm_eps=1e-5, vocab_pinned=True),
}


def _float(value: Any) -> Any:
    """Numbers as float; anything else is left for ModelConfig's check to name."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def get_config(name: str, **overrides) -> ModelConfig:
    """A preset by name, optionally with fields replaced."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown config preset {name!r}; known: {', '.join(PRESETS)}") from None
    return config.replace(**overrides) if overrides else config

def padded_vocab_size(n: int, multiple: int = 128, tp_size: int = 1) -> int:
    """Round a vocabulary size up the way Megatron does (``make_vocab_size_divisible_by`` times
    the tensor-parallel size), so the embedding splits evenly and matmuls stay aligned.

    padded_vocab_size(100008) == 100096; padded_vocab_size(32000) == 32000.
    """
    if n <= 0 or multiple <= 0 or tp_size <= 0:
        raise ValueError(f"padded_vocab_size needs positive arguments, got n={n}, "
                         f"multiple={multiple}, tp_size={tp_size}")
    m = multiple * tp_size
    return -(-n // m) * m
