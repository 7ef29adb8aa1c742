"""The ahead-of-time compiled decode step: its package key, the --compile auto policy, build
locks, the background build's plumbing, CUDA graph replay's static-address discipline (with a
stand-in graph on CPU), the torchair graph mode on NPU (stand-in), and one real AOTInductor build
of a one-layer model (the slow test)."""

import json
import os
import sys

import pytest
import torch

from aquila_fn.inference import aot_build, aot_package, decode_compile as dc
from alloc_count import Allocations
from aquila_fn import get_config, init_params
from aquila_fn.inference.generate import Decoder, decode_step
from aquila_fn.core.quantize import quantize_params
from aquila_fn.inference.step_graph import GraphStep

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = get_config("tiny", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=128,
                    max_seq_len=128, init_std=0.1)
SMALL = get_config("small")


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0)


def spec_of(params, config=CONFIG, **kw):
    args = dict(compute_dtype=torch.float32, batch=1, device=torch.device("cpu"), impl="reference")
    return dc.StepSpec.of(params, config, **{**args, **kw})


# ----------------------------------------------------------------------------- the key


def test_package_key_follows_what_shapes_the_code(params):
    base = spec_of(params).digest()
    assert spec_of(params).digest() == base
    # The same weights nested in another dict order: one package (the caller flattens canonically).
    reordered = {k: params[k] for k in reversed(list(params))}
    assert spec_of(reordered).digest() == base
    assert spec_of(init_params(CONFIG, seed=5)).digest() == base  # weights are inputs
    others = [spec_of(params, batch=2), spec_of(params, compute_dtype=torch.bfloat16),
              spec_of(quantize_params(params)), spec_of(params, impl="auto"),
              spec_of(init_params(CONFIG.replace(max_seq_len=256), seed=0), config=CONFIG.replace(max_seq_len=256))]
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)  # CPU loops take their thread count at run time
    try:
        assert spec_of(params).digest() == base
    finally:
        torch.set_num_threads(before)
    digests = [s.digest() for s in others]
    assert base not in digests and len(set(digests)) == len(digests)
    spec = spec_of(params)
    assert dc.StepSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


# ----------------------------------------------------------------------------- the auto policy


def test_auto_policy(tmp_path, monkeypatch):
    small = init_params(SMALL, seed=0, device="meta")  # shapes only: the policy reads no values
    spec = spec_of(small, SMALL)
    package = spec.package_path(tmp_path)
    monkeypatch.setenv(dc.BACKGROUND_ENV, "1")
    short = dc.decide("auto", spec, small, 127, tmp_path)
    assert not short.compile and short.build == "background" and "127 decode steps" in short.reason
    long = dc.decide("auto", spec, small, 20000, tmp_path)
    assert long.compile and long.build == "foreground"
    assert dc.decide("on", spec, small, 1, tmp_path).build == "foreground"
    # A toy run would gain nothing from a background build.
    tiny = init_params(CONFIG, seed=0, device="meta")
    assert dc.decide("auto", spec_of(tiny), tiny, 20, tmp_path).build == "none"
    monkeypatch.setenv(dc.BACKGROUND_ENV, "0")
    assert dc.decide("auto", spec, small, 127, tmp_path).build == "none"
    # A build in progress (a live pid holds the lock) serves later runs; a dead one's lock is stale.
    monkeypatch.setenv(dc.BACKGROUND_ENV, "1")
    aot_build._lock_path(package).write_text(str(os.getpid()))
    busy = dc.decide("auto", spec, small, 127, tmp_path)
    assert busy.build == "none" and f"pid {os.getpid()}" in busy.reason
    aot_build._lock_path(package).write_text("999999999")
    assert dc.build_in_progress(package) is None and not aot_build._lock_path(package).exists()
    # Cached: loaded, whatever the length.
    package.write_bytes(b"")
    cached = dc.decide("auto", spec, small, 1, tmp_path)
    assert cached.compile and cached.build == "load"


def test_build_time_estimate_learns_from_the_last_build(tmp_path):
    small = init_params(SMALL, seed=0, device="meta")
    spec = spec_of(small, SMALL)
    default = dc.estimated_build_s(spec, tmp_path)
    (tmp_path / "decode-x.json").write_text(json.dumps({"build_s": 300.0, "n_layers": 8, "device": "cpu"}))
    assert dc.estimated_build_s(spec, tmp_path) == pytest.approx(300.0)
    assert dc.estimated_build_s(spec_of(init_params(CONFIG, seed=0, device="meta")), tmp_path) < 300.0
    assert default != 300.0


def test_background_build_plumbing(tmp_path, params, monkeypatch):
    """The spawned command, its lock and spec file; then its main() in process (build stubbed)."""
    spawned = []

    class FakePopen:
        pid = 4242

        def __init__(self, cmd, **kwargs):
            spawned.append((cmd, kwargs))

    monkeypatch.setattr(aot_build.subprocess, "Popen", FakePopen)
    spec = spec_of(params)
    package = spec.package_path(tmp_path)
    assert dc.start_background_build(spec, tmp_path) == 4242
    [(cmd, kwargs)] = spawned
    assert cmd[:3] == [sys.executable, "-m", "aquila_fn.inference.aot_build"] and kwargs["start_new_session"]
    assert aot_build._lock_path(package).read_text() == "4242"
    aot_build._lock_path(package).write_text(str(os.getpid()))  # a live builder holds it: no second build
    assert dc.start_background_build(spec, tmp_path) is None and len(spawned) == 1
    job = json.loads(open(cmd[3]).read())
    assert dc.StepSpec.from_json(job["spec"]) == spec and job["package"] == str(package)

    built = []
    monkeypatch.setattr(aot_build, "build_package", lambda p, s, d: built.append((s, d)) or 1.0)
    monkeypatch.setattr(aot_build.signal, "signal", lambda *a: None)
    monkeypatch.setattr(aot_build.os, "nice", lambda n: 0)
    aot_build._lock_path(package).write_text(str(os.getpid()))
    assert aot_build.main([cmd[3]]) == 0
    [(s, d)] = built
    assert s == spec and d == tmp_path
    assert not aot_build._lock_path(package).exists() and not os.path.exists(cmd[3])
    # The placeholder weights have the real leaves' shapes and dtypes.
    placeholders = aot_build._placeholder_params(spec)
    assert dc.StepSpec.of(placeholders, CONFIG, compute_dtype=torch.float32, batch=1,
                          device=torch.device("cpu"), impl="reference") == spec


def test_foreground_build_waits_for_a_build_in_progress(tmp_path, params, monkeypatch):
    spec = spec_of(params)
    package = spec.package_path(tmp_path)
    aot_build._lock_path(package).write_text(str(os.getpid()))

    def other_process_finishes(_package, poll_s=0.5):
        package.write_bytes(b"built elsewhere")
        aot_build._lock_path(package).unlink()

    monkeypatch.setattr(aot_build, "wait_for_build", other_process_finishes)
    monkeypatch.setattr(aot_build, "build_package", lambda *a: pytest.fail("built twice"))
    assert dc.build_locked(params, spec, tmp_path) is None and package.exists()


def test_auto_falls_back_to_eager_when_the_build_fails(tmp_path, params, monkeypatch):
    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(aot_package, "export_step", no_compiler)
    monkeypatch.setattr(dc, "estimated_saving_s", lambda *args: 1e9)  # auto builds at once
    lines = []
    d = Decoder(params, CONFIG, cache_dir=tmp_path, log=lines.append)
    eager = Decoder(params, CONFIG, compile="off")
    assert d.generate([[1, 5, 9]], max_new_tokens=4)[0].tokens == eager.generate([[1, 5, 9]], max_new_tokens=4)[0].tokens
    assert lines[-1] == "compile: off (the compiled step failed: RuntimeError: no C++ compiler found)"
    retry = dc.decide("auto", spec_of(params), params, 10**6, tmp_path)  # not again at every run
    assert not retry.compile and "last build failed" in retry.reason
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        Decoder(params, CONFIG, compile="on", cache_dir=tmp_path).generate([[1, 5, 9]], max_new_tokens=4)


def test_unwritable_cache_directory_decodes_eagerly(tmp_path, params, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory should go
    monkeypatch.setenv(dc.BACKGROUND_ENV, "1")
    monkeypatch.setattr(dc, "estimated_saving_s", lambda *args: 10.0)  # background, not foreground
    lines = []
    d = Decoder(params, CONFIG, cache_dir=blocked / "compiled", log=lines.append)
    assert len(d.generate([[1, 5, 9]], max_new_tokens=4)[0].tokens) == 4
    assert lines[-1].startswith("compile: no background build (")


# ----------------------------------------------------------------------------- graph replay


class FakeGraph:
    """CPU stand-in for CudaGraph: capture runs the step (warm-ups included) and keeps it;
    replay reruns it on the same buffers and writes into the captured output, as a graph does."""

    def capture(self, fn):
        for _ in range(2):
            fn()
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


def test_graph_step_replays_static_buffers(params):
    def step(params, tokens, cache, start_pos, positions, key_mask):
        return decode_step(params, tokens, cache, start_pos, positions, key_mask, config=CONFIG)[0]

    graph = GraphStep(step, new_graph=FakeGraph)
    d = Decoder(params, CONFIG, compile="off")
    prompt = [1, 5, 9, 33]
    batch = d.layout([prompt], 6)
    mask = torch.ones(1, batch.max_len, dtype=torch.bool)
    ref_cache, cache = d.new_cache(1, batch.max_len), d.new_cache(1, batch.max_len)
    _, ref_cache = d.prefill(batch, ref_cache)
    _, cache = d.prefill(batch, cache)
    outputs, tokens = [], [7, 3, 99, 12]
    for t, token in enumerate(tokens):
        args = (torch.tensor([[token]]), torch.tensor(len(prompt) + t), torch.tensor([[len(prompt) + t]]), mask)
        expected = step(params, args[0], ref_cache, *args[1:])
        out = graph(params, args[0], cache, *args[1:])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        outputs.append(out)
    torch.testing.assert_close(cache[0]["k"], ref_cache[0]["k"])
    assert graph.captures == 1 and all(o is outputs[0] for o in outputs)  # one graph, one output buffer
    [captured] = graph.graphs.values()
    pointers = [captured.tokens.data_ptr(), captured.start_pos.data_ptr(), captured.positions.data_ptr()]
    new_inputs = torch.tensor([[5]]), torch.tensor(9), torch.tensor([[9]]), mask
    with Allocations() as seen:  # what a replay does before launching: in-place copies, nothing new
        captured.load(*new_inputs)
    assert seen.bytes == 0 and {f.__name__ for f in seen.ops} == {"copy_.default"}
    assert pointers == [captured.tokens.data_ptr(), captured.start_pos.data_ptr(), captured.positions.data_ptr()]
    graph(params, args[0], d.new_cache(1, batch.max_len), *args[1:])  # another cache: another graph
    assert graph.captures == 2


def test_npu_decode_uses_torchair_reduce_overhead(monkeypatch):
    from npu_standin import make_torch_npu, make_torchair
    from aquila_fn.inference.decoder import _npu_graph_step
    torchair = make_torchair()
    monkeypatch.setitem(sys.modules, "torch_npu", make_torch_npu())
    monkeypatch.setitem(sys.modules, "torchair", torchair)
    torch._dynamo.reset()
    params = init_params(CONFIG, seed=2)  # its leaves get marked static
    d = Decoder(params, CONFIG, compile="off")
    step = _npu_graph_step(d._decode_fn, params)
    batch = d.layout([[1, 5, 9]], 4)
    cache = d.prefill(batch, d.new_cache(1, batch.max_len))[1]
    args = (torch.tensor([[7]]), torch.tensor(3), torch.tensor([[3]]), None)
    logits, _ = step(params, args[0], cache, *args[1:])
    expected, _ = d._decode_fn(params, args[0], [dict(layer) for layer in cache], *args[1:])
    torch.testing.assert_close(logits, expected)
    assert [info["mode"] for name, info in sys.modules["torch_npu"].calls
            if name == "torchair_backend"] == ["reduce-overhead"]


# ----------------------------------------------------------------------------- a real build


@pytest.mark.slow
def test_aot_compiled_decode_matches_eager_and_loads_from_cache(tmp_path):
    """The real path, once: export + AOTInductor on a one-layer int8 model (fused dequantising
    matvecs), written to the cache; a second Decoder (default auto) loads it instead of building;
    one package serves cache lengths 64 and 128 (the dynamic dimension), padded and unpadded."""
    torch._dynamo.reset()
    params = quantize_params(init_params(CONFIG, seed=1))
    eager = Decoder(params, CONFIG, compile="off")
    padded = [[1, 22, 7, 80, 3, 14, 2], [1, 5, 9]]
    lines = []
    first = Decoder(params, CONFIG, compile="on", cache_dir=tmp_path, log=lines.append)
    out = first.generate(padded, max_new_tokens=8)
    assert [o.tokens for o in out] == [o.tokens for o in eager.generate(padded, max_new_tokens=8)]
    assert any("compiled the decode step" in line for line in lines)
    assert len(list(tmp_path.glob("decode-*.pt2"))) == 1

    lines.clear()
    second = Decoder(params, CONFIG, cache_dir=tmp_path, log=lines.append)  # --compile auto
    same_length = [[1, 22, 7, 80, 3, 14, 2], [1, 40, 41, 42, 43, 44, 45]]
    out = second.generate(same_length, max_new_tokens=70)  # a 128-slot cache
    assert [o.tokens for o in out] == [o.tokens for o in eager.generate(same_length, max_new_tokens=70)]
    assert lines[0].startswith("compile: on (compiled step cached") and not any("compiled the" in x for x in lines)
    assert second.stats.warmup_s < 5.0
