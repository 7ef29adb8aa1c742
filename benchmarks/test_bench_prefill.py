"""Prefill of a 512-token prompt into a 2048-slot KV cache, `small` config, batch 1: the prefill
path (a Python-int position: attention reads only the filled slots, unmasked, so the causal
kernels run) against the whole-cache path the compiled decode step uses (a tensor position:
every slot read under a mask), same weights, same cache size, in the same run. Target: the
prefill path at least as fast (measured on the development CPU: fp32 1.36x, bf16 2.1x).

Run: pytest benchmarks/test_bench_prefill.py --benchmark-only
"""
import pytest
import torch

from aquila_fn import forward, get_config, init_cache, init_params
from aquila_fn.core import pytree

CFG = get_config("small")
PROMPT, CACHE = 512, 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the two paths run different attention kernels (bf16: the chunked one against masked SDPA)
LOGIT_ATOL = {"fp32": 1e-4, "bf16": 0.1}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


def _prefill(params, dtype, start_pos):
    """A callable filling a fresh cache with the prompt at `start_pos` (0 or tensor(0))."""
    weights = pytree.tree_map(lambda t: t.to(dtype), params)
    tokens = torch.randint(0, CFG.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))

    def run():
        cache = init_cache(CFG, 1, CACHE, dtype=dtype)
        with torch.no_grad():
            return forward(weights, tokens, CFG, cache=cache, start_pos=start_pos)
    return run


@pytest.mark.parametrize("dt", list(DTYPES))
def test_bench_prefill_filled_slots_vs_whole_cache(timed, params, dt):
    filled = _prefill(params, DTYPES[dt], 0)
    whole = _prefill(params, DTYPES[dt], torch.tensor(0))
    torch.testing.assert_close(filled()[0], whole()[0], rtol=0, atol=LOGIT_ATOL[dt])  # the same logits
    timed(filled, case=f"prefill small {PROMPT} into {CACHE} {dt}", rounds=5, reference=whole,
          min_speedup=1.0)
