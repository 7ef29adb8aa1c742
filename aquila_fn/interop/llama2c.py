"""Import and export of Karpathy's llama2.c checkpoints (``run.c``'s ``.bin`` files).

    config, params = load_llama2c("aquila_fn/assets/stories260K.bin")
    save_llama2c("out.bin", config, params)

Two layouts are read, both float32 and little-endian:

- legacy (version 0, what ``export.py --version 0`` and the tinyllamas files use): a header of
  7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len), then
  token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, the RoPE tables
  freq_cis_real and freq_cis_imag (max_seq_len x head_dim/2 each, skipped here), and, only
  when vocab_size in the header is negative, an untied classifier;
- version 1: a 256-byte header (magic "ak42" as uint32 0x616b3432, int32 version 1, the same
  7 int32, a uint8 shared-classifier flag, zero padding), then rms_att, rms_ffn, rms_final,
  token embedding, wq, wk, wv, wo, w1, w2, w3 and the optional classifier.

Every matrix is stored (out, in), the nn.Linear layout the parameter tree uses. llama2.c rotates
interleaved pairs (x[2i], x[2i+1]) within each head; this project rotates halves (Hugging Face's
layout), so the rows of wq and wk are permuted within each head on import, (h, i, 2) -> (h, 2, i),
which is what transformers' convert_llama_weights_to_hf.py ``permute`` does, and back on export.
The norm epsilon (1e-5) and RoPE theta (10000) are not stored; they are llama2.c's constants.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from aquila_fn.core.config import ModelConfig
from parallel.cli import UserError

__all__ = ["Llama2cFormatError", "load_llama2c", "save_llama2c", "read_llama2c_header",
           "interleaved_to_half", "half_to_interleaved"]

MAGIC = 0x616B3432  # "ak42"
LEGACY_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
NORM_EPS = 1e-5
ROPE_THETA = 10000.0


class Llama2cFormatError(UserError, ValueError):
    """A llama2.c file whose header or size does not describe a valid checkpoint."""


# ----------------------------------------------------------------------------- RoPE layouts

def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Meta's interleaved RoPE layout to rotate-half:
    within each head, output row (2*i + j) moves to (j * head_dim/2 + i)."""
    out, d = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, d).transpose(1, 2).reshape(out, d)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half`."""
    out, d = w.shape
    hd = out // n_heads
    return w.reshape(n_heads, 2, hd // 2, d).transpose(1, 2).reshape(out, d)


# ----------------------------------------------------------------------------- header

def _check_dims(path, dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len):
    fields = dict(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, vocab_size=abs(vocab_size), max_seq_len=max_seq_len)
    desc = ", ".join(f"{k}={v}" for k, v in fields.items())
    problem = None
    bad = [k for k, v in fields.items() if v <= 0]
    if bad:
        problem = f"{', '.join(bad)} must be positive"
    elif any(v > 1 << 24 for v in fields.values()):
        problem = "a field is implausibly large (more than 2**24)"
    elif dim % n_heads:
        problem = f"n_heads={n_heads} does not divide dim={dim}"
    elif n_heads % n_kv_heads:
        problem = f"n_kv_heads={n_kv_heads} does not divide n_heads={n_heads}"
    elif (dim // n_heads) % 2:
        problem = f"head_dim={dim // n_heads} is odd"
    if problem:
        raise Llama2cFormatError(f"bad llama2.c header in {path}: {problem} (header: {desc})")


def read_llama2c_header(path: str | os.PathLike) -> dict:
    """The header of a llama2.c file as a dict: version, dim, hidden_dim, n_layers, n_heads,
    n_kv_heads, vocab_size (absolute), max_seq_len, shared_classifier, header_bytes,
    expected_bytes, actual_bytes. Raises FileNotFoundError / Llama2cFormatError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise Llama2cFormatError(f"{p} is a directory, not a llama2.c file")
    if not p.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {p}")
    actual = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < LEGACY_HEADER_BYTES:
        raise Llama2cFormatError(
            f"{p} is {actual} bytes, too short for a llama2.c header ({LEGACY_HEADER_BYTES} bytes)")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise Llama2cFormatError(
                f"{p} is {actual} bytes, too short for a version-1 llama2.c header ({V1_HEADER_BYTES} bytes)")
        (version,) = struct.unpack("<i", head[4:8])
        if version != 1:
            kind = " (int8-quantised, Q8_0)" if version == 2 else ""
            raise Llama2cFormatError(
                f"{p} is a llama2.c file of version {version}{kind}; only float32 files "
                f"(legacy version 0 and version 1) can be loaded")
        dims = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        header_bytes = V1_HEADER_BYTES
        _check_dims(p, *dims)
    else:
        version = 0
        dims = struct.unpack("<7i", head[:28])
        _check_dims(p, *dims)
        shared = dims[5] > 0
        header_bytes = LEGACY_HEADER_BYTES
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len = dims
    vocab_size = abs(vocab_size)
    info = dict(version=version, dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                n_kv_heads=n_kv_heads, vocab_size=vocab_size, max_seq_len=max_seq_len,
                shared_classifier=shared, header_bytes=header_bytes)
    n_floats = sum(n for _, n in _layout(info))
    info["expected_bytes"] = header_bytes + 4 * n_floats
    info["actual_bytes"] = actual
    return info


def _layout(h: dict) -> list[tuple[str, int]]:
    """(name, number of float32) in file order."""
    d, f, n = h["dim"], h["hidden_dim"], h["n_layers"]
    hd = d // h["n_heads"]
    q, kv, v = h["n_heads"] * hd, h["n_kv_heads"] * hd, h["vocab_size"]
    mats = [("wq", n * q * d), ("wk", n * kv * d), ("wv", n * kv * d), ("wo", n * d * q),
            ("w1", n * f * d), ("w2", n * d * f), ("w3", n * f * d)]
    if h["version"] == 0:
        order = [("embed", v * d), ("rms_att", n * d), *mats[:4], ("rms_ffn", n * d), *mats[4:],
                 ("rms_final", d), ("freq_cis_real", h["max_seq_len"] * hd // 2),
                 ("freq_cis_imag", h["max_seq_len"] * hd // 2)]
    else:
        order = [("rms_att", n * d), ("rms_ffn", n * d), ("rms_final", d), ("embed", v * d), *mats]
    if not h["shared_classifier"]:
        order.append(("wcls", v * d))
    return order


def _describe(h: dict) -> str:
    return (f"dim={h['dim']}, hidden_dim={h['hidden_dim']}, n_layers={h['n_layers']}, "
            f"n_heads={h['n_heads']}, n_kv_heads={h['n_kv_heads']}, vocab_size={h['vocab_size']}, "
            f"max_seq_len={h['max_seq_len']}, "
            f"{'shared' if h['shared_classifier'] else 'separate'} classifier")


# ----------------------------------------------------------------------------- load / save

def load_llama2c(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> tuple[ModelConfig, dict]:
    """Read a float32 llama2.c checkpoint into (config, params) in this project's layout
    (rotate-half RoPE rows, ``lm_head`` only when the classifier is not shared)."""
    h = read_llama2c_header(path)
    p = Path(path)
    if h["actual_bytes"] != h["expected_bytes"]:
        raise Llama2cFormatError(
            f"{p} has {h['actual_bytes']} bytes but its llama2.c header (version {h['version']}: "
            f"{_describe(h)}) needs exactly {h['expected_bytes']} bytes; the file is "
            f"{'truncated' if h['actual_bytes'] < h['expected_bytes'] else 'longer than expected'} "
            f"or the header is wrong")
    d, f, n = h["dim"], h["hidden_dim"], h["n_layers"]
    hd = d // h["n_heads"]
    q, kv, v = h["n_heads"] * hd, h["n_kv_heads"] * hd, h["vocab_size"]
    shapes = {"embed": (v, d), "rms_att": (n, d), "rms_ffn": (n, d), "rms_final": (d,),
              "wq": (n, q, d), "wk": (n, kv, d), "wv": (n, kv, d), "wo": (n, d, q),
              "w1": (n, f, d), "w2": (n, d, f), "w3": (n, f, d), "wcls": (v, d)}

    data = np.memmap(p, dtype="<f4", mode="r", offset=h["header_bytes"])
    t: dict[str, torch.Tensor] = {}
    off = 0
    for name, count in _layout(h):
        if name in shapes:
            arr = np.array(data[off:off + count]).reshape(shapes[name])  # copy out of the map
            t[name] = torch.from_numpy(arr)
        off += count
    del data

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=dtype, device=device).contiguous()

    layers = []
    for i in range(n):
        layers.append({
            "attn_norm": cast(t["rms_att"][i]),
            "attn": {"wq": cast(interleaved_to_half(t["wq"][i], h["n_heads"])),
                     "wk": cast(interleaved_to_half(t["wk"][i], h["n_kv_heads"])),
                     "wv": cast(t["wv"][i]), "wo": cast(t["wo"][i])},
            "mlp_norm": cast(t["rms_ffn"][i]),
            "mlp": {"w_gate": cast(t["w1"][i]), "w_up": cast(t["w3"][i]), "w_down": cast(t["w2"][i])},
        })
    params = {"embed": cast(t["embed"]), "layers": layers, "norm": cast(t["rms_final"])}
    if not h["shared_classifier"]:
        params["lm_head"] = cast(t["wcls"])
    config = ModelConfig(dim=d, n_layers=n, n_heads=h["n_heads"], n_kv_heads=h["n_kv_heads"],
                         ffn_dim=f, vocab_size=v, max_seq_len=h["max_seq_len"], norm_eps=NORM_EPS,
                         rope_theta=ROPE_THETA, tie_embeddings=h["shared_classifier"],
                         vocab_pinned=True)
    return config, params


def _rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """llama2.c model.py's precompute_freqs_cis, computed the same way (float32 throughout)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(max_seq_len, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def save_llama2c(path: str | os.PathLike, config: ModelConfig, params: dict, *, version: int = 0) -> None:
    """Write (config, params) as a float32 llama2.c file (legacy version 0 by default, or 1).

    The file is written to ``path + '.tmp'`` and renamed into place. llama2.c has no fields for
    norm_eps or rope_theta; a config that differs from its constants (1e-5, 10000) is refused
    rather than silently changed."""
    _check_exportable(config, params, version)
    shared = "lm_head" not in params
    parts = _llama2c_arrays(config, params)
    h = dict(version=version, dim=config.dim, hidden_dim=config.ffn_dim, n_layers=config.n_layers,
             n_heads=config.n_heads, n_kv_heads=config.n_kv_heads, vocab_size=config.vocab_size,
             max_seq_len=config.max_seq_len, shared_classifier=shared)
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(_pack_header(config, version, shared))
        for name, count in _layout(h):
            arr = parts[name].astype("<f4", copy=False).reshape(-1)
            if arr.size != count:
                raise ValueError(f"{name} has {arr.size} values, the llama2.c layout for this config "
                                 f"needs {count}")
            fh.write(arr.tobytes())
    os.replace(tmp, p)


def _check_exportable(config: ModelConfig, params: dict, version: int) -> None:
    """What llama2.c cannot represent is refused: other versions, eps/theta, merged projections."""
    if version not in (0, 1):
        raise ValueError(f"save_llama2c writes version 0 or 1, not {version}")
    if config.norm_eps != NORM_EPS or config.rope_theta != ROPE_THETA:
        raise ValueError(f"llama2.c files imply norm_eps={NORM_EPS} and rope_theta={ROPE_THETA}; "
                         f"this config has norm_eps={config.norm_eps}, rope_theta={config.rope_theta}")
    shared = "lm_head" not in params
    if shared != config.tie_embeddings:
        raise ValueError(f"config.tie_embeddings={config.tie_embeddings} but params "
                         f"{'lack' if shared else 'have'} an lm_head")
    layers = params["layers"]
    if len(layers) != config.n_layers:
        raise ValueError(f"params have {len(layers)} layers, config.n_layers={config.n_layers}")
    if any("wqkv" in layer["attn"] or "w_gate_up" in layer["mlp"] for layer in layers):
        raise ValueError("params use merged projections; call aquila_fn.core.model.split_projections first")


def _llama2c_arrays(config: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """The float32 arrays of a llama2.c file by its names (layers stacked, q/k rotary interleaved)."""
    layers = params["layers"]

    def f32(x: torch.Tensor) -> np.ndarray:
        return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()

    def stack(fn) -> np.ndarray:
        return np.stack([f32(fn(layer)) for layer in layers])

    parts = {
        "embed": f32(params["embed"]),
        "rms_att": stack(lambda l: l["attn_norm"]),
        "wq": stack(lambda l: half_to_interleaved(l["attn"]["wq"], config.n_heads)),
        "wk": stack(lambda l: half_to_interleaved(l["attn"]["wk"], config.n_kv_heads)),
        "wv": stack(lambda l: l["attn"]["wv"]),
        "wo": stack(lambda l: l["attn"]["wo"]),
        "rms_ffn": stack(lambda l: l["mlp_norm"]),
        "w1": stack(lambda l: l["mlp"]["w_gate"]),
        "w2": stack(lambda l: l["mlp"]["w_down"]),
        "w3": stack(lambda l: l["mlp"]["w_up"]),
        "rms_final": f32(params["norm"]),
    }
    cos, sin = _rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    parts["freq_cis_real"], parts["freq_cis_imag"] = cos.numpy(), sin.numpy()
    if "lm_head" in params:
        parts["wcls"] = f32(params["lm_head"])
    return parts


def _pack_header(config: ModelConfig, version: int, shared: bool) -> bytes:
    """The header bytes: version 0 is seven int32 (a negative vocab means an unshared classifier);
    version 1 adds a magic, the version and a shared flag, padded to V1_HEADER_BYTES."""
    dims = (config.dim, config.ffn_dim, config.n_layers, config.n_heads, config.n_kv_heads)
    if version == 0:
        return struct.pack("<7i", *dims, config.vocab_size if shared else -config.vocab_size,
                           config.max_seq_len)
    header = struct.pack("<Ii7iB", MAGIC, 1, *dims, config.vocab_size, config.max_seq_len, int(shared))
    return header + b"\0" * (V1_HEADER_BYTES - len(header))
