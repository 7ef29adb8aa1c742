"""ops/ benchmarks on Aquila-7B shapes scaled to this machine: reference vs fast path, one
group per (op, dtype, mode). Targets: every fast path at least as fast as its reference;
attention at 1024 tokens at least 2x; fused cross-entropy at vocab 100,008 at most 1/4 of
the reference's peak memory."""
import importlib

import pytest
import torch

import ops
from ops._dispatch import NATIVE_CPU_MATMUL_DTYPES

ATTENTION = importlib.import_module("ops.attention")  # the module (ops.attention is the function)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ["fwd", "fwd+bwd"]
FAST = {"rms_norm": "fused", "rotary": "fused", "swiglu": "fused", "attention": "fused"}
# A causal kernel skips the masked half of the scores, so at equal matmul speed its forward is
# ~2x the plain-math reference: the target. In training the chunked kernel keeps its blocks'
# probabilities (see ops.attention.SAVED_PROBS_MAX_BYTES), so its backward runs the same 4
# matmuls as the reference's, on 56% of the area, and no softmax: ~2x as well, where a
# recomputing flash backward (5 half-size matmuls against 4 full ones) stays near 1.7x.
# Measured fp32 on a Zen 3 (AVX2; bf16 is emulated there and computes in fp32: 2.6x / 2.0x):
# forward 2.4-2.7x (SDPA), forward+backward 2.02-2.20x over five runs (kept probabilities;
# SDPA gave 1.7-1.9x). On a Zen 5 with avx512_bf16, before the kernel kept probabilities: bf16
# 2.8x / 2.2x (P @ V in bf16), fp32 with SDPA 2.06-2.22x / 1.53x.
MIN_SPEEDUP = {("attention", "fwd"): 2.0, ("attention", "fwd+bwd"): 2.0}


def _workload(op, dtype, mode, impl):
    """A zero-argument callable running one op (and its backward) on Aquila-7B shapes."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    if op == "rms_norm":  # 2048 tokens x hidden 4096
        inputs = [rand(2048, 4096), (1 + 0.1 * rand(4096))]
        call = lambda x, w: ops.rms_norm(x, w, 1e-6, impl=impl)  # noqa: E731
    elif op == "rotary":  # q of 1024 tokens x 32 heads x 128
        cos, sin = ops.rope_table(1024, 128, 10000.0, dtype, "cpu")
        inputs = [rand(1, 1024, 32, 128)]
        call = lambda x: ops.rotary(x, cos, sin, impl=impl)  # noqa: E731
    elif op == "swiglu":  # 2048 tokens x ffn 11008
        inputs = [rand(2048, 11008), rand(2048, 11008)]
        call = lambda a, b: ops.swiglu(a, b, impl=impl)  # noqa: E731
    elif op == "attention":  # batch 1, 1024 tokens, 32 heads of 128, causal
        inputs = [rand(1, 1024, 32, 128), rand(1, 1024, 32, 128), rand(1, 1024, 32, 128)]
        call = lambda q, k, v: ops.attention(q, k, v, causal=True, impl=impl)  # noqa: E731
        if impl == "sdpa":  # the peer that auto's choice of kernel is measured against
            call = lambda q, k, v: ATTENTION.attention_sdpa(q, k, v, causal=True)  # noqa: E731
    elif op == "attention_decode":  # one query against a 1024-token cache
        inputs = [rand(1, 1, 32, 128), rand(1, 1024, 32, 128), rand(1, 1024, 32, 128)]
        call = lambda q, k, v: ops.attention(q, k, v, causal=True, impl=impl)  # noqa: E731
    else:
        raise ValueError(op)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                call(*inputs)
        return run
    leaves = [t.requires_grad_() for t in inputs]
    grad_out = torch.randn_like(call(*leaves))

    def run():
        torch.autograd.grad(call(*leaves), leaves, grad_out)
    return run


ELEMENTWISE = [(op, dt, mode) for op in ("rms_norm", "rotary", "swiglu", "attention")
               for dt in DTYPES for mode in MODES] + [("attention_decode", dt, "fwd") for dt in DTYPES]


def _rounds(op, mode):
    return 5 if (op, mode) == ("attention", "fwd+bwd") else 10  # the reference takes seconds


def _case(op, dt, mode):
    return f"{op} {dt} {mode}"


@pytest.mark.parametrize("op,dt,mode", ELEMENTWISE, ids=[_case(*c) for c in ELEMENTWISE])
def test_bench_ops_reference(timed, op, dt, mode):
    timed(_workload(op, DTYPES[dt], mode, "reference"), case=_case(op, dt, mode),
          rounds=_rounds(op, mode))


@pytest.mark.parametrize("op,dt,mode", ELEMENTWISE, ids=[_case(*c) for c in ELEMENTWISE])
def test_bench_ops_fast(timed, op, dt, mode):
    impl = FAST[op.split("_decode")[0]]
    min_speedup = MIN_SPEEDUP.get((op, mode), 1.0)
    timed(_workload(op, DTYPES[dt], mode, impl), case=_case(op, dt, mode),
          rounds=_rounds(op, mode), reference=_workload(op, DTYPES[dt], mode, "reference"),
          min_speedup=min_speedup)


@pytest.mark.parametrize("mode", MODES)
def test_bench_ops_attention_bf16_vs_sdpa(timed, mode):
    """auto's bf16 prefill kernel on CPU timed against bf16 SDPA in the same run. Where the CPU
    multiplies bf16 natively, auto takes the chunked kernel because it beats SDPA: the forward
    must be at least as fast (measured 1.3x); forward+backward, measured 1.01-1.12x, is
    recorded, not asserted (at parity noise decides). Where bf16 matmuls are emulated, auto runs
    SDPA on fp32 copies because bf16 SDPA's backward is pathological there: forward+backward
    must be at least as fast (measured 19.6-21.6x on a Zen 3), the forward is recorded (0.95-1.07x)."""
    native = torch.bfloat16 in NATIVE_CPU_MATMUL_DTYPES
    asserted = "fwd" if native else "fwd+bwd"
    timed(_workload("attention", torch.bfloat16, mode, "fused"), case=f"attention bf16 {mode} vs sdpa",
          rounds=_rounds("attention", mode), reference=_workload("attention", torch.bfloat16, mode, "sdpa"),
          min_speedup=1.0 if mode == asserted else None)


# ----------------------------------------------------------------------------- cross_entropy

CE_N, CE_V, CE_D = 2048, 100_008, 512  # 2048 tokens x Aquila's vocabulary; hidden scaled down

CE_SCRIPT = """
import time, torch, ops
g = torch.Generator().manual_seed(0)
dtype = {dtype}
h = torch.randn({n}, {d}, generator=g).to(dtype).requires_grad_()
w = (torch.randn({v}, {d}, generator=g) / {d} ** 0.5).to(dtype).requires_grad_()
labels = torch.randint(0, {v}, ({n},), generator=g)
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) / 1024
peaks, seconds = [], []
for step in range(3):  # the first step includes one-time work (compilation, library init)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base, t = status("VmRSS:"), time.perf_counter()
    loss, n = ops.cross_entropy(h, w, labels, impl="{impl}")
    grads = torch.autograd.grad(loss, (h, w))
    seconds.append(time.perf_counter() - t)
    del loss, grads
    peaks.append(status("VmHWM:") - base)
print(peaks[0], peaks[-1], min(seconds[1:]))
"""


def _ce_workload(dtype, impl):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(CE_N, CE_D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(CE_V, CE_D, generator=g) / CE_D ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, CE_V, (CE_N,), generator=g)
    labels[::10] = -100

    def run():
        loss, _ = ops.cross_entropy(h, w, labels, impl=impl)
        torch.autograd.grad(loss, (h, w))
    return run


def _skip_if_emulated(dt):
    """A 16-bit matmul of [2048 x 512] x [512 x 100,008] runs at ~21 GFLOP/s where torch
    emulates it (on an AVX2-only Zen 3 the two bf16 cases had not finished after 20 minutes),
    so there it would time torch's emulation, not this kernel; such CPUs train in fp32
    (--precision auto), and the memory target is measured in fp32."""
    if DTYPES[dt] not in NATIVE_CPU_MATMUL_DTYPES:
        pytest.skip(f"{dt} matmuls are emulated on this CPU")


def _ce_peaks(peak_rss, dt, impl):
    """Fresh process, default allocator: (first-step peak MiB, steady-state peak MiB, best
    steady step seconds) over forward+backward, peaks as RSS increase."""
    return peak_rss(CE_SCRIPT.format(dtype=f"torch.{str(DTYPES[dt]).split('.')[-1]}",
                                     n=CE_N, d=CE_D, v=CE_V, impl=impl))


@pytest.mark.parametrize("dt", list(DTYPES))
def test_bench_ops_cross_entropy_reference(timed, peak_rss, benchmark, dt):
    _skip_if_emulated(dt)
    timed(_ce_workload(DTYPES[dt], "reference"), case=f"cross_entropy {dt} fwd+bwd", rounds=3)
    first, steady, _ = _ce_peaks(peak_rss, dt, "reference")
    benchmark.extra_info.update(peak_mib=round(steady, 1), first_step_peak_mib=round(first, 1))


@pytest.mark.parametrize("dt", list(DTYPES))
def test_bench_ops_cross_entropy_fused(timed, peak_rss, benchmark, dt):
    _skip_if_emulated(dt)
    (first, fused, secs), (ref_first, ref, ref_secs) = (_ce_peaks(peak_rss, dt, impl)
                                                        for impl in ("fused", "reference"))
    benchmark.extra_info.update(
        peak_mib=round(fused, 1), reference_peak_mib=round(ref, 1), peak_ratio=round(fused / ref, 3),
        first_step_peak_mib=round(first, 1), reference_first_step_peak_mib=round(ref_first, 1),
        default_allocator_speedup=round(ref_secs / secs, 3))
    speedup = timed(_ce_workload(DTYPES[dt], "fused"), case=f"cross_entropy {dt} fwd+bwd",
                    rounds=3, reference=_ce_workload(DTYPES[dt], "reference"))
    assert fused <= ref / 4, f"fused peak {fused:.0f} MiB vs reference {ref:.0f} MiB"
    if speedup is not None:
        assert speedup >= 1.0, f"cross_entropy {dt}: fused {speedup:.2f}x the reference"


# ----------------------------------------------------------------------------- adamw

# ~50M parameters in a 7B-like mix: square attention weights, FFN weights, norm vectors.
ADAM_SHAPES = [(2048, 2048)] * 4 + [(5504, 2048)] * 3 + [(2048,)] * 2  # 50.6M


def _adam_workload(impl):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g) for s in ADAM_SHAPES]
    grads = [torch.randn(s, generator=g) for s in ADAM_SHAPES]
    m = [torch.zeros(s) for s in ADAM_SHAPES]
    v = [torch.zeros(s) for s in ADAM_SHAPES]
    wds = [0.0 if len(s) == 1 else 0.1 for s in ADAM_SHAPES]
    step = [0]

    def run():
        step[0] += 1
        ops.adamw(params, grads, m, v, step=step[0], lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                  weight_decay=wds, impl=impl)
    return run


def test_bench_ops_adamw_reference(timed, benchmark):
    benchmark.extra_info["params"] = sum(torch.Size(s).numel() for s in ADAM_SHAPES)
    timed(_adam_workload("reference"), case="adamw fp32 50M params")


def test_bench_ops_adamw_fused(timed):
    timed(_adam_workload("fused"), case="adamw fp32 50M params",
          reference=_adam_workload("reference"), min_speedup=1.0)
