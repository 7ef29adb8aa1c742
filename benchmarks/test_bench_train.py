"""Training throughput of the `small` config (dim 512, 8 layers, 8 heads, ffn 1376, vocab 32000;
batch 4 x 256 tokens, AdamW): aquila-fn's train step in the default precision against
transformers' LlamaForCausalLM in fp32 eager with torch.optim.AdamW, built from the same config
(no hub), in the same run. Target: aquila-fn at least 2.5x the reference's throughput.

extra_info of each case: tokens/s, MFU against this machine's measured matmul peak for the
compute dtype (fp32 0.2, bf16 0.875 TFLOP/s; `aquila_fn.jobs.pretrain.PEAK_TFLOPS`), and peak memory
(peak RSS of a fresh process running a few steps, above its after-imports baseline).

Run: pytest benchmarks/test_bench_train.py --benchmark-only
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aquila_fn import get_config, init_params
from aquila_fn.training import optim, train
from aquila_fn.jobs.pretrain import peak_flops

CFG = get_config("small")
BATCH, SEQ = 4, 256
LR = 3e-4
HERE = Path(__file__).resolve().parent
CASE = "train small 4x256"


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)


def hf_train_step():
    """transformers LlamaForCausalLM, fp32 eager, torch.optim.AdamW: the reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CFG.to_hf(), "max_position_embeddings": SEQ}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    x = _tokens()[:, :SEQ]  # HF shifts the labels itself

    def run():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


def aquila_train_step(compile=False, precision=None):
    precision = precision or train.default_precision("cpu")
    opt = optim.adamw(optim.constant(LR), weight_decay=0.1, max_grad_norm=1.0)
    box = {"state": train.init_train_state(init_params(CFG, 0), opt, precision=precision)}
    step = train.make_train_step(CFG, opt, precision=precision, compile=compile)
    x = _tokens()
    batch = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def run():
        box["state"], metrics = step(box["state"], batch)
        return metrics

    return run


BUILDERS = {
    "hf": hf_train_step,
    "aquila": lambda: aquila_train_step(False),
    "aquila-compiled": lambda: aquila_train_step(True),
}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_memory(kind: str, steps: int = 3) -> None:
    """Run in a fresh process: print the peak RSS (MiB) that training adds over the
    after-imports baseline (model, gradients, optimizer state, activations, compiled code)."""
    import transformers  # noqa: F401  (both stacks pay the same import baseline)
    base = _rss_kib("VmRSS")
    run = BUILDERS[kind]()
    for _ in range(steps):
        run()
    print((_rss_kib("VmHWM") - base) / 1024)


def peak_memory_mib(kind: str) -> float:
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_bench_train as b; " \
           f"b.measure_peak_memory({kind!r})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=HERE.parent)
    return float(out.stdout.strip().splitlines()[-1])


def _report(benchmark, precision: str, kind: str) -> None:
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    tokens_per_s = BATCH * SEQ / median
    flops = CFG.flops_per_token(SEQ) * tokens_per_s
    benchmark.extra_info.update({
        "precision": precision,
        "tokens_per_s": round(tokens_per_s, 1),
        "tflops": round(flops / 1e12, 4),
        "mfu": round(flops / peak_flops(precision, "cpu"), 4),
        "peak_memory_mib": round(peak_memory_mib(kind), 1),
    })


def test_train_small_hf_fp32_eager(timed, benchmark):
    timed(BUILDERS["hf"](), case=CASE, rounds=5)
    _report(benchmark, "fp32", "hf")


@pytest.mark.parametrize("kind", ["aquila", "aquila-compiled"])
def test_train_small_aquila(timed, benchmark, kind):
    speedup = timed(BUILDERS[kind](), case=CASE, rounds=5, reference=BUILDERS["hf"]())
    _report(benchmark, train.default_precision("cpu"), kind)
    if speedup is not None:
        benchmark.extra_info["target_speedup"] = 2.5
