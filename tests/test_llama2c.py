"""llama2.c import/export, checked against the real stories260K checkpoint:
llama2.c's reference greedy text, the TinyStories loss, an independent re-implementation of
run.c's forward on the raw (interleaved-RoPE) weights, cache vs recompute, and bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from aquila_fn.core.config import get_config
from aquila_fn.interop.llama2c import (
    Llama2cFormatError,
    half_to_interleaved,
    interleaved_to_half,
    load_llama2c,
    read_llama2c_header,
    save_llama2c,
)
from aquila_fn.core.model import forward, init_cache, init_params, param_shapes
from aquila_fn.core.pytree import named_leaves
from aquila_fn.data.tokenizer import load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "aquila_fn" / "assets"
BIN = ASSETS / "stories260K.bin"
BIN_BYTES = 1_056_540
# llama2.c: ./run stories260K.bin -z tok512.bin -t 0 -n 64 -i "Once upon a time"
# (64 steps counting the prompt; BOS then 64 tokens). Quoted in aquila_fn/assets/SOURCES.md.
REFERENCE_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
                  "the park. One day, she saw a big, red ball. She wanted to play with it, but it was "
                  "too high.\nLily")


@pytest.fixture(scope="module")
def stories():
    return load_llama2c(BIN)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS / "tok512.model")


def _greedy(params, config, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """llama2.c's generate loop with temperature 0: `steps` positions in all, prompt included.
    Returns the tokens (len steps + 1) and the logits at every position [steps, V]."""
    cache = init_cache(config, 1, steps)
    tokens = list(prompt)
    with torch.no_grad():
        logits, cache = forward(params, torch.tensor([tokens]), config, cache=cache, start_pos=0)
        all_logits = [logits[0]]
        while True:
            tokens.append(int(all_logits[-1][-1].argmax()))
            if len(tokens) == steps + 1:
                break
            logits, cache = forward(params, torch.tensor([tokens[-1:]]), config, cache=cache,
                                    start_pos=len(tokens) - 1)
            all_logits.append(logits[0])
    return tokens, torch.cat(all_logits)


# ----------------------------------------------------------------------------- loading

def test_config_and_layout(stories):
    config, params = stories
    assert config == get_config("stories260k")
    assert (config.head_dim, config.kv_dim, config.tie_embeddings) == (8, 32, True)
    want = {p: tuple(x.shape) for p, x in named_leaves(param_shapes(config))}
    got = {p: tuple(x.shape) for p, x in named_leaves(params)}
    assert got == want and "lm_head" not in params
    assert all(x.dtype == torch.float32 for _, x in named_leaves(params))
    assert sum(x.numel() for _, x in named_leaves(params)) == 260_032


def test_load_dtype():
    config, params = load_llama2c(BIN, dtype=torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 for _, x in named_leaves(params))


def test_header():
    h = read_llama2c_header(BIN)
    assert (h["version"], h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"],
            h["vocab_size"], h["max_seq_len"], h["shared_classifier"]) == (0, 64, 172, 5, 8, 4, 512, 512, True)
    assert h["expected_bytes"] == h["actual_bytes"] == BIN_BYTES


def test_greedy_matches_llama2c_reference(stories, tok):
    config, params = stories
    prompt = tok.encode("Once upon a time", bos=True)
    tokens, _ = _greedy(params, config, prompt, steps=64)
    assert len(tokens) == 65
    assert tok.decode(tokens) == REFERENCE_TEXT


def test_tinystories_loss(stories, tok):
    """Mean next-token NLL on 2044 tokens of tinystories.txt. SOURCES.md gives 1.47 without its
    exact windowing; here: one BOS, then the text, 2048 tokens cut into 4 windows of 512
    positions (511 predictions each). Measured 1.4479. Tolerance 0.03 against the quoted value
    (other windowings land within it: BOS per window 1.484, no BOS 1.446), and 0.002 against the
    value measured for this windowing, which catches small numeric errors (eps, RoPE, norms)."""
    config, params = stories
    text = (ASSETS / "tinystories.txt").read_text(encoding="utf-8")[:12_000]
    ids = torch.tensor(tok.encode(text, bos=True)[:2048]).view(4, 512)
    labels = ids[:, 1:].reshape(-1)
    with torch.no_grad():
        # forward + plain cross-entropy with the reference ops: the fused kernels compile on first
        # use (seconds on CPU), which would dominate this test; ops' own tests compare the paths.
        logits, _ = forward(params, ids[:, :-1], config, impl="reference")
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), labels)
    assert labels.numel() == 2044
    assert abs(float(loss) - 1.47) < 0.03
    assert abs(float(loss) - 1.4479) < 0.002


def test_cache_decode_equals_full_recompute(stories, tok):
    config, params = stories
    prompt = tok.encode("Lily and Ben went to the park", bos=True)
    tokens, cached_logits = _greedy(params, config, prompt, steps=40)
    with torch.no_grad():
        full, _ = forward(params, torch.tensor([tokens[:-1]]), config)
    assert full.shape == (1, 40, config.vocab_size)
    torch.testing.assert_close(cached_logits, full[0], atol=1e-5, rtol=1e-5)
    assert full[0].argmax(-1)[len(prompt) - 1:].tolist() == tokens[len(prompt):]


# ----------------------------------------------------------------------------- independent reference

def _raw_llama2c_weights(path: Path) -> dict[str, np.ndarray]:
    """The legacy file read straight from its documented layout, no project code involved."""
    raw = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("<7i", raw[:28])
    hd, kv = dim // n_heads, n_kv * (dim // n_heads)
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    w, off = {}, 0
    for name, shape in [("emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
                        ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)), ("wo", (n_layers, dim, dim)),
                        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
                        ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)),
                        ("rms_final", (dim,)), ("cos", (seq, hd // 2)), ("sin", (seq, hd // 2))]:
        n = int(np.prod(shape))
        w[name] = data[off:off + n].reshape(shape).astype(np.float64)
        off += n
    assert off == data.size  # shared classifier: nothing follows
    w["dims"] = (dim, n_layers, n_heads, n_kv)
    return w


def _run_c_forward(w, tokens: list[int]) -> np.ndarray:
    """run.c's forward(), one position at a time, in float64: interleaved RoPE pairs
    (x[2i], x[2i+1]) rotated by the file's own cos/sin tables, GQA by h // (n_heads/n_kv)."""
    dim, n_layers, n_heads, n_kv = w["dims"]
    hd = dim // n_heads
    kv_mul = n_heads // n_kv

    def rmsnorm(x, g):
        return g * x / np.sqrt(np.mean(x * x) + 1e-5)

    k_cache = np.zeros((n_layers, len(tokens), n_kv * hd))
    v_cache = np.zeros_like(k_cache)
    out = []
    for pos, t in enumerate(tokens):
        x = w["emb"][t].copy()
        for l in range(n_layers):
            xb = rmsnorm(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            for vec in (q, k):
                pairs = vec.reshape(-1, hd // 2, 2)  # (head, i, 2)
                c, s = w["cos"][pos], w["sin"][pos]
                a, b = pairs[..., 0].copy(), pairs[..., 1].copy()
                pairs[..., 0], pairs[..., 1] = a * c - b * s, a * s + b * c
            k_cache[l, pos], v_cache[l, pos] = k, v
            att_out = np.zeros(dim)
            for h in range(n_heads):
                g = h // kv_mul
                keys = k_cache[l, :pos + 1, g * hd:(g + 1) * hd]
                scores = keys @ q[h * hd:(h + 1) * hd] / np.sqrt(hd)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att_out[h * hd:(h + 1) * hd] = p @ v_cache[l, :pos + 1, g * hd:(g + 1) * hd]
            x = x + w["wo"][l] @ att_out
            xb = rmsnorm(x, w["rms_ffn"][l])
            h1, h3 = w["w1"][l] @ xb, w["w3"][l] @ xb
            x = x + w["w2"][l] @ (h1 / (1 + np.exp(-h1)) * h3)
        out.append(w["emb"] @ rmsnorm(x, w["rms_final"]))
    return np.stack(out)


def test_forward_matches_run_c_reference(stories, tok):
    """Our forward on the imported (row-permuted) weights equals run.c's math on the raw file."""
    config, params = stories
    tokens = tok.encode("Once upon a time, there was a little dog named Max.", bos=True)
    ref = _run_c_forward(_raw_llama2c_weights(BIN), tokens)
    with torch.no_grad():
        logits, _ = forward(params, torch.tensor([tokens]), config)
    np.testing.assert_allclose(logits[0].double().numpy(), ref, atol=2e-4, rtol=1e-4)


def test_rope_permutation_is_needed(stories, tok):
    """Without the row permutation the model is visibly broken (guards against a no-op)."""
    config, params = stories
    raw = {**params, "layers": [
        {**layer, "attn": {**layer["attn"],
                           "wq": half_to_interleaved(layer["attn"]["wq"], config.n_heads),
                           "wk": half_to_interleaved(layer["attn"]["wk"], config.n_kv_heads)}}
        for layer in params["layers"]]}
    prompt = tok.encode("Once upon a time", bos=True)
    tokens, _ = _greedy(raw, config, prompt, steps=64)
    assert tok.decode(tokens) != REFERENCE_TEXT


def test_permutation_helpers():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).view(4 * 8, 3)
    half = interleaved_to_half(w, n_heads=4)
    assert torch.equal(half_to_interleaved(half, n_heads=4), w)
    # head 0, head_dim 8: interleaved rows 0..7 are (x0, y0, x1, y1, ...) -> (x0..x3, y0..y3)
    assert half[:8, 0].tolist() == [0.0, 6.0, 12.0, 18.0, 3.0, 9.0, 15.0, 21.0]


# ----------------------------------------------------------------------------- export

def test_save_round_trip_is_byte_identical(stories, tmp_path):
    config, params = stories
    out = tmp_path / "copy.bin"
    save_llama2c(out, config, params)
    assert out.read_bytes() == BIN.read_bytes()


@pytest.mark.parametrize("version", [0, 1])
def test_untied_gqa_round_trip(tmp_path, version):
    config = get_config("tiny").replace(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=40,
                                        max_seq_len=16, tie_embeddings=False)
    params = init_params(config, seed=3)
    out = tmp_path / f"untied_v{version}.bin"
    save_llama2c(out, config, params, version=version)
    h = read_llama2c_header(out)
    assert (h["version"], h["shared_classifier"], h["vocab_size"]) == (version, False, 40)
    if version == 0:
        assert struct.unpack("<7i", out.read_bytes()[:28])[5] == -40  # negative: untied
    config2, params2 = load_llama2c(out)
    assert config2 == config.replace(vocab_pinned=True)
    a, b = dict(named_leaves(params)), dict(named_leaves(params2))
    assert a.keys() == b.keys() and "lm_head" in b
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_save_refuses_what_llama2c_cannot_hold(stories, tmp_path):
    config, params = stories
    with pytest.raises(ValueError, match="rope_theta"):
        save_llama2c(tmp_path / "x.bin", config.replace(rope_theta=500000.0), params)
    with pytest.raises(ValueError, match="tie_embeddings"):
        save_llama2c(tmp_path / "x.bin", config.replace(tie_embeddings=False), params)


# ----------------------------------------------------------------------------- bad files

def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "absent.bin"
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        load_llama2c(missing)


def test_truncated_file(tmp_path):
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(BIN.read_bytes()[:500_000])
    with pytest.raises(Llama2cFormatError) as e:
        load_llama2c(bad)
    msg = str(e.value)
    assert "truncated.bin" in msg and "500000" in msg and str(BIN_BYTES) in msg and "truncated" in msg


def test_file_with_trailing_bytes(tmp_path):
    bad = tmp_path / "long.bin"
    bad.write_bytes(BIN.read_bytes() + b"\0" * 8)
    with pytest.raises(Llama2cFormatError, match=f"long.bin has {BIN_BYTES + 8} bytes.*{BIN_BYTES}"):
        load_llama2c(bad)


def test_untied_flag_changes_expected_size(tmp_path):
    """A negative vocab field announces a classifier that this file does not have."""
    raw = bytearray(BIN.read_bytes())
    raw[20:24] = struct.pack("<i", -512)
    bad = tmp_path / "flag.bin"
    bad.write_bytes(bytes(raw))
    with pytest.raises(Llama2cFormatError, match=f"{BIN_BYTES}.*{BIN_BYTES + 4 * 512 * 64}"):
        load_llama2c(bad)


@pytest.mark.parametrize("fields, problem", [
    ((64, 172, 5, 7, 4, 512, 512), "n_heads=7 does not divide dim=64"),
    ((64, 172, 5, 8, 3, 512, 512), "n_kv_heads=3 does not divide n_heads=8"),
    ((64, 172, 0, 8, 4, 512, 512), "n_layers must be positive"),
    ((1 << 30, 172, 5, 8, 4, 512, 512), "implausibly large"),
])
def test_bad_header(tmp_path, fields, problem):
    bad = tmp_path / "header.bin"
    bad.write_bytes(struct.pack("<7i", *fields) + BIN.read_bytes()[28:])
    with pytest.raises(Llama2cFormatError, match=problem) as e:
        load_llama2c(bad)
    assert "header.bin" in str(e.value)


def test_too_short_and_unsupported_versions(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\1\0\0\0" * 3)
    with pytest.raises(Llama2cFormatError, match="short.bin is 12 bytes"):
        load_llama2c(short)
    q8 = tmp_path / "q80.bin"
    q8.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 64, 172, 5, 8, 4, 512, 512, 1).ljust(256, b"\0"))
    with pytest.raises(Llama2cFormatError, match=r"q80.bin is a llama2.c file of version 2 \(int8-quantised"):
        load_llama2c(q8)
